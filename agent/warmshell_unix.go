//go:build unix

package agent

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Warm shells: an exec of a command line costs a fork and an exec of a
// login shell, its start-up, and only then the command; under TCG that is
// most of an exec's time in the guest. The agent keeps a few login shells
// started ahead of time, each blocked reading, from a pipe on its fd 3, the
// script it will run. An exec whose command line would run in such a shell
// exactly as in a new one (same environment, root, user; no extra env)
// takes one and hands it its command: a builtin like echo then runs with no
// process created at all. A taken shell is replaced in the background, at
// the lowest priority, once the exec that took it has ended.

// warmShellCount is how many shells are kept started per agent.
const warmShellCount = 2

// maxWarmScript is the longest script handed to a warm shell: it is
// written into the pipe's buffer in one go. Longer commands start a shell
// of their own.
const maxWarmScript = 16 << 10

// warmShellScript is what a warm shell runs: its command, read from fd 3
// once the agent writes it and closes the pipe.
const warmShellScript = ". /proc/self/fd/3"

// warmShell is a login shell waiting for its command on ctl.
type warmShell struct {
	key    string // what it was started with (env, root, credential)
	pid    int
	wait   <-chan syscall.WaitStatus
	pipes  *stdio
	ctl    *os.File // write end of the pipe the shell reads its script from
	exited bool     // its status was taken from wait: the pid is not its own any more
}

// gone says whether the shell has exited (killed from inside the guest,
// say) and been reaped. Its pid may then belong to another process.
func (w *warmShell) gone() bool {
	if w.exited {
		return true
	}
	select {
	case <-w.wait:
		w.exited = true
	default:
	}
	return w.exited
}

// warmShells are the started shells of one Server.
type warmShells struct {
	mu      sync.Mutex
	idle    []*warmShell
	filling bool
	filled  chan struct{} // closed when the running refill ends
	closed  bool          // the server has stopped: no more shells
}

// closedChan is returned when there is nothing to wait for.
var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// sandboxIDVar is set by the script, not in a warm shell's environment:
// a shell started before the machine was handed to another sandbox (a
// warm pool machine, a restored snapshot) stays usable. It is the one
// difference from a new /bin/sh -lc: the login profiles ran before it
// was set.
const sandboxIDVar = "FIRKIN_SANDBOX_ID"

// splitSandboxID returns env without sandboxIDVar, and its value.
func splitSandboxID(env []string) (rest []string, id string, ok bool) {
	rest = make([]string, 0, len(env))
	for _, kv := range env {
		if v, found := strings.CutPrefix(kv, sandboxIDVar+"="); found {
			id, ok = v, true
			continue
		}
		rest = append(rest, kv)
	}
	return rest, id, ok
}

// openCommandRoot opens the root cmd runs in (its chroot, else "/"):
// paths looked up through it resolve symlinks as the command sees them.
func openCommandRoot(cmd *exec.Cmd) (*os.Root, error) {
	root := "/"
	if cmd.SysProcAttr != nil && cmd.SysProcAttr.Chroot != "" {
		root = cmd.SysProcAttr.Chroot
	}
	return os.OpenRoot(root)
}

// shellKey is what decides whether a warm shell runs cmd as a new
// /bin/sh -lc would: its environment (but sandboxIDVar), root and
// credential, and the login profiles it read in root, cmd's root (a profile
// edited since it started makes it stale).
func shellKey(root *os.Root, cmd *exec.Cmd) string {
	var b strings.Builder
	for _, p := range []string{"etc/profile", strings.TrimPrefix(envValue(cmd.Env, "HOME")+"/.profile", "/")} {
		if fi, err := root.Stat(p); err == nil {
			fmt.Fprintf(&b, "%s %d %d;", p, fi.Size(), fi.ModTime().UnixNano())
		}
	}
	b.WriteByte(0)
	if a := cmd.SysProcAttr; a != nil {
		b.WriteString(a.Chroot)
		b.WriteByte(0)
		if c := a.Credential; c != nil {
			fmt.Fprintf(&b, "%d:%d:%v", c.Uid, c.Gid, c.Groups)
		}
		b.WriteByte(0)
	}
	env, _, _ := splitSandboxID(cmd.Env)
	for _, kv := range env {
		b.WriteString(kv)
		b.WriteByte(0)
	}
	return b.String()
}

// warmEligible says whether req may run in a warm shell: a command line
// for the default user with no env of its own (the request's env is set
// before the login shell's profile runs, which a started shell has done
// already), no NUL (a new shell would refuse it) and short enough.
func warmEligible(req ExecRequest) bool {
	return !req.Direct && !req.Detach && req.User == "" && len(req.Env) == 0 &&
		len(req.Command) <= maxWarmScript-4096 && strings.IndexByte(req.Command, 0) < 0
}

// shellQuote quotes s for a POSIX shell.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// warmScript is the script a warm shell runs for command in dir: close the
// command pipe, reseed $RANDOM where the shell has one (it was seeded
// before the machine got its own entropy: every sandbox restored from one
// snapshot would draw the same numbers), set the sandbox id (env is the
// command's), change to dir, run command. Nothing follows the command: a
// trailing backslash or an open here-document ends as in sh -c.
func warmScript(env []string, dir, command string, seed uint16) string {
	var b strings.Builder
	b.WriteString("exec 3<&-\n")
	b.WriteString(`if [ -n "${RANDOM+x}" ]; then RANDOM=` + strconv.Itoa(int(seed)) + "; fi\n")
	if _, id, ok := splitSandboxID(env); ok {
		b.WriteString("export " + sandboxIDVar + "=" + shellQuote(id) + "\n")
	}
	if dir != "/" {
		b.WriteString("cd -- " + shellQuote(dir) + " || exit 1\n")
	}
	b.WriteString(command)
	return b.String()
}

// randomSeed is a seed for a warm shell's $RANDOM.
func randomSeed() uint16 {
	var b [2]byte
	_, _ = rand.Read(b[:])
	return binary.LittleEndian.Uint16(b[:])
}

// takeWarmShell hands cmd's command line to a warm shell started like cmd
// and returns it, or nil when there is none (the caller starts cmd as
// usual). Shells started for another environment are stopped.
func (s *Server) takeWarmShell(req ExecRequest, cmd *exec.Cmd) *warmShell {
	s.warm.mu.Lock()
	none := len(s.warm.idle) == 0
	s.warm.mu.Unlock()
	if none || !warmEligible(req) {
		return nil
	}
	root, err := openCommandRoot(cmd)
	if err != nil {
		return nil
	}
	// A missing cwd is left to the normal start, which reports it as the
	// error it is (the warm shell's cd would only print it).
	if cmd.Dir != "/" {
		if fi, err := root.Stat(strings.TrimPrefix(cmd.Dir, "/")); err != nil || !fi.IsDir() {
			_ = root.Close()
			return nil
		}
	}
	key := shellKey(root, cmd)
	_ = root.Close()
	var sh *warmShell
	var stale []*warmShell
	for sh == nil {
		s.warm.mu.Lock()
		if len(s.warm.idle) == 0 {
			s.warm.mu.Unlock()
			break
		}
		w := s.warm.idle[0]
		s.warm.idle = s.warm.idle[1:]
		s.warm.mu.Unlock()
		// A shell killed from inside the guest is gone: a child of its
		// profile may still hold its pipe, so the write would not tell.
		if w.key == key && !w.gone() {
			sh = w
		} else {
			stale = append(stale, w)
		}
	}
	if len(stale) > 0 {
		go func() {
			for _, w := range stale {
				w.stop()
			}
		}()
	}
	if sh == nil {
		return nil
	}
	// Back to the normal priority before the command runs, so that what it
	// starts does not inherit the start-up's.
	_ = unix.Setpriority(unix.PRIO_PROCESS, sh.pid, 0)
	_, err = sh.ctl.WriteString(warmScript(cmd.Env, cmd.Dir, req.Command, randomSeed()))
	cerr := sh.ctl.Close()
	if err != nil || cerr != nil {
		// The shell is gone (killed from inside the guest, say): start anew.
		sh.stop()
		return nil
	}
	return sh
}

// refillWarmShells starts warm shells like cmd until there are
// warmShellCount, unless a refill already runs; the channel is closed when
// the refill (this one or the running one) ends.
func (s *Server) refillWarmShells(req ExecRequest, cmd *exec.Cmd) <-chan struct{} {
	if !warmEligible(req) {
		return closedChan
	}
	s.warm.mu.Lock()
	if s.warm.filling {
		filled := s.warm.filled
		s.warm.mu.Unlock()
		return filled
	}
	if s.warm.closed || len(s.warm.idle) >= warmShellCount {
		s.warm.mu.Unlock()
		return closedChan
	}
	filled := make(chan struct{})
	s.warm.filling, s.warm.filled = true, filled
	s.warm.mu.Unlock()
	go func() {
		defer func() {
			s.warm.mu.Lock()
			s.warm.filling = false
			s.warm.mu.Unlock()
			close(filled)
		}()
		root, err := openCommandRoot(cmd)
		if err != nil {
			return
		}
		key := shellKey(root, cmd)
		_ = root.Close()
		for range warmShellCount {
			s.warm.mu.Lock()
			full := len(s.warm.idle) >= warmShellCount
			s.warm.mu.Unlock()
			if full {
				return
			}
			w, err := s.startWarmShell(cmd, key)
			if err != nil {
				s.log().Debug("warm shell", "err", err)
				return
			}
			s.warm.mu.Lock()
			closed := s.warm.closed
			if !closed {
				s.warm.idle = append(s.warm.idle, w)
			}
			s.warm.mu.Unlock()
			if closed {
				w.stop()
				return
			}
		}
	}()
	return filled
}

// startWarmShell starts a login shell like cmd that waits for its script.
func (s *Server) startWarmShell(like *exec.Cmd, key string) (*warmShell, error) {
	ctlR, ctlW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("pipes: %w", err)
	}
	attr := *like.SysProcAttr
	cmd := exec.Command("/bin/sh", "-lc", warmShellScript)
	cmd.Env, _, _ = splitSandboxID(like.Env)
	cmd.Dir = "/"
	cmd.SysProcAttr = &attr
	cmd.ExtraFiles = []*os.File{ctlR}
	wait, pipes, err := s.startPiped(cmd)
	_ = ctlR.Close()
	if err != nil {
		_ = ctlW.Close()
		return nil, err
	}
	pid := cmd.Process.Pid
	// Its start-up (the profile) yields to everything else.
	_ = unix.Setpriority(unix.PRIO_PROCESS, pid, 19)
	return &warmShell{key: key, pid: pid, wait: wait, pipes: pipes, ctl: ctlW}, nil
}

// stop ends an unused warm shell and releases its pipes. A shell that is
// gone already is not signalled: its pid may be another's by now.
func (w *warmShell) stop() {
	_ = w.ctl.Close()
	if !w.gone() {
		_ = syscall.Kill(-w.pid, syscall.SIGKILL)
		<-w.wait
		w.exited = true
	}
	w.pipes.closeAll()
}

// stopWarmShells stops every unused warm shell, for good.
func (s *Server) stopWarmShells() {
	s.warm.mu.Lock()
	idle := s.warm.idle
	s.warm.idle = nil
	s.warm.closed = true
	s.warm.mu.Unlock()
	for _, w := range idle {
		w.stop()
	}
}
