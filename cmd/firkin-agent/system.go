//go:build linux

package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/firkin-dev/firkin-worker/agent"
)

// modulesList names the modules to load, one absolute path a line, in order.
const modulesList = "/etc/firkin/modules"

// Bounded waits for devices that appear asynchronously.
const (
	rootDiskWait = 10 * time.Second
	channelWait  = 10 * time.Second
	pollInterval = 5 * time.Millisecond
)

// mount is one mount to make.
type mount struct {
	source, target, fstype string
	flags                  uintptr
	data                   string
}

// pseudoMounts are the file systems PID 1 mounts in the initramfs.
var pseudoMounts = []mount{
	{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"},
	{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666"},
	{"tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
	{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
	{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755"},
}

// doMount makes m, creating its target. A target that is already mounted
// (EBUSY) is fine.
func doMount(m mount) error {
	if err := os.MkdirAll(m.target, 0o755); err != nil {
		return fmt.Errorf("mkdir %s: %w", m.target, err)
	}
	err := unix.Mount(m.source, m.target, m.fstype, m.flags, m.data)
	if err != nil && !errors.Is(err, unix.EBUSY) {
		return fmt.Errorf("mount %s on %s: %w", m.fstype, m.target, err)
	}
	return nil
}

func mountPseudo() error {
	for _, m := range pseudoMounts {
		if err := doMount(m); err != nil {
			return err
		}
	}
	return nil
}

// loadModules loads the modules listed in list, in order, with finit_module.
// Built-in or already loaded modules (EEXIST) are fine; a module that fails
// is logged and skipped, so that an optional one cannot stop the boot.
func loadModules(log *slog.Logger, list string) error {
	f, err := os.Open(list)
	if errors.Is(err, os.ErrNotExist) {
		log.Debug("no module list", "path", list)
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		p := strings.TrimSpace(sc.Text())
		if p == "" || strings.HasPrefix(p, "#") {
			continue
		}
		t := time.Now()
		if err := loadModule(p); err != nil {
			log.Warn("load module", "path", p, "err", err)
			continue
		}
		log.Debug("module loaded", "path", p, "elapsed", time.Since(t).Round(time.Microsecond))
	}
	return sc.Err()
}

func loadModule(path string) error {
	m, err := os.Open(path)
	if err != nil {
		return err
	}
	defer m.Close()
	flags := 0
	if strings.HasSuffix(path, ".xz") || strings.HasSuffix(path, ".zst") || strings.HasSuffix(path, ".gz") {
		// The kernel decompresses (CONFIG_MODULE_DECOMPRESS).
		flags = unix.MODULE_INIT_COMPRESSED_FILE
	}
	err = unix.FinitModule(int(m.Fd()), "", flags)
	if errors.Is(err, unix.EEXIST) {
		return nil
	}
	return err
}

// waitFor polls until ok returns true or d has passed.
func waitFor(d time.Duration, ok func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if ok() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(pollInterval)
	}
}

// mountRoot waits for the root disk, mounts it at rootMount and mounts the
// pseudo file systems inside it, so chrooted commands see a normal system.
func mountRoot(log *slog.Logger, cfg *config) error {
	if cfg.rootDev == "none" || cfg.rootDev == "" {
		log.Warn("no root disk: commands run in the initramfs")
		return nil
	}
	if !waitFor(rootDiskWait, func() bool { _, err := os.Stat(cfg.rootDev); return err == nil }) {
		return fmt.Errorf("root disk %s did not appear within %v", cfg.rootDev, rootDiskWait)
	}
	if err := doMount(mount{cfg.rootDev, rootMount, cfg.rootFSType, unix.MS_NOATIME, ""}); err != nil {
		if !errors.Is(err, unix.EROFS) && !errors.Is(err, unix.EACCES) {
			return err
		}
		log.Warn("root disk is read-only", "dev", cfg.rootDev)
		if err := doMount(mount{cfg.rootDev, rootMount, cfg.rootFSType, unix.MS_RDONLY, ""}); err != nil {
			return err
		}
	}
	inner := []mount{
		{"proc", rootMount + "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
		{"sysfs", rootMount + "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
		{"/dev", rootMount + "/dev", "", unix.MS_BIND | unix.MS_REC, ""},
		{"tmpfs", rootMount + "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
		{"tmpfs", rootMount + "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755"},
	}
	for _, m := range inner {
		if err := doMount(m); err != nil {
			return err
		}
	}
	cfg.root = rootMount
	return nil
}

// channel is the agent channel the host talks to.
type channel struct {
	port  string // virtio-serial port device, or "" for vsock
	vsock bool
}

// findChannel waits for the agent channel: the virtio-serial port named
// cfg.portName, or a virtio vsock device. A named port wins; vsock is taken
// once a vsock device has been there for a moment without a named port.
func findChannel(cfg *config) (channel, error) {
	var ch channel
	var vsockSeen time.Time
	found := waitFor(channelWait, func() bool {
		if cfg.channel != "vsock" {
			if p := findPort(cfg.portName); p != "" {
				ch = channel{port: p}
				return true
			}
		}
		if cfg.channel == "vsock" {
			// Asked for explicitly: /dev/vsock is enough.
			if _, err := os.Stat("/dev/vsock"); err == nil {
				ch = channel{vsock: true}
				return true
			}
			return false
		}
		if cfg.channel != "virtio-serial" && vsockDevice() {
			if vsockSeen.IsZero() {
				vsockSeen = time.Now()
			}
			if time.Since(vsockSeen) > 300*time.Millisecond {
				ch = channel{vsock: true}
				return true
			}
		}
		return false
	})
	if !found {
		return channel{}, fmt.Errorf("no virtio-serial port named %q and no vsock device within %v", cfg.portName, channelWait)
	}
	return ch, nil
}

// findPort returns /dev/<vportNpM> for the virtio-serial port called name.
func findPort(name string) string {
	dirs, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
	for _, d := range dirs {
		b, err := os.ReadFile(d)
		if err == nil && strings.TrimSpace(string(b)) == name {
			dev := "/dev/" + filepath.Base(filepath.Dir(d))
			if _, err := os.Stat(dev); err == nil {
				return dev
			}
		}
	}
	return ""
}

// vsockDevice reports whether a virtio vsock device is present and /dev/vsock
// exists.
func vsockDevice() bool {
	if _, err := os.Stat("/dev/vsock"); err != nil {
		return false
	}
	devs, _ := filepath.Glob("/sys/bus/virtio/drivers/vmw_vsock_virtio_transport/virtio*")
	return len(devs) > 0
}

// serve finds the channel and serves it forever.
func serve(ctx context.Context, log *slog.Logger, srv *agent.Server, cfg *config) error {
	ch, err := findChannel(cfg)
	if err != nil {
		return err
	}
	if !ch.vsock {
		f, err := os.OpenFile(ch.port, os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("open %s: %w", ch.port, err)
		}
		log.Info("serving", "channel", ch.port)
		ready()
		return srv.Serve(ctx, f)
	}
	l, err := listenVsock(cfg.vsockPort)
	if err != nil {
		return err
	}
	log.Info("serving", "channel", fmt.Sprintf("vsock:%d", cfg.vsockPort))
	ready()
	for {
		conn, err := l.accept()
		if err != nil {
			if errors.Is(err, unix.EINTR) || errors.Is(err, unix.ECONNABORTED) {
				continue
			}
			return fmt.Errorf("vsock accept: %w", err)
		}
		go func() {
			defer conn.Close()
			if err := srv.ServeConn(ctx, conn); err != nil {
				log.Debug("vsock connection ended", "err", err)
			}
		}()
	}
}

// ready writes the line the host and the tests look for on the console.
func ready() {
	fmt.Fprintln(console, "firkin-agent: ready")
}
