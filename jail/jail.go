// Package jail confines a hypervisor process: a uid of its own (from a
// range of uids claimed per worker), cgroups limiting its memory, CPU and
// pids, and a mount namespace whose root holds only what it needs.
//
// A jailed process is started through a re-exec of the calling binary
// (docker's pkg/reexec pattern): Command returns an *exec.Cmd for
// /proc/self/exe in a new mount namespace, with the Spec in the
// environment. That process's Main builds the new root on a tmpfs
// (read-only binds of /usr and the library directories, a few device
// nodes, the machine's directories), joins the cgroups, pivots into the
// root, drops to the uid and group, sets no_new_privs (and the parent-death
// signal again, which the uid change cleared), closes every descriptor but
// stdio and the ones passed on, and execs the program: the same pid, so
// callers can keep the pid they started.
//
// Every binary that starts jailed processes must call Main first thing in
// main (and in TestMain of test packages that start them).
package jail

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
)

// specEnv carries a jail's Spec (JSON) to the re-executed binary; its
// presence is what makes Main take over.
const specEnv = "_FIRKIN_JAIL_SPEC"

// Argv0 is the argv[0] of a jail process before it execs its program.
const Argv0 = "firkin-jail"

// ExitSetup is the exit status of a jail process whose set-up failed before
// the exec; its stderr then has one line saying why.
const ExitSetup = 121

// Spec is what a jailed process is started with.
type Spec struct {
	// Path is the program to exec and Args its argv (Args[0] included).
	Path string   `json:"path"`
	Args []string `json:"args"`
	// Dir is the working directory inside the jail.
	Dir string `json:"dir"`
	// Root is an existing empty directory the new root's tmpfs is mounted
	// on (in the jail's own mount namespace; the host never sees it).
	Root string `json:"root"`
	// Binds are the paths visible in the jail, at the same absolute path,
	// besides the system ones (SystemPaths, Devices).
	Binds []Bind `json:"binds"`
	// UID and GID the program runs as; 0 keeps the caller's.
	UID uint32 `json:"uid"`
	GID uint32 `json:"gid"`
	// Groups are supplementary groups besides GID (the group of /dev/kvm).
	Groups []uint32 `json:"groups,omitempty"`
	// Cgroups are cgroup directories the process joins before it execs.
	Cgroups []string `json:"cgroups,omitempty"`
	// DieWithParent gives the process SIGKILL when the thread that started
	// it exits (set on the process and again after the uid change).
	DieWithParent bool `json:"die_with_parent"`
	// ParentPID is filled in by Command: a jail whose parent is already
	// gone when it sets the parent-death signal exits.
	ParentPID int `json:"parent_pid"`
	// ExtraFiles are passed on as fds 3, 4, … (exec.Cmd.ExtraFiles).
	ExtraFiles []*os.File `json:"-"`
	NumExtra   int        `json:"num_extra"`
}

// Bind is a path of the host visible in the jail.
type Bind struct {
	Path     string `json:"path"`
	Writable bool   `json:"writable,omitempty"`
}

// SystemPaths are bound read-only when they exist (or recreated as the same
// symlink when they are one, as on merged-/usr systems): what a dynamically
// linked program and QEMU's firmware (/usr/share/qemu, /usr/share/seabios)
// need.
var SystemPaths = []string{"/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc/ld.so.cache"}

// ResolvConf is the host's resolver configuration, which every jail gets
// read-only at the same path (see buildRoot): QEMU's user-mode network
// (slirp) reads it to learn where the guest's DNS server (10.0.2.3) goes,
// and drops the guest's DNS without one. Which nameserver it names matters
// little where the worker's network guard runs: that redirects every DNS
// packet of the machines' uids to its own proxy. A symbolic link (as to
// systemd-resolved's stub file) is followed on the host and its target
// bound, since the link would dangle in the jail.
const ResolvConf = "/etc/resolv.conf"

// FallbackNameserver is the nameserver of the ResolvConf a jail gets when
// the host has none (or its link dangles): 127.0.0.1, the resolver the C
// library (and the network guard's proxy) assume without one.
const FallbackNameserver = "127.0.0.1"

// resolvedFile returns the regular file p is or links to, and false when
// there is none.
func resolvedFile(p string) (string, bool) {
	src, err := filepath.EvalSymlinks(p)
	if err != nil {
		return "", false
	}
	st, err := os.Stat(src)
	if err != nil || !st.Mode().IsRegular() {
		return "", false
	}
	return src, true
}

// Devices are the device nodes bound into the jail when they exist.
var Devices = []string{"/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/dev/kvm"}

// Validate checks the spec.
func (s *Spec) Validate() error {
	var errs []error
	if !filepath.IsAbs(s.Path) {
		errs = append(errs, fmt.Errorf("program %q is not an absolute path", s.Path))
	}
	if len(s.Args) == 0 {
		errs = append(errs, errors.New("no argv"))
	}
	for what, p := range map[string]string{"root": s.Root, "dir": s.Dir} {
		if !filepath.IsAbs(p) || filepath.Clean(p) != p {
			errs = append(errs, fmt.Errorf("%s %q is not a clean absolute path", what, p))
		}
	}
	for _, b := range s.Binds {
		if !filepath.IsAbs(b.Path) || filepath.Clean(b.Path) != b.Path || b.Path == "/" {
			errs = append(errs, fmt.Errorf("bind %q is not a clean absolute path below /", b.Path))
		}
	}
	if (s.UID == 0) != (s.GID == 0) {
		errs = append(errs, errors.New("uid and gid go together"))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("jail: spec: %w", err)
	}
	return nil
}

// Main runs the jail set-up and execs the program when this process was
// started by Command; otherwise it returns at once. It never returns in a
// jail process: on failure it writes one line to stderr and exits with
// ExitSetup.
func Main() {
	v, ok := os.LookupEnv(specEnv)
	if !ok {
		mainCalled.Store(true)
		return
	}
	os.Unsetenv(specEnv)
	if err := run(v); err != nil {
		fmt.Fprintf(os.Stderr, "firkin-jail: %s\n", strings.ReplaceAll(err.Error(), "\n", " "))
		os.Exit(ExitSetup)
	}
	os.Exit(ExitSetup) // run returns only on failure
}

// mainCalled records that Main ran (and returned) in this process.
var mainCalled atomic.Bool

// Ready reports whether this process called Main: only then can it start
// jails (a binary that does not call Main would run its own main again in
// every jail process it starts).
func Ready() bool { return mainCalled.Load() }

// environ returns the caller's environment without a jail spec.
func environ() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, specEnv+"=") {
			env = append(env, kv)
		}
	}
	return env
}
