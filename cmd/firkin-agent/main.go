//go:build linux

// Command firkin-agent is the guest agent: PID 1 of a firkin micro-VM's
// initramfs. It mounts the pseudo file systems, loads the kernel modules
// listed in /etc/firkin/modules, mounts the root disk at /mnt/root, brings up
// the network, and serves the host's agent channel (a virtio-serial port
// named "firkin.agent", or vsock port 1024) with agent.Server, running
// commands chrooted into the root disk. It reaps orphans and never exits: on
// a fatal error it logs to the console and powers the machine off.
//
// Kernel command line keys (all optional):
//
//	firkin.root=/dev/vda       root disk, or "none" to serve without one
//	firkin.rootfstype=ext4     its file system
//	firkin.port=firkin.agent   name of the virtio-serial port
//	firkin.channel=auto        "virtio-serial", "vsock" or "auto"
//	firkin.vsock_port=1024     vsock port to listen on
//	firkin.ip=10.0.2.15/24     address of the first ethernet interface, or "dhcp"
//	firkin.gw=10.0.2.2         default gateway (with a static address)
//	firkin.dns=10.0.2.3        name server written to the root's /etc/resolv.conf
//	firkin.debug=1             debug logging
package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/firkin-dev/firkin-worker/agent"
)

// rootMount is where the root disk is mounted; commands chroot into it.
const rootMount = "/mnt/root"

// console is where the agent logs: /dev/console once /dev is mounted.
var console io.Writer = os.Stderr

// logLevel is raised to debug by firkin.debug on the command line.
var logLevel slog.LevelVar

func main() {
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "firkin-agent: must run as PID 1 of a guest (it mounts, loads modules and powers off)")
		os.Exit(2)
	}
	ctx := context.Background()
	ignoreSignals()
	reaper := agent.NewReaper(ctx)

	log := slog.New(slog.NewTextHandler(prefixWriter{&console}, &slog.HandlerOptions{Level: &logLevel}))
	defer func() {
		if r := recover(); r != nil {
			fatal(log, fmt.Errorf("panic: %v\n%s", r, debug.Stack()))
		}
	}()
	start := time.Now()
	cfg, err := boot(ctx, log)
	if err != nil {
		fatal(log, err)
	}
	log.Info("booted", "elapsed", time.Since(start).Round(time.Millisecond))

	srv := &agent.Server{Root: cfg.root, ManageSystem: true, Reaper: reaper, Logger: log,
		PowerOff: func() { powerOff(log) }}
	err = serve(ctx, log, srv, cfg)
	fatal(log, fmt.Errorf("serve: %w", err))
}

// ignoreSignals keeps the signals that would end a Go program from ending
// PID 1. They are caught (not ignored), so that commands started later get
// the default dispositions.
func ignoreSignals() {
	ch := make(chan os.Signal, 8)
	signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGQUIT,
		syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGPIPE)
	go func() {
		for range ch {
		}
	}()
}

// fatal logs err and powers the machine off. PID 1 must never exit (the
// kernel would panic).
func fatal(log *slog.Logger, err error) {
	log.Error("fatal: powering off", "err", err)
	powerOff(log)
	select {}
}

// powerOff syncs and powers the machine off. On success it does not return.
func powerOff(log *slog.Logger) {
	// Kill every other process first so that nothing writes after the sync.
	_ = unix.Kill(-1, unix.SIGKILL)
	unix.Sync()
	if mounted(rootMount) {
		// Read-only, so that the file system is clean on the disk.
		_ = unix.Mount("", rootMount, "", unix.MS_REMOUNT|unix.MS_RDONLY, "")
	}
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF); err != nil {
		log.Error("power off", "err", err)
	}
}

// mounted reports whether dir is a mount point.
func mounted(dir string) bool {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return false
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 1 && f[1] == dir {
			return true
		}
	}
	return false
}

// prefixWriter prefixes every log record (one Write each) with the agent's
// name, so console lines read "firkin-agent: ...".
type prefixWriter struct{ w *io.Writer }

func (p prefixWriter) Write(b []byte) (int, error) {
	if _, err := (*p.w).Write(append([]byte("firkin-agent: "), b...)); err != nil {
		return 0, err
	}
	return len(b), nil
}

// config is what the kernel command line asks for.
type config struct {
	rootDev    string
	rootFSType string
	portName   string
	channel    string
	vsockPort  uint32
	ip, gw     string
	dns        string
	debug      bool
	root       string // where the root disk ended up mounted; "" for none
}

// parseCmdline reads the firkin.* keys of a kernel command line.
func parseCmdline(cmdline string) config {
	c := config{
		rootDev:    "/dev/vda",
		rootFSType: "ext4",
		portName:   "firkin.agent",
		channel:    "auto",
		vsockPort:  1024,
	}
	for _, f := range strings.Fields(cmdline) {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case "firkin.root":
			c.rootDev = v
		case "firkin.rootfstype":
			c.rootFSType = v
		case "firkin.port":
			c.portName = v
		case "firkin.channel":
			c.channel = v
		case "firkin.vsock_port":
			var p uint32
			if _, err := fmt.Sscanf(v, "%d", &p); err == nil && p > 0 {
				c.vsockPort = p
			}
		case "firkin.ip":
			c.ip = v
		case "firkin.gw":
			c.gw = v
		case "firkin.dns":
			c.dns = v
		case "firkin.debug":
			c.debug = v == "" || v == "1" || v == "true"
		}
	}
	return c
}

// step is one named boot step; errors say which step failed.
type step struct {
	name string
	run  func() error
}

// boot prepares the machine: mounts, console, modules, root disk, network.
func boot(ctx context.Context, log *slog.Logger) (*config, error) {
	cfg := &config{}
	steps := []step{
		{"mount pseudo file systems", mountPseudo},
		{"open console", openConsole},
		{"read kernel command line", func() error {
			b, err := os.ReadFile("/proc/cmdline")
			if err != nil {
				return err
			}
			*cfg = parseCmdline(string(b))
			if cfg.debug {
				logLevel.Set(slog.LevelDebug)
			}
			return nil
		}},
		{"load modules", func() error { return loadModules(log, modulesList) }},
		{"mount root disk", func() error { return mountRoot(log, cfg) }},
		{"configure network", func() error { return configureNetwork(log, cfg) }},
	}
	for _, s := range steps {
		t := time.Now()
		if err := s.run(); err != nil {
			return nil, fmt.Errorf("boot: %s: %w", s.name, err)
		}
		log.Debug("boot step", "step", s.name, "elapsed", time.Since(t).Round(time.Microsecond))
	}
	return cfg, nil
}

// openConsole points the log and the standard descriptors at /dev/console
// (stdin at /dev/null), so that panics reach the console too.
func openConsole() error {
	c, err := os.OpenFile("/dev/console", os.O_WRONLY|unix.O_NOCTTY, 0)
	if err != nil {
		return err
	}
	console = c
	if err := unix.Dup3(int(c.Fd()), 1, 0); err != nil {
		return fmt.Errorf("dup stdout: %w", err)
	}
	if err := unix.Dup3(int(c.Fd()), 2, 0); err != nil {
		return fmt.Errorf("dup stderr: %w", err)
	}
	if null, err := os.Open("/dev/null"); err == nil {
		_ = unix.Dup3(int(null.Fd()), 0, 0)
		null.Close()
	}
	return nil
}
