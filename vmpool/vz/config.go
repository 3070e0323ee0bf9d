package vz

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// Defaults.
const (
	// DefaultVsockPort is the vsock port the guest agent listens on.
	DefaultVsockPort = 1024
	// DefaultVCPUs and DefaultMemoryMB apply when a spec leaves them zero.
	DefaultVCPUs    = 1
	DefaultMemoryMB = 256
	// defaultStopTimeout bounds Stop.
	defaultStopTimeout = 10 * time.Second
)

// Names inside a machine's private directory.
const (
	diskFile     = "disk.raw"      // the machine's writable disk (clone)
	consoleFile  = "console.log"   // guest console output
	identityFile = "identity.json" // machine identifier and MACs
)

// Names inside a snapshot directory.
const (
	stateFile       = "machine.vzvmsave" // SaveMachineStateToPath output
	frozenDiskFile  = "disk.raw"         // the disk as it was at the save
	machineJSONFile = "vz-machine.json"  // the configuration to restore with
)

// Config configures a Driver.
type Config struct {
	// VsockPort is the guest agent's vsock port (default 1024).
	VsockPort uint32
	// ExtraCmdline is appended to the guest kernel command line, after the
	// driver's own keys, so it can override them (e.g. "firkin.debug=1",
	// or firkin.ip=/firkin.gw=/firkin.dns= for a static address instead of
	// DHCP on the NAT network).
	ExtraCmdline string
	// StopTimeout bounds Machine.Stop (default 10s).
	StopTimeout time.Duration
	Logger      *slog.Logger
}

// Validate checks c.
func (c Config) Validate() error {
	var errs []error
	if strings.ContainsAny(c.ExtraCmdline, "\n\x00") {
		errs = append(errs, errors.New("extra kernel command line holds a newline or NUL"))
	}
	if len(c.ExtraCmdline) > 1024 {
		errs = append(errs, fmt.Errorf("extra kernel command line is %d bytes, over 1024", len(c.ExtraCmdline)))
	}
	if c.StopTimeout < 0 {
		errs = append(errs, fmt.Errorf("stop timeout %v is negative", c.StopTimeout))
	}
	if err := errors.Join(errs...); err != nil {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("vz: config: %w", err))
	}
	return nil
}

func (c Config) withDefaults() Config {
	if c.VsockPort == 0 {
		c.VsockPort = DefaultVsockPort
	}
	if c.StopTimeout == 0 {
		c.StopTimeout = defaultStopTimeout
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// machineConfig is everything a VZ configuration is built from. A restore
// must rebuild exactly the configuration the machine was saved with, so a
// snapshot keeps it (vz-machine.json).
type machineConfig struct {
	Kernel    string `json:"kernel"`
	Initramfs string `json:"initramfs"`
	Cmdline   string `json:"cmdline"`
	VCPUs     int    `json:"vcpus"`
	MemoryMB  int    `json:"memory_mb"`
	// Disk is the machine's writable raw disk.
	Disk string `json:"disk"`
	// ConsoleLog receives the guest console.
	ConsoleLog string `json:"console_log"`
	// MachineIdentifier is the generic machine identifier's data
	// representation.
	MachineIdentifier []byte `json:"machine_identifier"`
	// MACs has one entry per NAT network device, in device order.
	MACs      []string `json:"network_macs"`
	VsockPort uint32   `json:"vsock_port"`
	// Entropy and Console add the virtio entropy device and the virtio
	// console. Both are optional: Boot leaves out what would keep the
	// machine from being saved (see chooseDevices).
	Entropy bool `json:"entropy"`
	Console bool `json:"console"`
}

// deviceChoices are the optional device sets, richest first. The console
// goes before entropy: the agent seeds the guest's entropy at every Init,
// while the console is how a failed boot is understood.
var deviceChoices = []struct{ entropy, console bool }{{true, true}, {false, true}, {true, false}, {false, false}}

// chooseDevices returns mc with the richest optional device set that this
// host can save and restore, so that every machine can be snapshotted. When
// the host cannot save at all (older macOS, Intel), or no set can be saved,
// every device is kept.
func chooseDevices(hv hypervisor, mc machineConfig) machineConfig {
	for _, ds := range deviceChoices {
		c := mc
		c.Entropy, c.Console = ds.entropy, ds.console
		if hv.SaveRestoreSupported(c) == nil {
			return c
		}
	}
	mc.Entropy, mc.Console = true, true
	return mc
}

// Validate checks a machine configuration against the host's limits.
func (m machineConfig) Validate(l limits) error {
	var errs []error
	for _, f := range []struct{ name, path string }{{"kernel", m.Kernel}, {"initramfs", m.Initramfs}, {"disk", m.Disk}} {
		if f.path == "" {
			errs = append(errs, fmt.Errorf("no %s", f.name))
		} else if !filepath.IsAbs(f.path) {
			errs = append(errs, fmt.Errorf("%s path %q is not absolute", f.name, f.path))
		}
	}
	if m.VCPUs < max(l.MinVCPUs, 1) || (l.MaxVCPUs > 0 && m.VCPUs > l.MaxVCPUs) {
		errs = append(errs, fmt.Errorf("%d vCPUs: this host allows %d to %d", m.VCPUs, max(l.MinVCPUs, 1), l.MaxVCPUs))
	}
	if m.MemoryMB < max(l.MinMemoryMB, 1) || (l.MaxMemoryMB > 0 && m.MemoryMB > l.MaxMemoryMB) {
		errs = append(errs, fmt.Errorf("%d MiB of memory: this host allows %d to %d MiB", m.MemoryMB, max(l.MinMemoryMB, 1), l.MaxMemoryMB))
	}
	if len(m.MachineIdentifier) == 0 {
		errs = append(errs, errors.New("no machine identifier"))
	}
	for _, mac := range m.MACs {
		if err := checkMAC(mac); err != nil {
			errs = append(errs, err)
		}
	}
	if m.VsockPort == 0 {
		errs = append(errs, errors.New("no vsock port"))
	}
	if strings.ContainsAny(m.Cmdline, "\n\x00") {
		errs = append(errs, errors.New("kernel command line holds a newline or NUL"))
	}
	if err := errors.Join(errs...); err != nil {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("vz: machine configuration: %w", err))
	}
	return nil
}

// cmdline is the guest kernel command line: the console on the virtio
// console (hvc0), the root disk on virtio-blk, the agent on vsock, and with
// a network device an address from the NAT network's DHCP server. extra
// comes last, so its keys win (e.g. a static firkin.ip=).
func cmdline(vsockPort uint32, network bool, extra string) string {
	parts := []string{
		"console=hvc0",
		"panic=-1",
		"firkin.root=/dev/vda",
		"firkin.rootfstype=ext4",
		"firkin.channel=vsock",
		fmt.Sprintf("firkin.vsock_port=%d", vsockPort),
	}
	if network {
		parts = append(parts, "firkin.ip=dhcp")
	}
	if extra = strings.TrimSpace(extra); extra != "" {
		parts = append(parts, extra)
	}
	return strings.Join(parts, " ")
}

// hostArch is the architecture machines run on; VZ does not emulate.
var hostArch = runtime.GOARCH

// checkImage validates a boot image for this host: files present, the arch
// the host's, and on arm64 an uncompressed kernel Image (the Linux boot
// loader does not decompress).
func checkImage(img vmpool.Image) error {
	var errs []error
	if img.Arch != "" && img.Arch != hostArch {
		errs = append(errs, fmt.Errorf("image is for %s; the vz driver runs %s guests only (it does not emulate)", img.Arch, hostArch))
	}
	for _, f := range []struct{ name, path string }{{"kernel", img.Kernel}, {"initramfs", img.Initramfs}, {"root disk", img.RootDisk}} {
		if f.path == "" {
			errs = append(errs, fmt.Errorf("no %s", f.name))
			continue
		}
		if !filepath.IsAbs(f.path) {
			errs = append(errs, fmt.Errorf("%s path %q is not absolute", f.name, f.path))
			continue
		}
		if _, err := os.Stat(f.path); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", f.name, err))
		}
	}
	if len(errs) == 0 && hostArch == "arm64" {
		if err := checkARM64Image(img.Kernel); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("vz: image: %w", err))
	}
	return nil
}

// checkARM64Image checks that path is an uncompressed arm64 kernel Image
// ("ARM\x64" at offset 56).
func checkARM64Image(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("kernel: %w", err)
	}
	defer f.Close()
	head := make([]byte, 64)
	if _, err := io.ReadFull(f, head); err != nil {
		return fmt.Errorf("kernel %s: %w", path, err)
	}
	if string(head[56:60]) != "ARM\x64" {
		return fmt.Errorf("kernel %s is not an uncompressed arm64 Image (gzip-compressed vmlinuz must be decompressed first)", path)
	}
	return nil
}

// bootConfig derives the machine configuration for a cold boot from spec;
// identity comes from the machine's directory.
func bootConfig(c Config, spec vmpool.BootSpec, id identity) machineConfig {
	r := resourcesOrDefault(spec.Resources)
	var macs []string
	if spec.Network {
		macs = id.MACs
	}
	return machineConfig{
		Kernel:            spec.Image.Kernel,
		Initramfs:         spec.Image.Initramfs,
		Cmdline:           cmdline(c.VsockPort, len(macs) > 0, c.ExtraCmdline),
		VCPUs:             r.VCPUs,
		MemoryMB:          r.MemoryMB,
		Disk:              filepath.Join(spec.Dir, diskFile),
		ConsoleLog:        filepath.Join(spec.Dir, consoleFile),
		MachineIdentifier: id.MachineIdentifier,
		MACs:              macs,
		VsockPort:         c.VsockPort,
	}
}

// restoreConfig derives the configuration of a restored machine: the saved
// configuration with the new machine's disk and console in dir. Everything
// else (kernel, command line, resources, identifier, MACs, vsock port) must
// stay as it was.
func restoreConfig(saved machineConfig, dir string) machineConfig {
	m := saved
	m.MACs = append([]string(nil), saved.MACs...)
	m.MachineIdentifier = append([]byte(nil), saved.MachineIdentifier...)
	m.Disk = filepath.Join(dir, diskFile)
	m.ConsoleLog = filepath.Join(dir, consoleFile)
	return m
}

func resourcesOrDefault(r vmpool.Resources) vmpool.Resources {
	if r.VCPUs == 0 {
		r.VCPUs = DefaultVCPUs
	}
	if r.MemoryMB == 0 {
		r.MemoryMB = DefaultMemoryMB
	}
	return r
}

// checkBootSpec validates what Boot is asked for.
func checkBootSpec(spec vmpool.BootSpec) error {
	var errs []error
	if err := subjects.ValidateSandboxID(spec.ID); err != nil {
		errs = append(errs, err)
	}
	if spec.Dir == "" || !filepath.IsAbs(spec.Dir) {
		errs = append(errs, fmt.Errorf("machine directory %q is not an absolute path", spec.Dir))
	}
	if spec.Resources.VCPUs < 0 || spec.Resources.MemoryMB < 0 {
		errs = append(errs, fmt.Errorf("negative resources %+v", spec.Resources))
	}
	if err := errors.Join(errs...); err != nil {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("vz: boot: %w", err))
	}
	return checkImage(spec.Image)
}

// checkRestoreSpec validates what Restore is asked for.
func checkRestoreSpec(spec vmpool.RestoreSpec) error {
	var errs []error
	if err := subjects.ValidateSandboxID(spec.ID); err != nil {
		errs = append(errs, err)
	}
	if spec.Dir == "" || !filepath.IsAbs(spec.Dir) {
		errs = append(errs, fmt.Errorf("machine directory %q is not an absolute path", spec.Dir))
	}
	if spec.Snapshot.Dir == "" || !filepath.IsAbs(spec.Snapshot.Dir) {
		errs = append(errs, fmt.Errorf("snapshot directory %q is not an absolute path", spec.Snapshot.Dir))
	}
	if len(spec.Snapshot.MachineIdentifier) == 0 {
		errs = append(errs, errors.New("the snapshot has no machine identifier (a VZ restore needs the one it was saved with)"))
	}
	if spec.Snapshot.Disk == "" {
		errs = append(errs, errors.New("the snapshot has no disk"))
	}
	if err := errors.Join(errs...); err != nil {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("vz: restore: %w", err))
	}
	return nil
}
