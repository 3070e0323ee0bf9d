package jail

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// Command returns the command that starts spec's program in a jail: this
// binary re-executed (its Main does the set-up) in a new mount namespace,
// in a process group of its own, with SIGKILL on parent death when
// spec.DieWithParent. The caller sets Stdout and Stderr; fds to pass on go
// in spec.ExtraFiles (not cmd.ExtraFiles: the jail closes what it was not
// told about).
func Command(spec Spec) (*exec.Cmd, error) {
	if !Ready() {
		return nil, errors.New("jail: this binary did not call jail.Main first thing in main (or TestMain)")
	}
	spec.ParentPID = os.Getpid()
	spec.NumExtra = len(spec.ExtraFiles)
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	b, err := json.Marshal(spec)
	if err != nil {
		return nil, fmt.Errorf("jail: spec: %w", err)
	}
	cmd := &exec.Cmd{
		Path:       "/proc/self/exe",
		Args:       []string{Argv0},
		Env:        append(environ(), specEnv+"="+string(b)),
		ExtraFiles: spec.ExtraFiles,
		SysProcAttr: &syscall.SysProcAttr{
			Unshareflags: syscall.CLONE_NEWNS,
			Setpgid:      true,
		},
	}
	if spec.DieWithParent {
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	}
	return cmd, nil
}

// Probe starts a jail that runs /bin/true as uid and gid with nothing
// bound, and reports why it failed (nil when the host allows jails).
func Probe(root string, uid, gid uint32) error {
	cmd, err := Command(Spec{Path: "/bin/true", Args: []string{"true"}, Dir: "/", Root: root, UID: uid, GID: gid, DieWithParent: true})
	if err != nil {
		return err
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("jail: probe: %w: %s", err, bytes.TrimSpace(out))
	}
	return nil
}

// step runs one named set-up step.
func step(name string, err error) error {
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

// run is the jail process: set up, then exec. It returns only on failure.
func run(encoded string) error {
	// no_new_privs and the parent-death signal belong to the thread that
	// execs: stay on one.
	runtime.LockOSThread()
	var s Spec
	if err := json.Unmarshal([]byte(encoded), &s); err != nil {
		return step("read spec", err)
	}
	if err := s.Validate(); err != nil {
		return err
	}
	// Only stdio and the fds passed on reach the program (before the
	// pivot: the fallback reads /proc).
	if err := step("close fds", closeFrom(3+s.NumExtra)); err != nil {
		return err
	}
	// Nothing mounted here may reach the host's namespace.
	if err := step("make mounts private", unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, "")); err != nil {
		return err
	}
	if err := step("join cgroups", Join(s.Cgroups)); err != nil {
		return err
	}
	if err := buildRoot(&s); err != nil {
		return err
	}
	if err := pivot(s.Root); err != nil {
		return err
	}
	if err := step("chdir", unix.Chdir(s.Dir)); err != nil {
		return err
	}
	if s.UID != 0 {
		groups := []int{int(s.GID)}
		for _, g := range s.Groups {
			groups = append(groups, int(g))
		}
		if err := step("setgroups", syscall.Setgroups(groups)); err != nil {
			return err
		}
		if err := step("setresgid", syscall.Setresgid(int(s.GID), int(s.GID), int(s.GID))); err != nil {
			return err
		}
		if err := step("setresuid", syscall.Setresuid(int(s.UID), int(s.UID), int(s.UID))); err != nil {
			return err
		}
	}
	if err := step("no_new_privs", unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)); err != nil {
		return err
	}
	if s.DieWithParent {
		// A uid change clears the parent-death signal: set it again, then
		// make sure the parent did not die before it was set.
		if err := step("parent-death signal", unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(unix.SIGKILL), 0, 0, 0)); err != nil {
			return err
		}
		if os.Getppid() != s.ParentPID {
			return errors.New("parent-death signal: the parent is gone")
		}
	}
	return step("exec "+s.Path, syscall.Exec(s.Path, s.Args, environ()))
}

// buildRoot mounts a tmpfs on s.Root and binds the system paths, devices
// and s.Binds into it.
func buildRoot(s *Spec) error {
	if err := os.MkdirAll(s.Root, 0o700); err != nil {
		return step("make root", err)
	}
	if err := unix.Mount("firkin-jail", s.Root, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0755,size=1m,nr_inodes=4096"); err != nil {
		return step("mount root tmpfs", err)
	}
	for _, p := range SystemPaths {
		st, err := os.Lstat(p)
		if err != nil {
			continue
		}
		if st.Mode()&os.ModeSymlink != 0 { // merged /usr: /lib -> usr/lib
			target, err := os.Readlink(p)
			if err != nil {
				return step("read link "+p, err)
			}
			if err := mkParents(s.Root, p); err != nil {
				return err
			}
			if err := os.Symlink(target, filepath.Join(s.Root, p)); err != nil {
				return step("link "+p, err)
			}
			continue
		}
		if err := bind(s.Root, p, false, unix.MS_NOSUID|unix.MS_NODEV); err != nil {
			return err
		}
	}
	if err := resolvConf(s.Root); err != nil {
		return err
	}
	// A procfs of its own: only the pid directories (subset=pid) of its
	// own uid (hidepid=invisible), so QEMU finds /proc/self and nothing else.
	if err := os.Mkdir(filepath.Join(s.Root, "proc"), 0o555); err != nil {
		return step("mount /proc", err)
	}
	if err := unix.Mount("proc", filepath.Join(s.Root, "proc"), "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "hidepid=invisible,subset=pid"); err != nil {
		return step("mount /proc", err)
	}
	for _, p := range Devices {
		if _, err := os.Stat(p); err != nil {
			continue
		}
		if err := bind(s.Root, p, true, unix.MS_NOSUID|unix.MS_NOEXEC); err != nil {
			return err
		}
	}
	// Parents first, so a bind inside another one lands on top of it.
	binds := slices.Clone(s.Binds)
	slices.SortFunc(binds, func(a, b Bind) int { return len(a.Path) - len(b.Path) })
	for _, b := range binds {
		if err := bind(s.Root, b.Path, b.Writable, unix.MS_NOSUID|unix.MS_NODEV); err != nil {
			return err
		}
	}
	return nil
}

// resolvConf puts the host's ResolvConf at the same path in root: the file
// it resolves to (a link like /etc/resolv.conf ->
// /run/systemd/resolve/stub-resolv.conf would dangle in the jail) bound
// read-only, or, when the host has none, a file naming FallbackNameserver.
func resolvConf(root string) error {
	dst := filepath.Join(root, ResolvConf)
	if err := mkParents(root, ResolvConf); err != nil {
		return err
	}
	src, ok := resolvedFile(ResolvConf)
	if !ok {
		return step("write "+ResolvConf, os.WriteFile(dst, []byte("nameserver "+FallbackNameserver+"\n"), 0o644))
	}
	if err := step("bind "+ResolvConf, os.WriteFile(dst, nil, 0o644)); err != nil {
		return err
	}
	if err := unix.Mount(src, dst, "", unix.MS_BIND, ""); err != nil {
		return step("bind "+ResolvConf, err)
	}
	flags := uintptr(unix.MS_REMOUNT | unix.MS_BIND | unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC)
	return step("remount "+ResolvConf, unix.Mount("", dst, "", flags, ""))
}

// mkParents makes the parent directories of p inside root.
func mkParents(root, p string) error {
	return step("make "+filepath.Dir(p), os.MkdirAll(filepath.Join(root, filepath.Dir(p)), 0o755))
}

// bind mounts host path p at the same path inside root, read-only unless
// writable, with flags.
func bind(root, p string, writable bool, flags uintptr) error {
	st, err := os.Stat(p)
	if err != nil {
		return step("bind "+p, err)
	}
	dst := filepath.Join(root, p)
	if err := mkParents(root, p); err != nil {
		return err
	}
	if st.IsDir() {
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return step("bind "+p, err)
		}
	} else if _, err := os.Stat(dst); err != nil {
		f, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY, 0o644)
		if err != nil {
			return step("bind "+p, err)
		}
		f.Close()
	}
	if err := unix.Mount(p, dst, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return step("bind "+p, err)
	}
	// The bind's own flags are set by a remount.
	if !writable {
		flags |= unix.MS_RDONLY
	}
	if err := unix.Mount("", dst, "", unix.MS_REMOUNT|unix.MS_BIND|flags, ""); err != nil {
		return step("remount "+p, err)
	}
	return nil
}

// pivot makes root the root of the mount namespace, drops the old one and
// makes the root's own tmpfs read-only.
func pivot(root string) error {
	old := filepath.Join(root, ".old")
	if err := os.Mkdir(old, 0o700); err != nil {
		return step("pivot_root", err)
	}
	if err := unix.PivotRoot(root, old); err != nil {
		return step("pivot_root", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return step("pivot_root", err)
	}
	if err := unix.Unmount("/.old", unix.MNT_DETACH); err != nil {
		return step("detach old root", err)
	}
	if err := os.Remove("/.old"); err != nil {
		return step("detach old root", err)
	}
	if err := unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		return step("read-only root", err)
	}
	return nil
}

// closeFrom marks every fd from first on close-on-exec.
func closeFrom(first int) error {
	if err := unix.CloseRange(uint(first), ^uint(0), unix.CLOSE_RANGE_CLOEXEC); err == nil {
		return nil
	}
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return err
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd < first {
			continue
		}
		unix.CloseOnExec(fd)
	}
	return nil
}
