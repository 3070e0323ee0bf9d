//go:build unix

package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// outputChunk is the most output one frame carries. The command's pipes
// are enlarged too: fewer, larger frames cost much less in an emulated guest.
const outputChunk = 256<<10 - frameHeaderSize

// outputGrace is how long a command's output may keep flowing after the
// command exited (from children it left behind holding its stdout).
const outputGrace = 500 * time.Millisecond

// command builds the command for req: /bin/sh -lc req.Command, or, when
// req.Direct, the program req.Command (found in the command's PATH inside
// the root) run with req.Args and no shell: one exec instead of a login
// shell's start-up and then the program's.
func (s *Server) command(req ExecRequest) (*exec.Cmd, error) {
	u, err := lookupUser(s.Root, req.User)
	if err != nil {
		return nil, err
	}
	env, err := s.environ(u, req.Env)
	if err != nil {
		return nil, err
	}
	var cmd *exec.Cmd
	if req.Direct {
		prog, err := lookPathIn(s.Root, envValue(env, "PATH"), req.Command)
		if err != nil {
			return nil, err
		}
		// Not exec.Command: it would look the name up in the agent's own
		// file system, not the command's root.
		cmd = &exec.Cmd{Path: prog, Args: append([]string{req.Command}, req.Args...)}
	} else {
		cmd = exec.Command("/bin/sh", "-lc", req.Command)
	}
	cmd.Env = env
	cmd.Dir = req.Cwd
	if cmd.Dir == "" {
		cmd.Dir = "/"
	}
	attr := &syscall.SysProcAttr{Setpgid: true, Chroot: s.Root}
	if int(u.uid) != os.Geteuid() || int(u.gid) != os.Getegid() || len(u.groups) > 0 {
		attr.Credential = &syscall.Credential{Uid: u.uid, Gid: u.gid, Groups: u.groups}
	}
	cmd.SysProcAttr = attr
	return cmd, nil
}

// lookPathIn finds program as the shell would in pathList (absolute
// directories only), inside root, and returns its path as seen from inside
// the root. A name with a slash is taken as it is. A symlink counts as found
// (busybox's applets are absolute symlinks, resolved by the kernel inside
// the root at exec).
func lookPathIn(root, pathList, program string) (string, error) {
	if program == "" {
		return "", errdefs.Wrap(errdefs.ErrInvalidArgument, errors.New("no program to run"))
	}
	if strings.Contains(program, "/") {
		return program, nil
	}
	if root == "" {
		root = "/"
	}
	for _, dir := range filepath.SplitList(pathList) {
		if !filepath.IsAbs(dir) {
			continue
		}
		p := filepath.Join(dir, program)
		fi, err := os.Lstat(filepath.Join(root, p))
		if err != nil {
			continue
		}
		if fi.Mode()&fs.ModeSymlink != 0 || (fi.Mode().IsRegular() && fi.Mode()&0o111 != 0) {
			return p, nil
		}
	}
	return "", errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("program %q not found in PATH %q", program, pathList))
}

// envValue is the value of key in an environ list.
func envValue(env []string, key string) string {
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, key+"="); ok {
			return v
		}
	}
	return ""
}

// environ is the env of a command: defaults, then Init's env, then the
// request's.
func (s *Server) environ(u userInfo, extra map[string]string) ([]string, error) {
	m := map[string]string{
		"PATH": DefaultPath,
		"HOME": u.home,
	}
	if u.name != "" {
		m["USER"] = u.name
		m["LOGNAME"] = u.name
	}
	s.mu.Lock()
	for k, v := range s.env {
		m[k] = v
	}
	if s.sandboxID != "" {
		m["FIRKIN_SANDBOX_ID"] = s.sandboxID
	}
	s.mu.Unlock()
	for k, v := range extra {
		if !validEnvKey(k) {
			return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("bad env name %q", k))
		}
		m[k] = v
	}
	env := make([]string, 0, len(m))
	for k, v := range m {
		env = append(env, k+"="+v)
	}
	sort.Strings(env)
	return env, nil
}

// start starts cmd and returns a channel that receives its wait status.
func (s *Server) start(cmd *exec.Cmd) (<-chan syscall.WaitStatus, error) {
	if s.Reaper != nil {
		return s.Reaper.start(cmd)
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	ch := make(chan syscall.WaitStatus, 1)
	go func() {
		_ = cmd.Wait()
		ws, _ := cmd.ProcessState.Sys().(syscall.WaitStatus)
		ch <- ws
	}()
	return ch, nil
}

// stdio are the pipes of a command's stdin, stdout and stderr.
type stdio struct {
	stdinR, stdinW, outR, outW, errR, errW *os.File
	files                                  []*os.File
}

// closeAll closes every end of the pipes.
func (p *stdio) closeAll() {
	for _, f := range p.files {
		_ = f.Close()
	}
}

// newStdio makes the three pipes of a command, the output ones enlarged.
func newStdio() (*stdio, error) {
	p := &stdio{}
	pipe := func() (*os.File, *os.File, error) {
		r, w, err := os.Pipe()
		if err == nil {
			p.files = append(p.files, r, w)
		}
		return r, w, err
	}
	var err1, err2, err3 error
	p.stdinR, p.stdinW, err1 = pipe()
	p.outR, p.outW, err2 = pipe()
	p.errR, p.errW, err3 = pipe()
	if err := errors.Join(err1, err2, err3); err != nil {
		p.closeAll()
		return nil, fmt.Errorf("pipes: %w", err)
	}
	growPipe(p.outW)
	growPipe(p.errW)
	return p, nil
}

// startError classes an error from starting a command.
func startError(err error) error {
	err = fmt.Errorf("start command: %w", err)
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) || errors.Is(err, fs.ErrPermission) {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, err)
	}
	return err
}

// exec runs one command for an exec stream. ctx is the session's: when the
// session ends, the command is killed.
func (s *Server) exec(ctx context.Context, st io.ReadWriter, req ExecRequest) {
	var wmu sync.Mutex
	send := func(typ byte, p []byte) error {
		wmu.Lock()
		defer wmu.Unlock()
		return writeFrame(st, typ, p)
	}
	// sendFramed writes a frame already laid out by readFrameFrom.
	sendFramed := func(frame []byte) error {
		wmu.Lock()
		defer wmu.Unlock()
		_, err := st.Write(frame)
		return err
	}
	t0 := time.Now()
	cmd, err := s.command(req)
	if err != nil {
		sendError(st, err)
		return
	}
	if req.Detach {
		s.execDetached(st, cmd)
		return
	}

	pid, wait, pipes, warm, err := s.startExec(req, cmd)
	if err != nil {
		sendError(st, err)
		return
	}
	defer s.refillWarmShells(req, cmd)
	closeAll, stdinW, outR, errR := pipes.closeAll, pipes.stdinW, pipes.outR, pipes.errR
	defer closeAll()
	started := time.Since(t0)
	if b, err := json.Marshal(startedMsg{PID: pid}); err == nil {
		_ = send(frameStarted, b)
	}

	var (
		pmu      sync.Mutex
		exited   bool
		timedOut atomic.Bool
	)
	kill := func() {
		pmu.Lock()
		defer pmu.Unlock()
		if !exited {
			_ = syscall.Kill(-pid, syscall.SIGKILL)
		}
	}
	finished := make(chan struct{})
	defer close(finished)
	go func() {
		select {
		case <-ctx.Done():
			kill()
		case <-finished:
		}
	}()
	if req.Timeout > 0 {
		t := time.AfterFunc(req.Timeout, func() {
			timedOut.Store(true)
			kill()
		})
		defer t.Stop()
	}

	// Host → guest frames: stdin, stdin EOF, kill. The end of the stream
	// means the host gave up: kill.
	stdin := newByteQueue()
	go func() {
		defer stdin.close()
		for {
			typ, payload, err := readFrame(st)
			if err != nil {
				kill()
				return
			}
			switch typ {
			case frameStdin:
				stdin.push(payload)
			case frameStdinEOF:
				stdin.close()
			case frameKill:
				kill()
			}
		}
	}()
	go func() {
		defer stdinW.Close()
		for {
			b, ok := stdin.pop()
			if !ok {
				return
			}
			if _, err := stdinW.Write(b); err != nil {
				stdin.discard()
				return
			}
		}
	}()

	var outWG sync.WaitGroup
	copyOut := func(r *os.File, typ byte) {
		defer outWG.Done()
		buf := make([]byte, frameHeaderSize+outputChunk)
		broken := false
		for {
			frame, n, err := readFrameFrom(r, typ, buf)
			if n > 0 && !broken {
				if sendFramed(frame) != nil {
					broken = true
					kill()
				}
			}
			if err != nil {
				return
			}
		}
	}
	outWG.Add(2)
	go copyOut(outR, frameStdout)
	go copyOut(errR, frameStderr)

	ws := <-wait
	ran := time.Since(t0)
	pmu.Lock()
	exited = true
	pmu.Unlock()
	_ = stdinW.Close()

	drained := make(chan struct{})
	go func() {
		outWG.Wait()
		close(drained)
	}()
	grace := time.NewTimer(outputGrace)
	select {
	case <-drained:
	case <-grace.C:
		// Something the command left behind holds its output open.
		_ = outR.Close()
		_ = errR.Close()
		<-drained
	}
	grace.Stop()

	if req.WarmShells {
		select {
		case <-s.refillWarmShells(req, cmd):
		case <-ctx.Done():
		}
	}
	res := resultOf(ws)
	res.PID = pid
	res.TimedOut = timedOut.Load()
	if b, err := json.Marshal(res); err == nil {
		_ = send(frameExit, b)
	}
	s.log().Debug("exec", "pid", pid, "exit", res.ExitCode, "signal", res.Signal, "timed_out", res.TimedOut,
		"warm", warm, "start", started, "exited", ran, "total", time.Since(t0))
}

// startExec starts cmd for req: in a warm shell when one fits, else as a
// new process. The parent's ends of its pipes are returned; the child's are
// closed.
func (s *Server) startExec(req ExecRequest, cmd *exec.Cmd) (pid int, wait <-chan syscall.WaitStatus, pipes *stdio, warm bool, err error) {
	if sh := s.takeWarmShell(req, cmd); sh != nil {
		return sh.pid, sh.wait, sh.pipes, true, nil
	}
	wait, pipes, err = s.startPiped(cmd)
	if err != nil {
		return 0, nil, nil, false, err
	}
	return cmd.Process.Pid, wait, pipes, false, nil
}

// startPiped starts cmd with new pipes as its stdin, stdout and stderr and
// returns the parent's ends; the child's are closed here.
func (s *Server) startPiped(cmd *exec.Cmd) (<-chan syscall.WaitStatus, *stdio, error) {
	pipes, err := newStdio()
	if err != nil {
		return nil, nil, err
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = pipes.stdinR, pipes.outW, pipes.errW
	wait, err := s.start(cmd)
	// The child has its own copies now.
	_ = pipes.stdinR.Close()
	_ = pipes.outW.Close()
	_ = pipes.errW.Close()
	if err != nil {
		pipes.closeAll()
		return nil, nil, startError(err)
	}
	return wait, pipes, nil
}

// execDetached starts cmd in the background with no stdio and reports its
// PID at once. The command outlives the session.
func (s *Server) execDetached(st io.Writer, cmd *exec.Cmd) {
	cmd.SysProcAttr.Setpgid = false
	cmd.SysProcAttr.Setsid = true
	wait, err := s.start(cmd)
	if err != nil {
		sendError(st, startError(err))
		return
	}
	pid := cmd.Process.Pid
	go func() { <-wait }()
	_ = writeJSONFrame(st, frameExit, ExecResult{PID: pid})
}

// resultOf turns a wait status into an ExecResult. A command ended by a
// signal gets exit code 128+signal, as a shell reports it.
func resultOf(ws syscall.WaitStatus) ExecResult {
	switch {
	case ws.Exited():
		return ExecResult{ExitCode: ws.ExitStatus()}
	case ws.Signaled():
		sig := ws.Signal()
		return ExecResult{ExitCode: 128 + int(sig), Signal: sig.String()}
	default:
		return ExecResult{ExitCode: -1}
	}
}

// byteQueue is an unbounded FIFO of byte slices between a producer that must
// never block (the frame reader) and a consumer that may (a stdin pipe).
type byteQueue struct {
	mu       sync.Mutex
	cond     *sync.Cond
	items    [][]byte
	closed   bool
	dropping bool
}

func newByteQueue() *byteQueue {
	q := &byteQueue{}
	q.cond = sync.NewCond(&q.mu)
	return q
}

func (q *byteQueue) push(b []byte) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed || q.dropping {
		return
	}
	q.items = append(q.items, b)
	q.cond.Signal()
}

func (q *byteQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.cond.Broadcast()
	q.mu.Unlock()
}

// discard drops what is queued and what comes later.
func (q *byteQueue) discard() {
	q.mu.Lock()
	q.dropping = true
	q.items = nil
	q.mu.Unlock()
}

// pop returns the next item; ok is false once the queue is closed and empty.
func (q *byteQueue) pop() ([]byte, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for len(q.items) == 0 && !q.closed {
		q.cond.Wait()
	}
	if len(q.items) == 0 {
		return nil, false
	}
	b := q.items[0]
	q.items[0] = nil
	q.items = q.items[1:]
	return b, true
}
