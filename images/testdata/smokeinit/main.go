// Command smokeinit is a tiny static init for the image builder's boot test:
// it loads the modules listed in /etc/firkin/modules in order, checks that
// the virtio disk appeared, prints a marker and powers the machine off.
package main

import (
	"fmt"
	"os"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	err := run()
	if err != nil {
		fmt.Printf("FIRKIN-SMOKE-FAIL: %v\n", err)
	} else {
		fmt.Println("FIRKIN-SMOKE-OK")
	}
	syscall.Sync()
	_ = syscall.Reboot(syscall.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}

func run() error {
	if err := syscall.Mount("proc", "/proc", "proc", 0, ""); err != nil {
		return fmt.Errorf("mount proc: %w", err)
	}
	if err := syscall.Mount("sysfs", "/sys", "sysfs", 0, ""); err != nil {
		return fmt.Errorf("mount sys: %w", err)
	}
	list, err := os.ReadFile("/etc/firkin/modules")
	if err != nil {
		return err
	}
	for _, p := range strings.Fields(string(list)) {
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		err = unix.FinitModule(int(f.Fd()), "", 0)
		f.Close()
		if err != nil && err != unix.EEXIST {
			return fmt.Errorf("finit_module %s: %w", p, err)
		}
		fmt.Printf("loaded %s\n", p)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat("/sys/block/vda"); err == nil {
			fmt.Println("disk vda present")
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no /sys/block/vda after loading modules")
		}
		time.Sleep(20 * time.Millisecond) // polling the guest's sysfs with a deadline
	}
}
