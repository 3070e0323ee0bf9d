// Package qemu is the Linux machine driver: every sandbox is a QEMU process
// (qemu-system-x86_64 -M q35, or qemu-system-aarch64 -M virt) with the guest
// agent on a virtio-serial port named "firkin.agent", controlled over QMP.
//
// A machine boots a kernel and initramfs directly, with its root disk as a
// qcow2 overlay on the template's read-only raw base disk. KVM is used when
// it really works on the host (a bounded probe decides, once per QEMU
// version, host kernel and guest kernel, and the verdict is cached in the
// state dir); TCG otherwise.
//
// A machine's directory holds console.log (the guest's serial console,
// with console.log.1 its older half), qemu.log (QEMU's own output),
// machine.json (for Reattach), the disk layers and, for machines that can be
// saved as templates, mem (guest RAM in a shared file). The QMP, agent and
// console sockets live there too unless the path is too long for a unix
// socket; then they get a short directory of their own under /run/firkin or
// the temp dir.
//
// QEMU is given as little as possible to open by itself. It runs under its
// seccomp sandbox (-sandbox on with obsolete, elevateprivileges, spawn and
// resourcecontrol denied) when the binary takes it. The root disk's chain is
// named in full on the command line: the template's raw base and every
// frozen layer are opened read-only by the worker and inherited as
// descriptors (-add-fd, /dev/fdset/N), each qcow2 node's backing is given
// explicitly, so a backing file (or external data file) named in an image
// header is never opened; only the writable top overlay is a path in the
// machine's directory. Migration streams go through descriptors the worker
// opens (getfd, fd: URIs). The console is a socket the worker listens on
// (QEMU connects, and reconnects after a worker restart; a booting guest
// starts only once it is connected), copied into a log capped at
// Config.ConsoleCap. Files in snapshot directories are 0600, the
// directories 0700.
//
// A save freezes the disk: the current top overlay becomes a read-only
// layer and the machine goes on writing to a new overlay (blockdev-add and
// blockdev-snapshot while paused). Layers name their backing files by
// relative names and each directory holds hard links to all the layers
// below its own, so a snapshot directory is complete by itself. Device and
// CPU state go through a migration stream (a file descriptor). A template machine
// keeps its RAM in a shared file: its snapshot holds that file and a tiny
// state stream (x-ignore-shared), and clones map the file copy-on-write.
//
// When the worker runs as root, each QEMU is confined (package jail): it
// runs as a uid of its own from the driver's range, in a mount namespace
// whose root holds only /usr, the libraries, a few devices, its machine
// and socket directories and the template memory file it maps, and in a
// cgroup limiting its memory (RAM + MemoryOverheadMB), CPU (its vCPUs) and
// pids. Its machine and socket directories stay root's (0710, the range's
// group may pass): the worker makes the files QEMU writes and gives them to
// its uid, and QEMU makes its QMP and agent sockets in a subdirectory of its
// own (see ownFiles). What a save leaves in a snapshot is root's, 0600,
// except a template's memory file, which clones open by path (root and the
// range's group, see templateMemMode).
//
// Machines started with KeepOnExit=false get SIGKILL when the thread that
// started them exits (Pdeathsig); Go keeps its threads alive unless a
// goroutine locked to one exits, so in practice that is when the process
// exits.
package qemu

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// The driver implements the contract and its optional parts.
var (
	_ vmpool.Driver     = (*Driver)(nil)
	_ vmpool.Saver      = (*Driver)(nil)
	_ vmpool.Restorer   = (*Driver)(nil)
	_ vmpool.Reattacher = (*Driver)(nil)
	_ vmpool.Machine    = (*Machine)(nil)
	_ vmpool.Confined   = (*Machine)(nil)
)

// Accelerator choices.
const (
	AccelAuto = "auto" // KVM when it works (probed), else TCG
	AccelKVM  = "kvm"
	AccelTCG  = "tcg"
)

// Defaults.
const (
	// DefaultTBSizeMB is the TCG translation cache size. QEMU's own default
	// (1 GiB) costs RSS as the cache fills; 64 MiB holds the working set of a
	// busybox and Go agent guest.
	DefaultTBSizeMB     = 64
	DefaultProbeTimeout = 8 * time.Second
	DefaultStopTimeout  = 5 * time.Second
	// DefaultConsoleCap bounds a machine's console log on the host:
	// console.log and console.log.1 together.
	DefaultConsoleCap = 1 << 20
	// MinConsoleCap is the smallest console cap accepted.
	MinConsoleCap = 4 << 10
)

// Config configures a Driver. The zero value plus a StateDir is usable:
// binaries are looked up in $PATH.
type Config struct {
	// QEMU maps an arch ("amd64", "arm64") to its system emulator; missing
	// entries are looked up in $PATH (qemu-system-x86_64,
	// qemu-system-aarch64).
	QEMU map[string]string
	// QEMUImg is the qemu-img binary; default from $PATH.
	QEMUImg string
	// Accel is "auto" (default), "kvm" or "tcg".
	Accel string
	// TBSizeMB is the TCG translation cache in MiB (default DefaultTBSizeMB).
	TBSizeMB int
	// StateDir holds the driver's caches (the accelerator verdicts).
	StateDir string
	// SocketDir is where machines whose directory path is too long for unix
	// sockets get a short directory for them (default /run/firkin when
	// writable, else os.TempDir()).
	SocketDir string
	// Logger receives the driver's logs (default: discard).
	Logger *slog.Logger
	// KeepOnExit keeps QEMU running when the process that started it exits,
	// so a restarted worker can Reattach. When false QEMU gets SIGKILL as soon
	// as its parent dies (tests never leak machines).
	KeepOnExit bool
	// ProbeTimeout bounds the KVM probe (default DefaultProbeTimeout).
	ProbeTimeout time.Duration
	// StopTimeout is how long Stop waits for QEMU to quit before SIGKILL
	// (default DefaultStopTimeout).
	StopTimeout time.Duration
	// ConsoleCap bounds the bytes of a machine's console kept on the host
	// (console.log and the older console.log.1 together; default
	// DefaultConsoleCap).
	ConsoleCap int64
	// NoConfine runs QEMU as the worker's user with no jail even when the
	// worker is root. By default a root worker runs each QEMU in a mount
	// namespace of its own, as a uid of its own from a range claimed in
	// UIDLockDir, in a cgroup limiting its memory, CPU and pids (see
	// package jail).
	NoConfine bool
	// UIDLockDir holds the locks of the uid ranges (default
	// jail.DefaultLockDir).
	UIDLockDir string
	// MemoryOverheadMB is what a machine's cgroup may use beyond its guest
	// RAM (default DefaultMemoryOverheadMB).
	MemoryOverheadMB int
}

// Option changes a Config.
type Option func(*Config)

// WithQEMU sets the system emulator for arch.
func WithQEMU(arch, path string) Option {
	return func(c *Config) {
		if c.QEMU == nil {
			c.QEMU = map[string]string{}
		}
		c.QEMU[arch] = path
	}
}

// WithQEMUImg sets the qemu-img binary.
func WithQEMUImg(path string) Option { return func(c *Config) { c.QEMUImg = path } }

// WithAccel sets the accelerator: "auto", "kvm" or "tcg".
func WithAccel(accel string) Option { return func(c *Config) { c.Accel = accel } }

// WithTBSize sets the TCG translation cache size in MiB.
func WithTBSize(mb int) Option { return func(c *Config) { c.TBSizeMB = mb } }

// WithStateDir sets the directory for the driver's caches.
func WithStateDir(dir string) Option { return func(c *Config) { c.StateDir = dir } }

// WithSocketDir sets where short socket directories are made.
func WithSocketDir(dir string) Option { return func(c *Config) { c.SocketDir = dir } }

// WithLogger sets the logger.
func WithLogger(l *slog.Logger) Option { return func(c *Config) { c.Logger = l } }

// WithKeepOnExit keeps machines running when this process exits.
func WithKeepOnExit(keep bool) Option { return func(c *Config) { c.KeepOnExit = keep } }

// WithProbeTimeout bounds the KVM probe.
func WithProbeTimeout(d time.Duration) Option { return func(c *Config) { c.ProbeTimeout = d } }

// WithStopTimeout sets how long Stop waits before it kills QEMU.
func WithStopTimeout(d time.Duration) Option { return func(c *Config) { c.StopTimeout = d } }

// WithConsoleCap bounds the console log kept per machine, in bytes.
func WithConsoleCap(bytes int64) Option { return func(c *Config) { c.ConsoleCap = bytes } }

// WithConfine turns the confinement of QEMU (uid, cgroup, mount namespace)
// on (the default when the worker is root) or off.
func WithConfine(on bool) Option { return func(c *Config) { c.NoConfine = !on } }

// WithUIDLockDir sets where the uid range locks are.
func WithUIDLockDir(dir string) Option { return func(c *Config) { c.UIDLockDir = dir } }

// WithMemoryOverhead sets what a machine's cgroup may use beyond its RAM.
func WithMemoryOverhead(mb int) Option { return func(c *Config) { c.MemoryOverheadMB = mb } }

// Arches are the guest architectures the driver runs.
var Arches = []string{"amd64", "arm64"}

func defaultBinary(arch string) string {
	if arch == "arm64" {
		return "qemu-system-aarch64"
	}
	return "qemu-system-x86_64"
}

// setDefaults fills in what is missing; binaries that are not found stay
// empty and fail only when a machine of that arch is wanted.
func (c *Config) setDefaults() {
	if c.Accel == "" {
		c.Accel = AccelAuto
	}
	if c.TBSizeMB == 0 {
		c.TBSizeMB = DefaultTBSizeMB
	}
	if c.ProbeTimeout == 0 {
		c.ProbeTimeout = DefaultProbeTimeout
	}
	if c.StopTimeout == 0 {
		c.StopTimeout = DefaultStopTimeout
	}
	if c.ConsoleCap == 0 {
		c.ConsoleCap = DefaultConsoleCap
	}
	if c.MemoryOverheadMB == 0 {
		c.MemoryOverheadMB = DefaultMemoryOverheadMB
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	qemu := map[string]string{}
	for k, v := range c.QEMU {
		qemu[k] = v
	}
	for _, arch := range Arches {
		if qemu[arch] == "" {
			if p, err := exec.LookPath(defaultBinary(arch)); err == nil {
				qemu[arch] = p
			}
		}
	}
	c.QEMU = qemu
	if c.QEMUImg == "" {
		if p, err := exec.LookPath("qemu-img"); err == nil {
			c.QEMUImg = p
		}
	}
	if c.SocketDir == "" {
		c.SocketDir = os.TempDir()
		if err := os.MkdirAll("/run/firkin", 0o700); err == nil && unixWritable("/run/firkin") {
			c.SocketDir = "/run/firkin"
		}
	}
}

func unixWritable(dir string) bool {
	f, err := os.CreateTemp(dir, ".w")
	if err != nil {
		return false
	}
	f.Close()
	os.Remove(f.Name())
	return true
}

// Validate checks the configuration and joins every problem found.
func (c *Config) Validate() error {
	var errs []error
	switch c.Accel {
	case AccelAuto, AccelKVM, AccelTCG:
	default:
		errs = append(errs, fmt.Errorf("accel %q: want auto, kvm or tcg", c.Accel))
	}
	if c.TBSizeMB < 0 || c.TBSizeMB > 2048 {
		errs = append(errs, fmt.Errorf("tb-size %d MiB: want 1..2048", c.TBSizeMB))
	}
	if c.StateDir == "" {
		errs = append(errs, errors.New("no state dir"))
	} else if !filepath.IsAbs(c.StateDir) {
		errs = append(errs, fmt.Errorf("state dir %q is not absolute", c.StateDir))
	}
	if c.SocketDir != "" && len(c.SocketDir) > 60 {
		errs = append(errs, fmt.Errorf("socket dir %q: too long for unix sockets", c.SocketDir))
	}
	for arch, p := range c.QEMU {
		if arch != "amd64" && arch != "arm64" {
			errs = append(errs, fmt.Errorf("qemu binary for arch %q: want amd64 or arm64", arch))
		}
		if p != "" && !filepath.IsAbs(p) {
			errs = append(errs, fmt.Errorf("qemu binary %q is not an absolute path", p))
		}
	}
	if c.QEMUImg == "" {
		errs = append(errs, errors.New("qemu-img not found: apt-get install -y qemu-utils"))
	}
	if c.ConsoleCap < MinConsoleCap {
		errs = append(errs, fmt.Errorf("console cap %d bytes: want at least %d", c.ConsoleCap, MinConsoleCap))
	}
	if c.MemoryOverheadMB < 0 {
		errs = append(errs, fmt.Errorf("memory overhead %d MiB is negative", c.MemoryOverheadMB))
	}
	if c.ProbeTimeout < 0 || c.StopTimeout < 0 {
		errs = append(errs, errors.New("negative timeout"))
	}
	if err := errors.Join(errs...); err != nil {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("qemu: config: %w", err))
	}
	return nil
}

// Driver starts QEMU machines. It is safe for concurrent use.
type Driver struct {
	cfg Config
	log *slog.Logger

	accelMu sync.Mutex
	accels  map[string]string // probe key -> verdict

	sandboxMu sync.Mutex
	sandboxes map[string]bool // binary -> whether it takes -sandbox
	conf      *confinement    // nil: QEMU runs unconfined

	restrictNet atomic.Bool // every guest network is restrict=on
}

// RestrictNetwork keeps every guest started from now on off the network
// (QEMU user networking with restrict=on): what the worker asks for when
// nothing can filter guest traffic, so that it never falls back to a network
// that reaches the host.
func (d *Driver) RestrictNetwork() { d.restrictNet.Store(true) }

// New returns a Driver configured by opts.
func New(opts ...Option) (*Driver, error) {
	var cfg Config
	for _, o := range opts {
		o(&cfg)
	}
	return NewFromConfig(cfg)
}

// NewFromConfig returns a Driver for cfg (defaults filled in, then validated).
func NewFromConfig(cfg Config) (*Driver, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("qemu: state dir: %w", err)
	}
	if err := os.Chmod(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("qemu: state dir: %w", err)
	}
	d := &Driver{cfg: cfg, log: cfg.Logger, accels: map[string]string{}, sandboxes: map[string]bool{}}
	d.setupConfinement()
	return d, nil
}

// Name returns "qemu".
func (d *Driver) Name() string { return "qemu" }

// binary returns the system emulator for arch.
func (d *Driver) binary(arch string) (string, error) {
	p := d.cfg.QEMU[arch]
	if p == "" {
		return "", errdefs.Wrap(errdefs.ErrUnsupported, fmt.Errorf("qemu: no %s found for %s guests: apt-get install -y qemu-system-%s", defaultBinary(arch), arch, map[string]string{"amd64": "x86", "arm64": "arm"}[arch]))
	}
	return p, nil
}

// sandbox reports whether bin runs with QEMU's seccomp sandbox
// (sandboxOpts). It asks each binary once: a QEMU built without seccomp, or
// a kernel without it, is logged once and machines run without it.
func (d *Driver) sandbox(bin string) bool {
	d.sandboxMu.Lock()
	defer d.sandboxMu.Unlock()
	if ok, known := d.sandboxes[bin]; known {
		return ok
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-sandbox", sandboxOpts, "-machine", "none", "-nodefaults",
		"-no-user-config", "-display", "none", "-S", "-qmp", "stdio")
	cmd.Stdin = strings.NewReader(`{"execute":"qmp_capabilities"}` + "\n" + `{"execute":"quit"}` + "\n")
	out, err := cmd.CombinedOutput()
	ok := err == nil
	if !ok {
		d.log.Warn("QEMU's seccomp sandbox is not available; machines run without it",
			"binary", bin, "err", err, "output", strings.TrimSpace(tailString(string(out), 300)))
	}
	d.sandboxes[bin] = ok
	return ok
}

func tailString(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// hostArch returns the arch of an Image ("" means the host's).
func imageArch(img vmpool.Image) (string, error) {
	arch := img.Arch
	if arch == "" {
		arch = runtime.GOARCH
	}
	if arch != "amd64" && arch != "arm64" {
		return "", invalid("qemu: image arch %q: want amd64 or arm64", arch)
	}
	return arch, nil
}

// machineType returns the machine type and console device for arch.
func machineType(arch string) (machine, console string) {
	if arch == "arm64" {
		return "virt", "ttyAMA0"
	}
	return "q35", "ttyS0"
}

// kernelArgs returns the guest kernel command line.
func kernelArgs(arch, accel string, network bool) string {
	_, console := machineType(arch)
	// cryptomgr.notests skips the kernel's crypto self-tests: about a
	// quarter of the boot's CPU time under TCG.
	args := []string{"console=" + console, "quiet", "panic=-1", "cryptomgr.notests"}
	args = append(args, idleArgs(arch, accel)...)
	if network {
		args = append(args, "firkin.ip=10.0.2.15/24", "firkin.gw=10.0.2.2", "firkin.dns=10.0.2.3")
	}
	return strings.Join(args, " ")
}

// idleArgs are the kernel arguments that keep an idle guest asleep: under
// TCG every guest timer interrupt wakes two host threads and runs the
// guest's interrupt path in software, so an idle sandbox's host CPU is its
// wake-ups. Measured on the tiny guest (Debian cloud kernel 6.1, tickless
// idle), each removes a periodic wake-up:
//   - nowatchdog: the soft-lockup detector's hrtimer (every 4 s);
//   - sysctl.vm.compaction_proactiveness=0: kcompactd's proactive check
//     (every 500 ms);
//   - psi=0: pressure stall accounting's averaging work (every 2 s while
//     anything ran);
//   - tsc=reliable (amd64 under TCG): the clocksource watchdog, which
//     compares the TSC with the HPET every 500 ms. QEMU's TCG derives both
//     from the host's clock, so they cannot drift apart; under KVM the
//     guest keeps the watchdog (its TSC is the hardware's), and kvm-clock
//     makes idle cheap there anyway.
//
// What stays is rare (the virtio-net transmit watchdog every 5 s, block
// and neighbour timers after activity) or the host's doing (the metrics
// sampler's guest stats call).
func idleArgs(arch, accel string) []string {
	a := []string{"nowatchdog", "sysctl.vm.compaction_proactiveness=0", "psi=0"}
	if arch == "amd64" && accel == "tcg" {
		a = append(a, "tsc=reliable")
	}
	return a
}
