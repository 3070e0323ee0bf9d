// Package vmpool runs micro-VMs: the Driver interface that every hypervisor
// backend implements, and the Pool of warm machines restored from template
// snapshots.
package vmpool

import (
	"context"
	"net"

	"github.com/firkin-dev/firkin-worker/agent"
)

// Driver starts machines on one kind of hypervisor. Implementations live in
// subpackages (qemu, vz). A Driver is safe for concurrent use.
type Driver interface {
	// Name is the driver's name as used by --driver ("qemu", "vz").
	Name() string
	// Boot cold-boots a machine from an image and returns it once its agent
	// answered a ping. ctx bounds only the boot; the machine lives until Stop.
	Boot(ctx context.Context, spec BootSpec) (Machine, error)
}

// Machine is one running micro-VM with a connected agent.
type Machine interface {
	// ID is the machine's id (the sandbox id it was started for).
	ID() string
	// Dir is the machine's private directory (overlays, sockets, console log).
	Dir() string
	// Init re-initialises identity, env, clock and entropy in the guest.
	Init(ctx context.Context, req agent.InitRequest) error
	// Exec runs a command in the guest, streaming output to out as it comes.
	Exec(ctx context.Context, req agent.ExecRequest, out agent.OutputFunc) (agent.ExecResult, error)
	// DialGuest opens a TCP stream to port on the guest's loopback, carried by
	// the agent channel.
	DialGuest(ctx context.Context, port int) (net.Conn, error)
	// Ping checks that the agent answers.
	Ping(ctx context.Context) error
	// Stop stops the machine and removes everything it made (process, sockets,
	// overlay, directory). It is safe to call more than once.
	Stop(ctx context.Context) error
	// Done is closed when the machine's process has exited (for any reason).
	Done() <-chan struct{}
}

// Confined is implemented by machines whose hypervisor runs as a uid of its
// own (qemu when the worker is root): network rules can match the
// machine's traffic by that uid (nftables meta skuid).
type Confined interface {
	// UID is the uid the machine's hypervisor process runs as.
	UID() uint32
}

// Resources are what a machine gets.
type Resources struct {
	VCPUs    int
	MemoryMB int
}

// Image is a bootable guest: kernel, initramfs and the root disk of a template.
type Image struct {
	Kernel    string // path to the kernel (bzImage on x86_64, Image on arm64)
	Initramfs string // path to the initramfs (newc cpio, agent as /init)
	RootDisk  string // path to the template's read-only base disk (raw ext4)
	Arch      string // "amd64" or "arm64"; empty means the host's
}

// BootSpec describes a machine to boot.
type BootSpec struct {
	ID        string // sandbox id: validated, lowercase alphanumeric
	Dir       string // private directory to create and own; removed by Stop
	Image     Image
	Resources Resources
	// Network enables outbound user-mode networking for the guest.
	Network bool
	// SnapshotReady boots with guest RAM in a shared file, so the machine can
	// later be saved as a template snapshot whose memory clones map
	// copy-on-write.
	SnapshotReady bool
}

// Snapshot is what a driver saved: enough to restore the machine elsewhere on
// this host. Paths are inside the directory the caller gave to Save.
type Snapshot struct {
	Dir       string   // directory holding every artifact
	Artifacts []string // file names (relative to Dir) that make up the snapshot
	// Disk is the frozen root disk (read-only from now on); restores put an
	// overlay on top of it.
	Disk string
	// Format says how memory was saved: "shared-memory" (RAM file mapped
	// copy-on-write by clones) or "stream" (whole RAM in the state file).
	Format string
	// MachineIdentifier and NetworkMACs keep the identity a VZ restore needs.
	MachineIdentifier []byte
	NetworkMACs       []string
	Resources         Resources
	Image             Image // kernel and initramfs the machine was booted with
	// Digests holds what the driver computed of artifacts while it wrote
	// them, by name, so they need not be read again. It is for the save
	// only: never written into a snapshot's metadata.
	Digests map[string]Digest `json:"-"`
}

// Digest is an artifact's sha256 (hex) over its first Size bytes.
type Digest struct {
	SHA256 string
	Size   int64
}

// Saver is implemented by drivers that can snapshot a running machine.
type Saver interface {
	// Save pauses m, freezes its disk (m goes on writing to a new overlay),
	// writes its state into dir (which exists and is empty) and then resumes
	// m, or stops it when opts.Stop is set.
	Save(ctx context.Context, m Machine, dir string, opts SaveOptions) (Snapshot, error)
}

// SnapshotKind says what a snapshot is for.
type SnapshotKind string

// The snapshot kinds.
const (
	// Continuation resumes one session later: the whole machine state.
	Continuation SnapshotKind = "continuation"
	// Template is a reusable root that many clones restore from; drivers keep
	// its memory in a form that clones can share copy-on-write.
	Template SnapshotKind = "template"
)

// SaveOptions tune a Save.
type SaveOptions struct {
	Kind SnapshotKind
	// Stop stops the source machine after the save instead of resuming it.
	Stop bool
}

// Reattacher is implemented by drivers whose machines outlive the worker
// process: after a restart the worker reattaches to them, or stops them.
type Reattacher interface {
	// Reattach connects to the machine whose private directory is dir. It
	// fails when the machine is gone; the caller then removes dir.
	Reattach(ctx context.Context, dir string) (Machine, error)
}

// RestoreSpec describes a machine to restore from a snapshot.
type RestoreSpec struct {
	ID       string
	Dir      string
	Snapshot Snapshot
	Network  bool
	// SnapshotReady gives the restored machine guest RAM of its own in a
	// shared file (a copy of the snapshot's memory), so it can itself be saved
	// as a template snapshot whose memory clones share (template builds).
	SnapshotReady bool
	// Background starts the machine with a small share of contended CPU
	// time (warm pool fills), so that it yields to machines in use; the
	// machine's Foreground gives it the normal share.
	Background bool
}

// Foregrounder is implemented by machines that can be started in the
// background (RestoreSpec.Background).
type Foregrounder interface {
	// Foreground gives the machine the normal share of CPU time.
	Foreground() error
}

// BootChecker is implemented by machines that can tell whether their guest
// booted with other kernel arguments than the driver boots with now (a
// machine restored from an older snapshot keeps the ones it booted with).
type BootChecker interface {
	// OutdatedBoot says how the arguments differ ("" when they do not).
	OutdatedBoot() string
}

// Restorer is implemented by drivers that can restore a machine from a snapshot.
type Restorer interface {
	// Restore starts a machine from snap and returns it once a new agent session
	// answered. The caller calls Init afterwards.
	Restore(ctx context.Context, spec RestoreSpec) (Machine, error)
}
