package backend

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/firkin-dev/firkin-worker/agent"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// LivePublisher publishes a message on a live output subject (core NATS,
// best effort: it must not block on slow readers). The handlers checked the
// subject: a process's default subject or a client inbox.
type LivePublisher interface {
	PublishLive(subject string, header map[string][]string, data []byte) error
}

// Bounds on the processes the worker tracks per sandbox.
const (
	// maxExitedProcs is how many exited processes a sandbox's table keeps
	// (the oldest go first).
	maxExitedProcs = 64
	// maxFollowedProcs bounds the running processes the worker follows
	// per sandbox (each has a pump and an agent stream): the guest's own
	// table bound, which a replaced agent need not keep.
	maxFollowedProcs = agent.MaxProcs
	// maxLiveTargets bounds the live subjects of one process.
	maxLiveTargets = 8
	// replayMargin is how much before a process's start a replay of the
	// log stream begins (clock skew between worker and server).
	replayMargin = 5 * time.Second
)

// Bounds of what a ProcInfo repeats of a process's command line, so that a
// list of every process fits a reply: the command's first 1 KiB, its first
// 16 arguments, each cut to 128 bytes.
const (
	maxInfoCommand = 1 << 10
	maxInfoArgs    = 16
	maxInfoArg     = 128
)

// cutInfo cuts s to at most n bytes, on a rune boundary, marking the cut.
func cutInfo(s string, n int) string {
	if len(s) <= n {
		return s
	}
	s = s[:n]
	for len(s) > 0 && !utf8.ValidString(s) {
		s = s[:len(s)-1]
	}
	return s + "…"
}

func cutArgs(args []string) []string {
	if len(args) == 0 {
		return nil
	}
	out := make([]string, 0, min(len(args), maxInfoArgs+1))
	for i, a := range args {
		if i == maxInfoArgs {
			out = append(out, "…")
			break
		}
		out = append(out, cutInfo(a, maxInfoArg))
	}
	return out
}

// procMachine is a machine whose agent session the backend can use for
// what the Machine interface does not carry (the qemu driver's machines).
type procMachine interface {
	Agent() (*agent.Client, error)
}

// procRegistry holds the processes of every sandbox of this worker. The
// zero value is ready.
type procRegistry struct {
	mu    sync.Mutex
	boxes map[string]*sandboxProcs
}

// sandboxProcs are one sandbox's processes and their pumps, which end with
// the sandbox.
type sandboxProcs struct {
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex
	procs  map[string]*proc
	closed bool
	// detached: the pumps stop without reporting an exit (the processes
	// go on in a machine that is paused or handed on; see detachProcs).
	detached bool
}

// proc is one process as the worker knows it.
type proc struct {
	sandbox string
	id      string
	started time.Time

	mu     sync.Mutex
	info   subjects.ProcInfo
	live   []*liveTarget
	exit   *subjects.ProcExit
	done   chan struct{}
	mon    time.Time // start of the pump (duration_ms counts from it for adopted ones)
	unsent int64     // live bytes the publisher refused
}

// liveTarget is one live subject and its message sequence.
type liveTarget struct {
	subject string
	seq     uint64
}

// box returns the process table of sandbox id, made on first use; nil once
// the sandbox ended.
func (b *Backend) box(id string, create bool) *sandboxProcs {
	b.procs.mu.Lock()
	defer b.procs.mu.Unlock()
	if sp, ok := b.procs.boxes[id]; ok || !create {
		return sp
	}
	if b.procs.boxes == nil {
		b.procs.boxes = map[string]*sandboxProcs{}
	}
	ctx, cancel := context.WithCancel(b.ctx)
	sp := &sandboxProcs{ctx: ctx, cancel: cancel, procs: map[string]*proc{}}
	b.procs.boxes[id] = sp
	return sp
}

// endProcs stops the pumps of sandbox id and forgets its processes; called
// when the sandbox ends (its machine is stopped: the processes died with
// it, and each gets a "lost" exit).
func (b *Backend) endProcs(id string) { b.stopProcs(id, false) }

// detachProcs stops following the processes of sandbox id without
// reporting exits: for a machine about to be paused (or handed to another
// worker) whose processes go on. Output they make meanwhile waits in the
// guest; AdoptProcesses follows them again after the resume.
func (b *Backend) detachProcs(id string) { b.stopProcs(id, true) }

func (b *Backend) stopProcs(id string, detach bool) {
	b.procs.mu.Lock()
	sp := b.procs.boxes[id]
	delete(b.procs.boxes, id)
	b.procs.mu.Unlock()
	if sp == nil {
		return
	}
	sp.mu.Lock()
	sp.closed, sp.detached = true, detach
	sp.mu.Unlock()
	sp.cancel()
	sp.wg.Wait()
}

// agentOf returns the current agent session of a sandbox's machine.
func agentOf(s *session) (*agent.Client, error) {
	pm, ok := s.mach().(procMachine)
	if !ok {
		return nil, errdefs.Wrap(errdefs.ErrUnsupported, errors.New("this driver's machines do not run processes"))
	}
	return pm.Agent()
}

// StartProcess starts a process in a sandbox and returns as soon as it
// runs. Its output goes to the log stream (within the sandbox's log
// budget, under flow control) and live to the request's output subject or
// the default one, until it exits; then its exit goes to both.
func (b *Backend) StartProcess(ctx context.Context, id string, req subjects.ProcStartRequest) (subjects.ProcStartReply, error) {
	if err := req.Validate(); err != nil {
		return subjects.ProcStartReply{}, err
	}
	timeout := time.Duration(req.TimeoutMS) * time.Millisecond
	maxTimeout := b.cfg.ExecMaxTimeout
	if req.Background {
		maxTimeout = b.cfg.MaxTimeout
	} else if timeout == 0 {
		timeout = b.cfg.ExecDefaultTimeout
	}
	if timeout > maxTimeout {
		return subjects.ProcStartReply{}, invalid("timeout_ms %d: want 0..%d", req.TimeoutMS, maxTimeout.Milliseconds())
	}
	s, err := b.lookup(id)
	if err != nil {
		return subjects.ProcStartReply{}, err
	}
	c, err := agentOf(s)
	if err != nil {
		return subjects.ProcStartReply{}, fmt.Errorf("start process in sandbox %s: %w", id, err)
	}
	sp := b.box(id, true)
	cmdID := NewID(12)
	ctx, cancel := context.WithTimeout(ctx, quickProcTimeout)
	defer cancel()
	areq := agent.ProcStartRequest{ID: cmdID, Command: req.Command, Args: req.Args, Env: req.Env, Cwd: req.Cwd, User: req.User, Timeout: timeout, Tag: req.Tag}
	if req.PTY != nil {
		areq.PTY = &agent.PTYSize{Cols: uint16(req.PTY.Cols), Rows: uint16(req.PTY.Rows)}
	}
	started := time.Now().UTC()
	pid, err := c.ProcStart(ctx, areq)
	if err != nil {
		return subjects.ProcStartReply{}, fmt.Errorf("start process in sandbox %s: %w", id, err)
	}
	out := req.OutputSubject
	if out == "" {
		out = b.subj().ProcOutput(id, cmdID)
	}
	p := &proc{sandbox: id, id: cmdID, started: started, done: make(chan struct{}), mon: time.Now()}
	p.info = subjects.ProcInfo{CommandID: cmdID, PID: pid, Tag: req.Tag, Command: cutInfo(req.Command, maxInfoCommand), Args: cutArgs(req.Args), PTY: req.PTY != nil,
		Background: req.Background, StartedAt: started, State: subjects.ProcRunning,
		OutputSubject: b.subj().ProcOutput(id, cmdID), LogSubject: b.subj().Logs(id)}
	p.live = []*liveTarget{{subject: out}}
	if err := b.track(sp, s, p); err != nil {
		return subjects.ProcStartReply{}, err
	}
	if req.Stdin != "" {
		if _, err := c.ProcStdin(ctx, cmdID, []byte(req.Stdin), false); err != nil {
			b.log.Warn("initial stdin of a process", "sandbox", id, "command", cmdID, "err", err)
		}
	}
	b.log.Debug("process started", "sandbox", id, "command", cmdID, "pid", pid, "pty", req.PTY != nil, "background", req.Background)
	return subjects.ProcStartReply{CommandID: cmdID, PID: pid, SandboxID: id, StartedAt: started, OutputSubject: out, LogSubject: b.subj().Logs(id)}, nil
}

// quickProcTimeout bounds the guest's part of a process request.
const quickProcTimeout = 30 * time.Second

// subj returns the subjects the worker publishes under.
func (b *Backend) subj() subjects.Subjects {
	if b.cfg.Subjects.Prefix == "" {
		return subjects.Default
	}
	return b.cfg.Subjects
}

// track adds p to its sandbox's table and starts its pump, unless the
// table has it already (two adoptions at once: one pump per process, or
// their waits would keep ending each other's).
func (b *Backend) track(sp *sandboxProcs, s *session, p *proc) error {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.closed {
		return errdefs.Wrap(errdefs.ErrNotFound, fmt.Errorf("sandbox %s ended", p.sandbox))
	}
	if _, ok := sp.procs[p.id]; ok {
		return nil
	}
	// Forget the oldest exited processes beyond the bound.
	var exited []*proc
	for _, q := range sp.procs {
		if q.exited() {
			exited = append(exited, q)
		}
	}
	sort.Slice(exited, func(i, j int) bool { return exited[i].started.Before(exited[j].started) })
	for i := 0; i < len(exited)-maxExitedProcs+1; i++ {
		delete(sp.procs, exited[i].id)
	}
	running := 0
	for _, q := range sp.procs {
		if !q.exited() {
			running++
		}
	}
	if running >= maxFollowedProcs {
		return errdefs.Wrap(errdefs.ErrCapacity, fmt.Errorf("sandbox %s: the worker follows %d running processes of it already", p.sandbox, running))
	}
	sp.procs[p.id] = p
	sp.wg.Add(1)
	go func() {
		defer sp.wg.Done()
		b.pump(sp, s, p)
	}()
	return nil
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// pump takes the process's output from the guest until it exits, through
// the sandbox's log budget into the log stream (the LogPublisher's window
// is the flow control: while it is full, the pump stops reading, the
// guest's yamux window fills and the process blocks on its output) and to
// its live subjects (best effort). A broken agent session (a snapshot's
// quiesce, a restore) is waited out: the guest keeps what it could not
// deliver. When the sandbox ends, ctx ends and the pump with it.
func (b *Backend) pump(sp *sandboxProcs, s *session, p *proc) {
	defer close(p.done)
	ctx := sp.ctx
	logs := b.cfg.Store.Logs(p.sandbox)
	fwd := newOutputForwarder(ctx, logs, s.logBudget(b.cfg.LogBytesPerSecond, b.cfg.LogBytesTotal), p.sandbox, p.id)
	// cur is where the pump is in the output: after the first wait it
	// tells the guest, so output in flight when a wait broke (a snapshot's
	// quiesce) comes again rather than being lost. The first wait takes the
	// output from where the guest is (after a worker restart, what an
	// earlier worker stored is not sent twice).
	var cur agent.ProcCursor
	out := func(stream agent.Stream, data []byte) {
		fwd.write(stream, data)
		b.publishLive(p, string(stream), data)
	}
	var res agent.ExecResult
	lost := false
	backoff := 20 * time.Millisecond
	for {
		c, err := agentOf(s)
		if err == nil {
			res, err = c.ProcWaitFrom(ctx, p.id, &cur, out)
			if err == nil {
				break
			}
		}
		if errors.Is(err, errdefs.ErrNotFound) {
			lost = true // the guest does not know it (any more)
			break
		}
		if errors.Is(err, errdefs.ErrUnsupported) {
			lost = true
			break
		}
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-s.mach().Done():
			t.Stop()
			lost = true
		case <-ctx.Done():
			t.Stop()
			lost = true
		}
		if lost {
			break
		}
		backoff = min(backoff*2, time.Second)
	}
	sp.mu.Lock()
	detached := sp.detached
	sp.mu.Unlock()
	if detached && lost {
		// Followed again after the resume; what the guest did not deliver
		// waits there. What this pump took is flushed.
		flushCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		_ = logs.Flush(flushCtx)
		return
	}
	if cur.Lost > 0 { // bytes the guest no longer held when followed again
		fwd.overflow += cur.Lost
		fwd.overWhy = "gone from the guest before they were delivered again"
	}
	// The sandbox may have ended: the last events still go out, bounded.
	flushCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	dropped := fwd.finish(flushCtx, b)
	exit := subjects.ProcExit{CommandID: p.id, ExitCode: res.ExitCode, TimedOut: res.TimedOut, LogsDroppedBytes: dropped, Lost: lost}
	if lost {
		exit.ExitCode = -1
	} else if res.Signal != "" {
		exit.Signal = subjects.SignalName(res.ExitCode - 128)
		if exit.Signal == "" {
			exit.Signal = res.Signal
		}
	}
	p.mu.Lock()
	exit.DurationMS = time.Since(p.mon).Milliseconds()
	p.mu.Unlock()
	body, _ := json.Marshal(exit)
	ev := subjects.NewLogEvent(subjects.SourceExit, p.sandbox, p.id, body)
	logs.Publish(ev)
	if err := logs.Flush(flushCtx); err != nil {
		b.log.Warn("process exit event not stored", "sandbox", p.sandbox, "command", p.id, "err", err)
	}
	b.publishLive(p, subjects.ProcStreamExit, body)
	p.mu.Lock()
	p.exit = &exit
	p.info.State = subjects.ProcExited
	unsent := p.unsent
	p.mu.Unlock()
	if unsent > 0 {
		b.log.Debug("live output not sent", "sandbox", p.sandbox, "command", p.id, "bytes", unsent)
	}
}

// publishLive sends data (output of stream, or the exit) to p's live
// subjects, in chunks of at most subjects.MaxLiveChunk, each with the next
// sequence number of its subject.
func (b *Backend) publishLive(p *proc, stream string, data []byte) {
	if b.cfg.Live == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for first := true; first || len(data) > 0; first = false {
		n := min(len(data), subjects.MaxLiveChunk)
		for _, t := range p.live {
			t.seq++
			hdr := map[string][]string{
				subjects.ProcStreamHeader:  {stream},
				subjects.ProcSeqHeader:     {strconv.FormatUint(t.seq, 10)},
				subjects.ProcCommandHeader: {p.id},
			}
			if err := b.cfg.Live.PublishLive(t.subject, hdr, data[:n]); err != nil {
				p.unsent += int64(n)
			}
		}
		data = data[n:]
	}
}

// lookupProc returns a process of a sandbox this worker owns, asking the
// guest when the worker does not know it (a worker restarted since).
func (b *Backend) lookupProc(ctx context.Context, id, cmdID string) (*session, *proc, error) {
	s, err := b.lookup(id)
	if err != nil {
		return nil, nil, err
	}
	if p := b.knownProc(id, cmdID); p != nil {
		return s, p, nil
	}
	if err := b.adoptProcs(ctx, s, id); err != nil {
		return nil, nil, err
	}
	if p := b.knownProc(id, cmdID); p != nil {
		return s, p, nil
	}
	// Not sandbox_not_found: the sandbox is there (no code of the contract
	// names a missing process).
	return nil, nil, invalid("no process %s in sandbox %s", cmdID, id)
}

func (b *Backend) knownProc(id, cmdID string) *proc {
	sp := b.box(id, false)
	if sp == nil {
		return nil
	}
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return sp.procs[cmdID]
}

// AdoptProcesses starts following the processes the guest of sandbox id
// runs that this worker does not know yet (after a worker restart, a
// resume or a fork): their output goes to the log stream and their
// default live subject again.
func (b *Backend) AdoptProcesses(ctx context.Context, id string) error {
	s, err := b.lookup(id)
	if err != nil {
		return err
	}
	return b.adoptProcs(ctx, s, id)
}

func (b *Backend) adoptProcs(ctx context.Context, s *session, id string) error {
	c, err := agentOf(s)
	if err != nil {
		return fmt.Errorf("processes of sandbox %s: %w", id, err)
	}
	ctx, cancel := context.WithTimeout(ctx, quickProcTimeout)
	defer cancel()
	list, err := c.ProcList(ctx)
	if err != nil {
		return fmt.Errorf("processes of sandbox %s: %w", id, err)
	}
	sp := b.box(id, true)
	for _, gi := range list {
		if subjects.ValidateCommandID(gi.ID) != nil || b.knownProc(id, gi.ID) != nil {
			continue // not one of the worker's, or known
		}
		p := &proc{sandbox: id, id: gi.ID, started: gi.StartedAt.UTC(), done: make(chan struct{}), mon: time.Now()}
		p.info = subjects.ProcInfo{CommandID: gi.ID, PID: gi.PID, Tag: cutInfo(gi.Tag, subjects.MaxProcTag), Command: cutInfo(gi.Command, maxInfoCommand), PTY: gi.PTY,
			StartedAt: gi.StartedAt.UTC(), State: subjects.ProcRunning,
			OutputSubject: b.subj().ProcOutput(id, gi.ID), LogSubject: b.subj().Logs(id)}
		p.live = []*liveTarget{{subject: p.info.OutputSubject}}
		if err := b.track(sp, s, p); err != nil {
			return err
		}
		b.log.Info("process adopted", "sandbox", id, "command", gi.ID, "pid", gi.PID)
	}
	return nil
}

// info returns p's description.
func (p *proc) describe() subjects.ProcInfo {
	p.mu.Lock()
	defer p.mu.Unlock()
	pi := p.info
	if p.exit != nil {
		e := *p.exit
		pi.Exit = &e
	}
	return pi
}

// ListProcesses lists the processes of a sandbox: running ones and the
// last exited ones, oldest first.
func (b *Backend) ListProcesses(ctx context.Context, id string) (subjects.ProcListReply, error) {
	s, err := b.lookup(id)
	if err != nil {
		return subjects.ProcListReply{}, err
	}
	if err := b.adoptProcs(ctx, s, id); err != nil && !errors.Is(err, errdefs.ErrUnsupported) {
		b.log.Warn("adopt processes", "sandbox", id, "err", err)
	}
	reply := subjects.ProcListReply{Processes: []subjects.ProcInfo{}}
	if sp := b.box(id, false); sp != nil {
		sp.mu.Lock()
		for _, p := range sp.procs {
			reply.Processes = append(reply.Processes, p.describe())
		}
		sp.mu.Unlock()
	}
	sort.Slice(reply.Processes, func(i, j int) bool { return reply.Processes[i].StartedAt.Before(reply.Processes[j].StartedAt) })
	return reply, nil
}

// ConnectProcess describes a process and where to read its output; with
// an output subject, that subject also gets its output live from now on.
func (b *Backend) ConnectProcess(ctx context.Context, id, cmdID string, req subjects.ProcConnectRequest) (subjects.ProcConnectReply, error) {
	_, p, err := b.lookupProc(ctx, id, cmdID)
	if err != nil {
		return subjects.ProcConnectReply{}, err
	}
	p.mu.Lock()
	if req.OutputSubject != "" && p.exit == nil {
		found := false
		for _, t := range p.live {
			found = found || t.subject == req.OutputSubject
		}
		if !found {
			if len(p.live) >= maxLiveTargets {
				p.live = append(p.live[:1], p.live[2:]...) // the oldest added one goes
			}
			p.live = append(p.live, &liveTarget{subject: req.OutputSubject})
		}
	}
	live := make([]string, 0, len(p.live))
	for _, t := range p.live {
		live = append(live, t.subject)
	}
	p.mu.Unlock()
	pi := p.describe()
	return subjects.ProcConnectReply{ProcInfo: pi, LogStream: "FIRKIN_LOGS", ReplayFrom: pi.StartedAt.Add(-replayMargin), Live: live}, nil
}

// ProcessStdin writes to a process's stdin, and closes it when asked.
func (b *Backend) ProcessStdin(ctx context.Context, id, cmdID string, data []byte, close bool) (subjects.ProcStdinReply, error) {
	s, p, err := b.lookupProc(ctx, id, cmdID)
	if err != nil {
		return subjects.ProcStdinReply{}, err
	}
	if p.exited() {
		return subjects.ProcStdinReply{}, invalid("process %s has exited", cmdID)
	}
	c, err := agentOf(s)
	if err != nil {
		return subjects.ProcStdinReply{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, quickProcTimeout+5*time.Second)
	defer cancel()
	n, err := c.ProcStdin(ctx, cmdID, data, close)
	if err != nil {
		return subjects.ProcStdinReply{Written: n}, fmt.Errorf("stdin of process %s: %w", cmdID, err)
	}
	return subjects.ProcStdinReply{Written: n, Closed: close}, nil
}

// SignalProcess sends a signal to a process's process group.
func (b *Backend) SignalProcess(ctx context.Context, id, cmdID string, req subjects.ProcSignalRequest) (subjects.ProcSignalReply, error) {
	sig, err := subjects.ParseSignal(req.Signal)
	if err != nil {
		return subjects.ProcSignalReply{}, err
	}
	s, _, err := b.lookupProc(ctx, id, cmdID)
	if err != nil {
		return subjects.ProcSignalReply{}, err
	}
	c, err := agentOf(s)
	if err != nil {
		return subjects.ProcSignalReply{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, quickProcTimeout)
	defer cancel()
	if err := c.ProcSignal(ctx, cmdID, sig); err != nil {
		return subjects.ProcSignalReply{}, fmt.Errorf("signal process %s: %w", cmdID, err)
	}
	return subjects.ProcSignalReply{Signal: sig}, nil
}

// ResizeProcess sets the terminal size of a PTY process.
func (b *Backend) ResizeProcess(ctx context.Context, id, cmdID string, req subjects.ProcResizeRequest) (subjects.ProcInfo, error) {
	if err := req.Validate(); err != nil {
		return subjects.ProcInfo{}, err
	}
	s, p, err := b.lookupProc(ctx, id, cmdID)
	if err != nil {
		return subjects.ProcInfo{}, err
	}
	if !p.describe().PTY {
		return subjects.ProcInfo{}, invalid("process %s has no terminal (start it with pty)", cmdID)
	}
	c, err := agentOf(s)
	if err != nil {
		return subjects.ProcInfo{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, quickProcTimeout)
	defer cancel()
	if err := c.ProcResize(ctx, cmdID, agent.PTYSize{Cols: uint16(req.Cols), Rows: uint16(req.Rows)}); err != nil {
		return subjects.ProcInfo{}, fmt.Errorf("resize process %s: %w", cmdID, err)
	}
	return p.describe(), nil
}

// execLive returns exec's output function: forward, and, when the request
// named a stream subject, also that subject live (the format of a
// process's output subject). Call end with the outcome: it sends the exit
// message.
func (b *Backend) execLive(subject, cmdID string, forward agent.OutputFunc) (agent.OutputFunc, func(agent.ExecResult, error, time.Duration, int64)) {
	if subject == "" || b.cfg.Live == nil {
		return forward, func(agent.ExecResult, error, time.Duration, int64) {}
	}
	p := &proc{id: cmdID, live: []*liveTarget{{subject: subject}}}
	out := func(stream agent.Stream, data []byte) {
		forward(stream, data)
		b.publishLive(p, string(stream), data)
	}
	end := func(res agent.ExecResult, err error, d time.Duration, dropped int64) {
		exit := subjects.ProcExit{CommandID: cmdID, ExitCode: res.ExitCode, TimedOut: res.TimedOut || errors.Is(err, context.DeadlineExceeded),
			DurationMS: d.Milliseconds(), LogsDroppedBytes: dropped, Lost: err != nil && !errors.Is(err, context.DeadlineExceeded)}
		if res.Signal != "" {
			exit.Signal = subjects.SignalName(res.ExitCode - 128)
		}
		if exit.Lost {
			exit.ExitCode = -1
		}
		body, _ := json.Marshal(exit)
		b.publishLive(p, subjects.ProcStreamExit, body)
	}
	return out, end
}
