package vz

import (
	"net"
	"strconv"
	"strings"
)

// hypervisor is the small surface of Virtualization.framework the driver
// uses. The darwin implementation (vz_darwin.go) calls github.com/Code-Hex/vz;
// tests use a fake. Everything above it is platform-neutral.
type hypervisor interface {
	// Limits reports the CPU and memory bounds a configuration must keep.
	Limits() limits
	// NewMachineIdentifier returns the data representation of a new generic
	// machine identifier.
	NewMachineIdentifier() ([]byte, error)
	// CloneFile makes dst a copy-on-write clone of src (APFS clonefile),
	// falling back to a plain copy where the file system cannot clone. dst
	// must not exist.
	CloneFile(src, dst string) error
	// SaveRestoreSupported returns nil when this host can save and restore
	// a machine of configuration cfg, else an error saying why not (macOS
	// older than 14, an Intel Mac, a device that cannot be saved). It makes
	// no machine.
	SaveRestoreSupported(cfg machineConfig) error
	// NewVM builds and validates the configuration cfg describes and creates
	// a stopped virtual machine from it. Two calls with equal configs give
	// machines that can restore each other's saved state.
	NewVM(cfg machineConfig) (vm, error)
}

// vm is one Virtualization.framework virtual machine. Its methods block
// until the framework's completion handler ran.
type vm interface {
	// Start boots the machine.
	Start() error
	// Pause stops the vCPUs.
	Pause() error
	// Resume runs a paused machine (also one just restored).
	Resume() error
	// Stop stops the machine at once (no guest shutdown) and releases it;
	// on a machine that never started it only releases it.
	Stop() error
	// SaveState writes the state of the paused machine to path.
	SaveState(path string) error
	// RestoreState loads a state saved by a machine of the same
	// configuration; the machine is then paused.
	RestoreState(path string) error
	// DialVsock connects to a port of the guest over the virtio socket
	// device. It fails when nothing listens there (yet).
	DialVsock(port uint32) (net.Conn, error)
	// Done is closed when the machine stopped (for any reason) after it
	// had started.
	Done() <-chan struct{}
}

// limits are the bounds of a configuration on this host.
type limits struct {
	MinVCPUs, MaxVCPUs       int
	MinMemoryMB, MaxMemoryMB int
}

// macOSAtLeast reports whether the macOS product version v ("14.2.1")
// is major or later.
func macOSAtLeast(v string, major int) bool {
	head, _, _ := strings.Cut(strings.TrimSpace(v), ".")
	n, err := strconv.Atoi(head)
	return err == nil && n >= major
}
