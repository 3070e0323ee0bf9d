//go:build unix

package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/creack/pty"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// stdinWriteTimeout bounds one write to a process's stdin: a process that
// does not read its stdin makes proc_stdin fail rather than hang.
const stdinWriteTimeout = 30 * time.Second

// procTable is the guest's table of processes started by proc_start. The
// zero value is ready to use.
type procTable struct {
	mu    sync.Mutex
	procs map[string]*guestProc
	// retained is the sent output all its processes keep.
	retained atomic.Int64
}

// guestProc is one process of the table.
type guestProc struct {
	id, command, tag string
	pid              int
	isPTY            bool
	started          time.Time

	stdinMu sync.Mutex
	stdin   *os.File // the pipe's write end, or the PTY master; nil once closed
	ptmx    *os.File // the PTY master (also an output), nil without a PTY

	mu       sync.Mutex
	cond     *sync.Cond
	waiter   *procWaiter // who takes output now; nil: output waits
	exited   bool
	res      ExecResult
	outputs  int           // output readers still running
	outs     []*os.File    // the output ends
	reading  int           // output readers blocked in a read
	chunks   uint64        // chunks read so far
	drained  chan struct{} // closed when the process exited and every output reader finished
	taken    bool          // an exit was delivered to a waiter
	finished time.Time

	// Output frames in order, numbered from base: the current waiter sends
	// frame next. Sent frames stay (up to retainBytes) because a frame the
	// guest wrote may still be in flight when its waiter goes (a snapshot's
	// quiesce ends the session): a new waiter that says how much it has
	// (ProcOffsets) gets those again.
	frames   []procFrame
	base     uint64
	next     uint64
	retained int
	queued   ProcOffsets   // bytes of each stream queued so far
	budget   *atomic.Int64 // the table's retained
	table    *procTable
}

// procFrame is one output frame and where its data starts in its stream.
type procFrame struct {
	frame []byte // header and data
	off   int64
}

// How much sent output processes keep for a new waiter. In flight can be
// up to the host's stream window (4 MiB, see protocol.go): one process
// keeps that much and a little more; once the processes together keep more
// than guestRetainBytes, the others are cut to minRetainBytes each (the
// window a stream starts with), so the guest keeps at most about
// retainBytes + MaxProcs × minRetainBytes (36 MiB). What a new waiter
// lacks beyond what is kept is reported as lost (ProcCursor.Lost), never
// sent in the wrong place.
const (
	retainBytes      = 4<<20 + 256<<10
	minRetainBytes   = 256 << 10
	guestRetainBytes = 16 << 20
	retainFrames     = 8192
)

// procWaiter is one proc_wait stream.
type procWaiter struct {
	mu   sync.Mutex // serialises frames
	st   io.Writer
	gone chan struct{}
	once sync.Once
}

func (w *procWaiter) write(frame []byte) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	select {
	case <-w.gone:
		return io.ErrClosedPipe
	default:
	}
	_, err := w.st.Write(frame)
	return err
}

func (w *procWaiter) end() { w.once.Do(func() { close(w.gone) }) }

func (t *procTable) get(id string) (*guestProc, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	p, ok := t.procs[id]
	if !ok {
		return nil, errdefs.Wrap(errdefs.ErrNotFound, fmt.Errorf("no process %q", id))
	}
	return p, nil
}

// add registers p, evicting the oldest finished processes (those whose
// exit was taken first) when the table is full.
func (t *procTable) add(p *guestProc) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.procs == nil {
		t.procs = map[string]*guestProc{}
	}
	if _, ok := t.procs[p.id]; ok {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("process %q exists", p.id))
	}
	running := 0
	var done []*guestProc
	for _, q := range t.procs {
		q.mu.Lock()
		if q.exited {
			done = append(done, q)
		} else {
			running++
		}
		q.mu.Unlock()
	}
	if running >= maxRunningProcs {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("%d processes running, at most %d", running, maxRunningProcs))
	}
	sort.Slice(done, func(i, j int) bool {
		if done[i].taken != done[j].taken {
			return done[i].taken
		}
		return done[i].finished.Before(done[j].finished)
	})
	for i := 0; len(t.procs) >= MaxProcs && i < len(done); i++ {
		q := done[i]
		q.mu.Lock()
		q.releaseAllLocked()
		q.mu.Unlock()
		delete(t.procs, q.id)
	}
	p.budget, p.table = &t.retained, t
	t.procs[p.id] = p
	return nil
}

// trimOthers, while the table keeps more than guestRetainBytes, cuts
// what the other processes keep down to minRetainBytes each, oldest
// first. It takes one process lock at a time.
func (t *procTable) trimOthers(except *guestProc) {
	if t.retained.Load() <= guestRetainBytes {
		return
	}
	for _, q := range t.list() {
		if q == except {
			continue
		}
		q.mu.Lock()
		q.trimToLocked(minRetainBytes)
		q.mu.Unlock()
		if t.retained.Load() <= guestRetainBytes {
			return
		}
	}
}

func (t *procTable) list() []*guestProc {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]*guestProc, 0, len(t.procs))
	for _, p := range t.procs {
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].started.Before(out[j].started) })
	return out
}

// procStart serves proc_start.
func (s *Server) procStart(st io.Writer, req ProcStartRequest) {
	if !validProcID(req.ID) {
		sendError(st, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("proc_start: bad id %q", req.ID)))
		return
	}
	if req.PTY != nil && (req.PTY.Cols == 0 || req.PTY.Rows == 0) {
		sendError(st, errdefs.Wrap(errdefs.ErrInvalidArgument, errors.New("proc_start: pty size must not be 0")))
		return
	}
	ereq := ExecRequest{Command: req.Command, Args: req.Args, Direct: len(req.Args) > 0, Env: req.Env, Cwd: req.Cwd, User: req.User}
	cmd, err := s.command(ereq)
	if err != nil {
		sendError(st, err)
		return
	}
	p := &guestProc{id: req.ID, command: req.Command, tag: req.Tag, isPTY: req.PTY != nil, started: time.Now(), drained: make(chan struct{})}
	p.cond = sync.NewCond(&p.mu)
	if len(req.Args) > 0 {
		for _, a := range req.Args {
			p.command += " " + a
		}
	}
	if len(p.command) > maxProcInfoField {
		p.command = p.command[:maxProcInfoField]
	}
	if len(p.tag) > maxProcInfoField {
		p.tag = p.tag[:maxProcInfoField]
	}
	if err := s.procs.add(p); err != nil {
		sendError(st, err)
		return
	}
	// The table lists p already: its fields are set under its locks.
	p.stdinMu.Lock()
	p.mu.Lock()
	outputs, pid, wait, err := s.startProc(ereq, cmd, p, req.PTY)
	if err == nil {
		p.pid = pid
		p.outputs = len(outputs)
		for _, o := range outputs {
			p.outs = append(p.outs, o.f)
		}
	}
	p.mu.Unlock()
	p.stdinMu.Unlock()
	if err != nil {
		s.procs.mu.Lock()
		delete(s.procs.procs, p.id)
		s.procs.mu.Unlock()
		sendError(st, err)
		return
	}
	for _, o := range outputs {
		go p.pump(o.f, o.typ)
	}
	go p.reap(wait, req.Timeout)
	_ = writeJSONFrame(st, frameOK, startedMsg{PID: p.pid})
	if req.PTY == nil {
		s.refillWarmShells(ereq, cmd)
	}
	s.log().Debug("process started", "id", p.id, "pid", p.pid, "pty", p.isPTY)
}

type procOutput struct {
	f   *os.File
	typ byte
}

// startProc starts cmd (built for req) with a PTY, or with pipes (in a warm
// shell when one fits), and returns its output ends and pid.
func (s *Server) startProc(req ExecRequest, cmd *exec.Cmd, p *guestProc, size *PTYSize) ([]procOutput, int, <-chan syscall.WaitStatus, error) {
	if size != nil {
		ptmx, tty, err := pty.Open()
		if err != nil {
			return nil, 0, nil, fmt.Errorf("open pty: %w", err)
		}
		if err := pty.Setsize(ptmx, &pty.Winsize{Cols: size.Cols, Rows: size.Rows}); err != nil {
			_ = ptmx.Close()
			_ = tty.Close()
			return nil, 0, nil, fmt.Errorf("pty size: %w", err)
		}
		cmd.Stdin, cmd.Stdout, cmd.Stderr = tty, tty, tty
		cmd.SysProcAttr.Setpgid = false
		cmd.SysProcAttr.Setsid = true
		cmd.SysProcAttr.Setctty = true
		cmd.SysProcAttr.Ctty = 0
		wait, err := s.start(cmd)
		_ = tty.Close() // the child has its own
		if err != nil {
			_ = ptmx.Close()
			return nil, 0, nil, startError(err)
		}
		p.stdin, p.ptmx = ptmx, ptmx
		return []procOutput{{ptmx, frameStdout}}, cmd.Process.Pid, wait, nil
	}
	pid, wait, pipes, _, err := s.startExec(req, cmd)
	if err != nil {
		return nil, 0, nil, err
	}
	p.stdin = pipes.stdinW
	return []procOutput{{pipes.outR, frameStdout}, {pipes.errR, frameStderr}}, pid, wait, nil
}

// pump reads one output of p and hands it to the waiters, in order.
func (p *guestProc) pump(f *os.File, typ byte) {
	defer func() {
		p.mu.Lock()
		p.outputs--
		p.finishLocked()
		p.mu.Unlock()
	}()
	buf := make([]byte, frameHeaderSize+outputChunk)
	for {
		p.mu.Lock()
		p.reading++
		p.mu.Unlock()
		frame, n, err := readFrameFrom(f, typ, buf)
		p.mu.Lock()
		p.reading--
		if n > 0 {
			p.chunks++
		}
		p.mu.Unlock()
		if n > 0 {
			p.deliver(frame)
		}
		if err != nil {
			return // EOF, or EIO on a PTY whose other side is all closed
		}
	}
}

// deliver queues frame for the waiters and returns once one took it (the
// pump reads no more meanwhile: that is the flow control).
func (p *guestProc) deliver(frame []byte) {
	p.table.trimOthers(p)
	p.mu.Lock()
	defer p.mu.Unlock()
	n := int64(len(frame) - frameHeaderSize)
	count := &p.queued.Stdout
	if frame[0] == frameStderr {
		count = &p.queued.Stderr
	}
	p.frames = append(p.frames, procFrame{frame: append([]byte(nil), frame...), off: *count})
	*count += n
	p.retained += len(frame)
	p.budget.Add(int64(len(frame)))
	seq := p.base + uint64(len(p.frames)) - 1
	p.cond.Broadcast()
	for p.next <= seq {
		p.cond.Wait()
	}
}

// trimLocked drops the oldest sent frames beyond what p may keep.
func (p *guestProc) trimLocked() {
	for p.base < p.next && (p.retained > retainBytes || len(p.frames) > retainFrames ||
		(p.budget.Load() > guestRetainBytes && p.retained > minRetainBytes)) {
		p.retained -= len(p.frames[0].frame)
		p.budget.Add(-int64(len(p.frames[0].frame)))
		p.frames[0] = procFrame{}
		p.frames = p.frames[1:]
		p.base++
	}
}

// rewindLocked makes next the first frame a waiter that has from lacks.
// Frames before base are gone: the waiter starts at base then.
func (p *guestProc) rewindLocked(from ProcOffsets) {
	seq := p.base
	for i, f := range p.frames {
		have := from.Stdout
		if f.frame[0] == frameStderr {
			have = from.Stderr
		}
		if f.off+int64(len(f.frame)-frameHeaderSize) > have {
			if have > f.off { // part of it arrived: keep the rest only
				cut := have - f.off
				data := f.frame[frameHeaderSize+int(cut):]
				nf := append(frameHeader(f.frame[0], len(data)), data...)
				p.retained += len(nf) - len(f.frame)
				p.budget.Add(int64(len(nf) - len(f.frame)))
				p.frames[i] = procFrame{frame: nf, off: have}
			}
			break
		}
		seq++
	}
	if seq < p.next {
		p.next = seq
	}
}

// attach makes w the waiter, ending the previous one, and returns where
// in the output w's frames start. With from, frames the host does not have
// are sent again first.
func (p *guestProc) attach(w *procWaiter, from *ProcOffsets) ProcOffsets {
	p.mu.Lock()
	old := p.waiter
	p.waiter = w
	if from != nil {
		p.rewindLocked(*from)
	}
	at := p.queued
	for _, f := range p.frames[p.next-p.base:] {
		if f.frame[0] == frameStderr {
			at.Stderr -= int64(len(f.frame) - frameHeaderSize)
		} else {
			at.Stdout -= int64(len(f.frame) - frameHeaderSize)
		}
	}
	p.cond.Broadcast()
	p.mu.Unlock()
	if old != nil {
		old.end()
	}
	return at
}

// detach removes w if it is still the waiter.
func (p *guestProc) detach(w *procWaiter) {
	w.end()
	p.mu.Lock()
	if p.waiter == w {
		p.waiter = nil
	}
	p.cond.Broadcast()
	p.mu.Unlock()
}

// serve sends w the frames from next on, then, once the process exited
// and every output ended, the exit. It returns when w is done or replaced.
func (p *guestProc) serve(w *procWaiter) {
	for {
		p.mu.Lock()
		for p.waiter == w && p.next == p.base+uint64(len(p.frames)) && !p.drainedLocked() {
			p.cond.Wait()
		}
		if p.waiter != w {
			p.mu.Unlock()
			return
		}
		if p.next < p.base+uint64(len(p.frames)) {
			seq := p.next
			frame := p.frames[seq-p.base].frame
			p.mu.Unlock()
			if w.write(frame) != nil {
				p.detach(w)
				return
			}
			p.mu.Lock()
			if p.waiter == w && p.next == seq {
				p.next++
				p.trimLocked()
				p.cond.Broadcast()
			}
			p.mu.Unlock()
			continue
		}
		res := p.res
		p.mu.Unlock()
		b, _ := json.Marshal(res)
		if err := w.write(append(frameHeader(frameExit, len(b)), b...)); err == nil {
			p.mu.Lock()
			p.taken = true
			p.mu.Unlock()
		}
		p.detach(w)
		return
	}
}

// trimToLocked drops p's oldest sent frames until it keeps at most keep
// bytes.
func (p *guestProc) trimToLocked(keep int) {
	for p.base < p.next && len(p.frames) > 0 && p.retained > keep {
		p.retained -= len(p.frames[0].frame)
		p.budget.Add(-int64(len(p.frames[0].frame)))
		p.frames[0] = procFrame{}
		p.frames = p.frames[1:]
		p.base++
	}
}

// releaseAllLocked gives back everything p keeps (it leaves the table).
func (p *guestProc) releaseAllLocked() {
	if p.budget != nil {
		p.budget.Add(-int64(p.retained))
	}
	p.frames, p.retained = nil, 0
}

// drainedLocked reports whether the process exited and its outputs ended.
func (p *guestProc) drainedLocked() bool {
	select {
	case <-p.drained:
		return true
	default:
		return false
	}
}

// reap waits for the process, kills it at its timeout, and once it exited
// lets its outputs drain. Children it left behind may hold them open: once
// a waiter is attached and every output reader has waited in a read for
// outputGrace without a byte, the outputs are closed. While nobody waits
// the output stays (it waits for the next waiter).
func (p *guestProc) reap(wait <-chan syscall.WaitStatus, timeout time.Duration) {
	var timedOut bool
	var tc <-chan time.Time
	if timeout > 0 {
		t := time.NewTimer(timeout)
		defer t.Stop()
		tc = t.C
	}
	var ws syscall.WaitStatus
	for done := false; !done; {
		select {
		case ws = <-wait:
			done = true
		case <-tc:
			timedOut = true
			_ = p.kill(syscall.SIGKILL)
			tc = nil
		}
	}
	res := resultOf(ws)
	res.PID = p.pid
	res.TimedOut = timedOut
	p.mu.Lock()
	p.exited, p.res, p.finished = true, res, time.Now()
	p.finishLocked()
	p.mu.Unlock()
	p.closeStdin()
	defer func() {
		for _, f := range p.outs {
			_ = f.Close()
		}
	}()

	tick := time.NewTicker(outputGrace)
	defer tick.Stop()
	idle, last := false, uint64(0)
	for {
		select {
		case <-p.drained:
			return
		case <-tick.C:
		}
		p.mu.Lock()
		stuck := p.waiter != nil && p.reading == p.outputs && p.chunks == last
		last = p.chunks
		p.mu.Unlock()
		if stuck && idle {
			break
		}
		idle = stuck
	}
	// A read blocked on an output ends when it is closed.
	for _, f := range p.outs {
		_ = f.SetReadDeadline(time.Now())
		_ = f.Close()
	}
}

// finishLocked closes drained once the process exited and its outputs ended.
func (p *guestProc) finishLocked() {
	if p.exited && p.outputs == 0 {
		select {
		case <-p.drained:
		default:
			close(p.drained)
			p.cond.Broadcast()
		}
	}
}

// kill signals the process group (the process alone when it has none).
func (p *guestProc) kill(sig syscall.Signal) error {
	p.mu.Lock()
	exited, pid := p.exited, p.pid
	p.mu.Unlock()
	if exited {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("process %q has exited", p.id))
	}
	if pid <= 0 {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("process %q is starting", p.id))
	}
	err := syscall.Kill(-pid, sig)
	if errors.Is(err, syscall.ESRCH) {
		err = syscall.Kill(pid, sig)
	}
	if err != nil {
		return fmt.Errorf("signal process %q: %w", p.id, err)
	}
	return nil
}

func (p *guestProc) closeStdin() {
	p.stdinMu.Lock()
	defer p.stdinMu.Unlock()
	if p.stdin != nil && p.stdin != p.ptmx {
		_ = p.stdin.Close()
	}
	p.stdin = nil
}

// procWait serves proc_wait: output, then the exit. With from, output
// the host lacks is sent again first (see guestProc.frames).
func (s *Server) procWait(st io.ReadWriter, id string, from *ProcOffsets) {
	p, err := s.procs.get(id)
	if err != nil {
		sendError(st, err)
		return
	}
	w := &procWaiter{st: st, gone: make(chan struct{})}
	// Attached first: the started frame says where the frames that follow
	// start, and only this goroutine writes to w.
	at := p.attach(w, from)
	p.mu.Lock()
	pid := p.pid
	p.mu.Unlock()
	if b, err := json.Marshal(startedMsg{PID: pid, At: &at}); err == nil {
		if w.write(append(frameHeader(frameStarted, len(b)), b...)) != nil {
			p.detach(w)
			return
		}
	}
	// The host ends the stream (or the session) when it stops waiting.
	go func() {
		for {
			if _, _, err := readFrame(st); err != nil {
				p.detach(w)
				return
			}
		}
	}()
	p.serve(w)
}

// frameHeader returns the header of a frame of type typ carrying n bytes.
func frameHeader(typ byte, n int) []byte {
	h := make([]byte, frameHeaderSize, frameHeaderSize+n)
	h[0] = typ
	h[1], h[2], h[3], h[4] = byte(n>>24), byte(n>>16), byte(n>>8), byte(n)
	return h
}

// procStdin serves proc_stdin: D frames written to stdin until F.
func (s *Server) procStdin(st io.ReadWriter, id string, closeAfter bool) {
	p, err := s.procs.get(id)
	if err != nil {
		sendError(st, err)
		return
	}
	p.stdinMu.Lock()
	defer p.stdinMu.Unlock()
	written := 0
	var werr error
	for {
		typ, payload, err := readFrameLimit(st, frameLimit)
		if err != nil {
			return // the host gave up
		}
		if typ == frameEOF {
			break
		}
		if typ != frameData {
			sendError(st, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("proc_stdin: unexpected frame %q", typ)))
			return
		}
		if werr != nil {
			continue
		}
		if p.stdin == nil {
			werr = errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("process %q: stdin is closed", id))
			continue
		}
		_ = p.stdin.SetWriteDeadline(time.Now().Add(stdinWriteTimeout))
		n, err := p.stdin.Write(payload)
		written += n
		if err != nil {
			werr = errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("process %q: write stdin: %w", id, err))
		}
	}
	if werr != nil {
		sendError(st, werr)
		return
	}
	if closeAfter && p.stdin != nil {
		if p.ptmx != nil {
			_, _ = p.ptmx.Write([]byte{4}) // ^D: end of input on a terminal
		} else {
			_ = p.stdin.Close()
			p.stdin = nil
		}
	}
	_ = writeJSONFrame(st, frameOK, procStdinReply{Written: written})
}

// procSignal serves proc_signal.
func (s *Server) procSignal(st io.Writer, id, name string) {
	p, err := s.procs.get(id)
	if err != nil {
		sendError(st, err)
		return
	}
	n, ok := procSignals[name]
	if !ok {
		sendError(st, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("unknown signal %q", name)))
		return
	}
	if err := p.kill(syscall.Signal(n)); err != nil {
		sendError(st, err)
		return
	}
	_ = writeFrame(st, frameOK, nil)
}

// procResize serves proc_resize.
func (s *Server) procResize(st io.Writer, id string, cols, rows uint16) {
	p, err := s.procs.get(id)
	if err != nil {
		sendError(st, err)
		return
	}
	p.mu.Lock()
	ptmx := p.ptmx
	p.mu.Unlock()
	if ptmx == nil {
		sendError(st, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("process %q has no terminal", id)))
		return
	}
	if cols == 0 || rows == 0 {
		sendError(st, errdefs.Wrap(errdefs.ErrInvalidArgument, errors.New("pty size must not be 0")))
		return
	}
	if err := pty.Setsize(ptmx, &pty.Winsize{Cols: cols, Rows: rows}); err != nil {
		sendError(st, fmt.Errorf("resize: %w", err))
		return
	}
	// The foreground process group learns of it from the kernel (SIGWINCH).
	_ = writeFrame(st, frameOK, nil)
}

// procList serves proc_list.
func (s *Server) procList(st io.Writer) {
	for _, p := range s.procs.list() {
		p.mu.Lock()
		pi := ProcInfo{ID: p.id, PID: p.pid, Command: p.command, Tag: p.tag, PTY: p.isPTY, StartedAt: p.started, Running: !p.exited}
		if p.exited {
			res := p.res
			pi.Exit = &res
		}
		p.mu.Unlock()
		if err := writeJSONFrame(st, frameData, pi); err != nil {
			return
		}
	}
	_ = writeFrame(st, frameOK, nil)
}

// serveProc dispatches the process operations.
func (s *Server) serveProc(st io.ReadWriter, op string, req *procRequest) {
	if req == nil && op != opProcList {
		sendError(st, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("%s: no request", op)))
		return
	}
	switch op {
	case opProcStart:
		if req.Start == nil {
			sendError(st, errdefs.Wrap(errdefs.ErrInvalidArgument, errors.New("proc_start: no start")))
			return
		}
		start := *req.Start
		start.ID = req.ID
		s.procStart(st, start)
	case opProcWait:
		s.procWait(st, req.ID, req.From)
	case opProcStdin:
		s.procStdin(st, req.ID, req.Close)
	case opProcSignal:
		s.procSignal(st, req.ID, req.Signal)
	case opProcResize:
		s.procResize(st, req.ID, req.Cols, req.Rows)
	case opProcList:
		s.procList(st)
	}
}
