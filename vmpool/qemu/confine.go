package qemu

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"github.com/firkin-dev/firkin-worker/jail"
)

// DefaultMemoryOverheadMB is what a machine's cgroup may use beyond its
// guest RAM: QEMU itself, the TCG translation cache (DefaultTBSizeMB) and
// the page cache of its disk writes. Measured (TestConfinedMachine) on a
// 256 MiB guest under TCG with its RAM in a shared file: after boot RSS
// 238 MiB, PSS 219 MiB, 96 MiB of it private anonymous (QEMU's heap and the
// 64 MiB translation cache); once the guest filled its free RAM the
// cgroup's peak was 342-370 MiB in three runs, 90-115 MiB over the guest's
// RAM: 256 MiB leaves room for the page cache of a save's disk writes.
const DefaultMemoryOverheadMB = 256

// templateMemMode is the mode of a template's memory file, root's and the
// range's group's: the one snapshot file confined clones open by path (the
// state stream and the disk layers reach QEMU as descriptors and stay
// root's, 0600). QEMU 7.2 opens a memory-backend-file's mem-path O_RDWR
// even with share=off (a clone could write into the template's memory file
// through it: the file is only bound into clones of that template, and
// QEMU >= 8.2 has rom=on to open it read-only).
const templateMemMode = 0o660

// qemuSockDir is the directory of a confined QEMU's own sockets (QMP and
// agent, which it makes), its uid's, inside the machine's socket directory,
// which stays root's and holds the worker's console socket.
const qemuSockDir = "qemu"

// confinement is how the driver confines its machines when the worker runs
// as root. A nil *confinement (or a nil part of it) means that step is off.
type confinement struct {
	rng     jail.Range
	alloc   *jail.Allocator // nil: QEMU keeps the worker's uid
	release func() error
	cg      *jail.Cgroups // nil: no cgroup limits
	root    string        // mount point of the jails' roots
	groups  []uint32      // supplementary groups of QEMU (the group of /dev/kvm)
}

// rangeFile in the state dir records the uid range, so a restarted worker
// takes the same one back (its running machines keep their uids).
const rangeFile = "uid-range"

// setupConfinement decides once, at start, what confinement the host
// allows, logs what is skipped and why, and sweeps the cgroups of machines
// that are gone.
func (d *Driver) setupConfinement() {
	switch {
	case runtime.GOOS != "linux":
		d.log.Warn("confinement: not on Linux; QEMU runs as the worker's user with no cgroup limits and no mount namespace")
		return
	case d.cfg.NoConfine:
		d.log.Warn("confinement: off by configuration; QEMU runs as the worker's user with no cgroup limits and no mount namespace")
		return
	case os.Geteuid() != 0:
		d.log.Warn("confinement: the worker is not root; QEMU runs as the worker's user, with no uid of its own, no cgroup limits and no mount namespace")
		return
	case !jail.Ready():
		d.log.Warn("confinement: this binary does not call jail.Main first thing; QEMU runs as root with no cgroup limits and no mount namespace")
		return
	}
	c := &confinement{root: filepath.Join(d.cfg.SocketDir, "jail-root")}
	if err := os.MkdirAll(c.root, 0o700); err != nil {
		d.log.Warn("confinement: no jail root; QEMU runs as root with no cgroup limits and no mount namespace", "err", err)
		return
	}
	// The range's first id is a group, never a machine's uid: a safe uid
	// for the probe.
	if err := jail.Probe(c.root, jail.RangeBase, jail.RangeBase); err != nil {
		d.log.Warn("confinement: the host does not allow the jail; QEMU runs as root with no cgroup limits and no mount namespace", "err", err)
		return
	}
	// The recorded range is preferred even while processes run as its
	// uids (this worker's own machines); any other such range is skipped
	// (see jail.AcquireRange).
	var prefer []int
	if b, err := os.ReadFile(filepath.Join(d.cfg.StateDir, rangeFile)); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && n >= 0 && n < jail.RangeCount {
			prefer = append(prefer, n)
		} else {
			d.log.Warn("confinement: the recorded uid range is not one; taking a free one", "file", filepath.Join(d.cfg.StateDir, rangeFile), "content", strings.TrimSpace(string(b)))
		}
	}
	rng, release, err := jail.AcquireRange(d.cfg.UIDLockDir, prefer...)
	if err != nil {
		d.log.Warn("confinement: no uid range; QEMU runs as root (in its mount namespace) with no cgroup limits", "err", err)
	} else {
		c.rng, c.alloc, c.release = rng, jail.NewAllocator(rng), release
		if err := os.WriteFile(filepath.Join(d.cfg.StateDir, rangeFile), []byte(strconv.Itoa(rng.Index)+"\n"), 0o600); err != nil {
			d.log.Warn("confinement: cannot record the uid range", "err", err)
		}
		cg, err := jail.OpenCgroups("firkin/" + rng.ID())
		if err != nil {
			d.log.Warn("confinement: no cgroup limits for machines", "err", err)
		} else {
			c.cg = cg
			if m := cg.Missing(); len(m) > 0 {
				d.log.Warn("confinement: cgroup controllers missing; those limits are not set", "controllers", m)
			}
			if removed, err := cg.Sweep(); err != nil || len(removed) > 0 {
				d.log.Info("confinement: removed the cgroups of machines that are gone", "cgroups", removed, "err", err)
			}
		}
	}
	if c.alloc != nil {
		c.groups = d.kvmGroup()
	}
	d.conf = c
	args := []any{"jail_root", c.root}
	if c.alloc != nil {
		args = append(args, "uid_first", rng.First+1, "uid_count", rng.Count-1, "gid", rng.GID())
	}
	if c.cg != nil {
		args = append(args, "cgroup", fmt.Sprintf("v%d %s", c.cg.Version(), c.cg.Group()))
	}
	d.log.Info("confinement: each QEMU runs in a mount namespace of its own (uid and cgroup as logged)", args...)
}

// kvmGroup returns the group that may open /dev/kvm, for QEMU's
// supplementary groups, and says once when a confined QEMU cannot open it.
func (d *Driver) kvmGroup() []uint32 {
	st, err := os.Stat("/dev/kvm")
	if err != nil {
		return nil
	}
	perm := st.Mode().Perm()
	sys, _ := st.Sys().(*syscall.Stat_t)
	switch {
	case perm&0o006 == 0o006:
		return nil
	case perm&0o060 == 0o060 && sys != nil && sys.Gid != 0:
		return []uint32{sys.Gid}
	}
	d.log.Warn("confinement: /dev/kvm is for root only, so confined machines cannot use KVM; make it mode 0660 with a group of its own (udev: GROUP=\"kvm\", MODE=\"0660\")", "mode", fmt.Sprintf("%o", perm))
	return nil
}

// Close lets go of the driver's uid range and cgroup group (machines still
// running keep theirs). The driver must not start machines afterwards.
func (d *Driver) Close() error {
	if d.conf == nil {
		return nil
	}
	var errs []error
	if d.conf.cg != nil {
		errs = append(errs, d.conf.cg.Close())
	}
	if d.conf.release != nil {
		errs = append(errs, d.conf.release())
	}
	return errors.Join(errs...)
}

// UIDRange returns the uids the driver's machines run as, [first,
// first+count), and ok=false when machines are not given uids of their own.
func (d *Driver) UIDRange() (first, count uint32, ok bool) {
	if d.conf == nil || d.conf.alloc == nil {
		return 0, 0, false
	}
	return d.conf.rng.First + 1, d.conf.rng.Count - 1, true
}

// UID returns the uid QEMU runs as (the worker's own when the machine is
// not confined).
func (m *Machine) UID() uint32 {
	if m.uid == 0 {
		return uint32(os.Geteuid())
	}
	return m.uid
}

// Cgroup returns the machine's cgroup directories (none when not limited).
func (m *Machine) Cgroup() []string {
	if m.cgroup == nil {
		return nil
	}
	return m.cgroup.Dirs()
}

// command returns the command that starts QEMU for l: in a jail when the
// driver confines machines (after giving m its uid, the ownership of its
// files and its cgroup, each undone by u on failure), else directly.
// extra are fds passed on as 3, 4, ….
func (d *Driver) command(m *Machine, l *launch, u *undo, bin string, args []string, extra []*os.File) (*exec.Cmd, error) {
	c := d.conf
	if c == nil {
		cmd := exec.Command(bin, args...)
		cmd.Dir = l.dir
		cmd.ExtraFiles = extra
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if !d.cfg.KeepOnExit {
			dieWithParent(cmd.SysProcAttr)
		}
		return cmd, nil
	}
	spec := jail.Spec{Path: bin, Args: append([]string{bin}, args...), Dir: l.dir, Root: c.root,
		DieWithParent: !d.cfg.KeepOnExit, ExtraFiles: extra}
	if c.alloc != nil {
		uid, err := c.alloc.Allocate()
		if err != nil {
			return nil, err
		}
		u.add("release uid", func() error { c.alloc.Release(uid); return nil })
		m.uid, m.gid = uid, c.rng.GID()
		spec.UID, spec.GID, spec.Groups = m.uid, m.gid, c.groups
		if err := d.ownFiles(m, l); err != nil {
			return nil, err
		}
	}
	if c.cg != nil {
		lim := d.limits(l.cfg)
		if l.background {
			lim.CPUWeight = backgroundCPUWeight
		}
		g, err := c.cg.Create(l.id, lim)
		if err != nil {
			return nil, err
		}
		u.add("remove cgroup", g.Remove)
		m.cgroup = g
		spec.Cgroups = g.Dirs()
	}
	spec.Binds = append(spec.Binds, jail.Bind{Path: l.dir, Writable: true})
	if m.sockDir != "" {
		spec.Binds = append(spec.Binds, jail.Bind{Path: m.sockDir, Writable: true})
	}
	if !underSystemPaths(bin) {
		spec.Binds = append(spec.Binds, jail.Bind{Path: bin})
	}
	// The base disk and the frozen layers are not bound: QEMU gets them
	// as descriptors (extra), as it gets migration streams (getfd).
	if l.cfg.Memory == MemoryPrivate && !inside(l.dir, l.cfg.MemPath) {
		// Writable because QEMU 7.2 opens it O_RDWR (see templateMemMode).
		spec.Binds = append(spec.Binds, jail.Bind{Path: l.cfg.MemPath, Writable: true})
		if err := d.shareWithMachines(l.cfg.MemPath, true); err != nil {
			return nil, err
		}
	}
	return jail.Command(spec)
}

// backgroundCPUWeight is the cpu.weight of a machine started in the
// background: a tenth of a machine in use, whose commands then come first.
const backgroundCPUWeight = 10

// Foreground gives a machine started in the background the normal share
// of CPU time. Without a cgroup (not root) there is nothing to change.
func (m *Machine) Foreground() error {
	if m.cgroup == nil {
		return nil
	}
	return m.cgroup.SetCPUWeight(jail.DefaultCPUWeight)
}

// limits are a machine's cgroup limits: its RAM plus the overhead, its
// vCPUs' worth of CPU time, and room for QEMU's threads (its I/O thread
// pool goes up to 64).
func (d *Driver) limits(cfg vmConfig) jail.Limits {
	return jail.Limits{
		MemoryBytes: int64(cfg.MemoryMB+d.cfg.MemoryOverheadMB) << 20,
		CPUs:        cfg.VCPUs,
		Pids:        int64(128 + cfg.VCPUs),
	}
}

// ownFiles sets up the ownership of m's files. The machine directory stays
// root's (mode 0710, the group may only pass through): QEMU creates nothing
// there, so it cannot put links in place of files the worker opens, links,
// chowns or reads as root (machine.json, the next overlay, a save's
// files, the console log and its tail, which the worker writes). What QEMU
// writes is made here and given to its uid: the top overlay and its RAM
// file. The socket directory (see prepareDir) is root's too, 0710: the
// worker listens there on the console socket (0660 for the group, see
// listenConsole) and checks that the peer is QEMU; QEMU makes its own
// sockets in qemuSockDir inside it, its uid's, which the worker only dials
// and checks (SO_PEERCRED). The base disk and the layers below the top are
// not QEMU's to open (descriptors); the boot files are the group's to read.
func (d *Driver) ownFiles(m *Machine, l *launch) error {
	if err := os.Chown(l.dir, 0, int(m.gid)); err != nil {
		return err
	}
	if err := os.Chmod(l.dir, 0o710); err != nil {
		return err
	}
	if m.sockDir == "" || filepath.Dir(l.cfg.QMP) != filepath.Join(m.sockDir, qemuSockDir) {
		return fmt.Errorf("machine %s has no socket directory of its own for a confined QEMU", l.id)
	}
	if err := errors.Join(os.Chown(m.sockDir, 0, int(m.gid)), os.Chmod(m.sockDir, 0o710)); err != nil {
		return err
	}
	own := filepath.Join(m.sockDir, qemuSockDir)
	if err := os.Mkdir(own, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	if err := os.Lchown(own, int(m.uid), int(m.gid)); err != nil {
		return err
	}
	var files []string
	if l.cfg.Disk != "" {
		files = append(files, l.cfg.Disk)
	}
	if l.cfg.Memory == MemoryShared && inside(l.dir, l.cfg.MemPath) {
		files = append(files, l.cfg.MemPath) // QEMU sizes an empty file itself
	}
	for _, p := range files {
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE, 0o600)
		if err != nil {
			return err
		}
		err = errors.Join(f.Chown(int(m.uid), int(m.gid)), f.Chmod(0o600))
		f.Close()
		if err != nil {
			return fmt.Errorf("give %s to uid %d: %w", p, m.uid, err)
		}
	}
	for _, p := range []string{l.cfg.Kernel, l.cfg.Initramfs} { // links to the image's or a snapshot's
		if err := d.shareWithMachines(p, false); err != nil {
			return err
		}
	}
	return nil
}

// confinesUIDs reports whether machines get uids of their own.
func (d *Driver) confinesUIDs() bool { return d.conf != nil && d.conf.alloc != nil }

// shareWithMachines lets the range's group read path (and write it when
// writable) unless everyone may already: a snapshot made under another
// range, or before confinement, becomes usable by this worker's machines.
func (d *Driver) shareWithMachines(path string, writable bool) error {
	if !d.confinesUIDs() {
		return nil
	}
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	perm := st.Mode().Perm()
	need := os.FileMode(0o040)
	if writable {
		need = 0o060
	}
	sys, _ := st.Sys().(*syscall.Stat_t)
	everyone := !writable && perm&0o004 != 0
	group := sys != nil && sys.Gid == d.conf.rng.GID() && perm&need == need
	if everyone || group {
		return nil
	}
	// Only a file the worker made (root's, of root's group or of a
	// range's) is opened up: never a host file a path led to.
	if !st.Mode().IsRegular() || sys == nil || sys.Uid != 0 || sys.Gid != 0 && !jail.InAnyRange(sys.Gid) {
		return fmt.Errorf("%s (mode %o) is not a snapshot file the machines may be given", path, perm)
	}
	if err := os.Chown(path, -1, int(d.conf.rng.GID())); err != nil {
		return fmt.Errorf("share %s with the machines' group: %w", path, err)
	}
	return os.Chmod(path, perm|need)
}

// seal gives a file a save made to root (the worker) and the range's group
// with mode when machines are confined, else to the worker with 0600.
func (d *Driver) seal(path string, mode os.FileMode) error {
	if !d.confinesUIDs() {
		return ownPrivate(path)
	}
	if err := os.Chown(path, 0, int(d.conf.rng.GID())); err != nil {
		return err
	}
	return os.Chmod(path, mode)
}

// own gives a file the worker made in m's directory (a new overlay) to m.
func (m *Machine) own(path string) error {
	if m.uid == 0 {
		return os.Chmod(path, 0o600)
	}
	return errors.Join(os.Chown(path, int(m.uid), int(m.gid)), os.Chmod(path, 0o600))
}

// releaseConfinement removes m's cgroup and gives its uid back, once its
// process is gone.
func (m *Machine) releaseConfinement() error {
	var err error
	if m.cgroup != nil {
		err = m.cgroup.Remove()
		m.cgroup = nil
	}
	if m.uid != 0 && m.d.conf != nil && m.d.conf.alloc != nil {
		m.d.conf.alloc.Release(m.uid)
	}
	return err
}

// inside reports whether path is dir or below it.
func inside(dir, path string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

func underSystemPaths(p string) bool {
	for _, s := range jail.SystemPaths {
		if inside(s, p) {
			return true
		}
	}
	return false
}
