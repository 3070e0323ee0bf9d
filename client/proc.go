package client

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	js "github.com/nats-io/nats.go/jetstream"

	"github.com/firkin-dev/firkin-worker/subjects"
)

// stdinChunk is the most bytes one stdin request carries.
const stdinChunk = 64 << 10

// outputPullMsgs bounds the log events the output reader fetches ahead
// (each at most 64 KiB of output): a slow reader of Output holds at most
// about a MiB in the client, the rest waits in the stream.
const outputPullMsgs = 16

// Process is a process in a sandbox, started by StartProcess or found by
// ConnectProcess. Its output is read from the log stream FIRKIN_LOGS with
// an ordered consumer: in order, from its first byte (also for a process
// started by another client long ago), and flow-controlled (a slow reader
// of Output holds the stream back, never the worker). Close it when done;
// that does not end the process.
type Process struct {
	c       *Client
	sandbox string
	id      string
	pid     int
	pty     bool
	from    time.Time
	logSubj string
	// afterSeq, when set, is a log stream sequence before the process's
	// first event (reading starts after it instead of at from).
	afterSeq uint64
	// knownExit is the exit connect reported for a process that had
	// exited: the end when the stream no longer holds its exit event.
	knownExit *subjects.ProcExit

	ctx    context.Context
	cancel context.CancelFunc

	once     sync.Once
	output   bool // Output was asked for before reading began
	started  bool
	mu       sync.Mutex
	pr       *io.PipeReader
	pw       *io.PipeWriter
	done     chan struct{}
	exit     subjects.ProcExit
	exitErr  error
	stdinMu  sync.Mutex
	stdinEnd bool
}

// StartProcess starts a process in a sandbox (see subjects.ProcStartRequest:
// a shell command or argv, env, cwd, user, a PTY, a tag, background) and
// returns as soon as it runs.
func (c *Client) StartProcess(ctx context.Context, sandboxID string, req subjects.ProcStartRequest) (*Process, error) {
	// The process's output comes after the sandbox's last log event now:
	// reading from there skips the sandbox's older output.
	after, err := c.lastLogSeq(ctx, c.subj.Logs(sandboxID))
	if err != nil {
		return nil, err
	}
	var r subjects.ProcStartReply
	if err := c.Request(ctx, c.subj.Sandbox(sandboxID, subjects.VerbProcStart), req, &r); err != nil {
		return nil, err
	}
	if subjects.ValidateCommandID(r.CommandID) != nil {
		return nil, fmt.Errorf("proc.start: bad command id %q in the reply", r.CommandID)
	}
	p := c.newProcess(sandboxID, r.CommandID, r.PID, req.PTY != nil, r.StartedAt.Add(-5*time.Second))
	p.afterSeq = after
	return p, nil
}

// lastLogSeq is the stream sequence of the last event of a log subject (0
// when it has none).
func (c *Client) lastLogSeq(ctx context.Context, subject string) (uint64, error) {
	c.mu.Lock()
	j, err := c.jetStream()
	c.mu.Unlock()
	if err != nil {
		return 0, err
	}
	s, err := j.Stream(ctx, logStream)
	if err != nil {
		return 0, fmt.Errorf("stream %s: %w", logStream, err)
	}
	m, err := s.GetLastMsgForSubject(ctx, subject)
	if errors.Is(err, js.ErrMsgNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("last event of %s: %w", subject, err)
	}
	return m.Sequence, nil
}

// ConnectProcess returns a running (or exited) process of a sandbox by its
// command id, for instance one a client that went away started: its
// output is replayed from the start, then followed live.
func (c *Client) ConnectProcess(ctx context.Context, sandboxID, commandID string) (*Process, error) {
	if err := subjects.ValidateCommandID(commandID); err != nil {
		return nil, err
	}
	var r subjects.ProcConnectReply
	if err := c.Request(ctx, c.subj.Sandbox(sandboxID, subjects.ProcVerb(commandID, subjects.ProcOpConnect)), subjects.ProcConnectRequest{}, &r); err != nil {
		return nil, err
	}
	p := c.newProcess(sandboxID, commandID, r.PID, r.PTY, r.ReplayFrom)
	p.knownExit = r.Exit
	return p, nil
}

// ListProcesses lists a sandbox's processes: running ones and the last
// exited ones.
func (c *Client) ListProcesses(ctx context.Context, sandboxID string) ([]subjects.ProcInfo, error) {
	var r subjects.ProcListReply
	err := c.Request(ctx, c.subj.Sandbox(sandboxID, subjects.VerbProcList), struct{}{}, &r)
	return r.Processes, err
}

func (c *Client) newProcess(sandbox, id string, pid int, pty bool, from time.Time) *Process {
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	return &Process{c: c, sandbox: sandbox, id: id, pid: pid, pty: pty, from: from, logSubj: c.subj.Logs(sandbox),
		ctx: ctx, cancel: cancel, pr: pr, pw: pw, done: make(chan struct{})}
}

// ID is the process's command id.
func (p *Process) ID() string { return p.id }

// PID is the process's pid in the guest.
func (p *Process) PID() int { return p.pid }

// Output returns the process's stdout and stderr (its terminal, with a
// PTY) as they were produced, ending at its exit. Call it before Wait,
// and read it to the end before Wait returns (as with os/exec pipes).
func (p *Process) Output() io.Reader {
	p.mu.Lock()
	if p.started && !p.output {
		p.mu.Unlock()
		r, w := io.Pipe()
		_ = w.CloseWithError(errors.New("client: Output called after Wait began reading"))
		return r
	}
	p.output = true
	p.mu.Unlock()
	p.start()
	return p.pr
}

// Wait waits until the process exits and returns how it ended. A process
// ended by a signal has Signal set ("TERM") and ExitCode 128 + its number.
func (p *Process) Wait(ctx context.Context) (subjects.ProcExit, error) {
	p.start()
	select {
	case <-p.done:
		return p.exit, p.exitErr
	case <-ctx.Done():
		return subjects.ProcExit{}, fmt.Errorf("wait for process %s: %w", p.id, ctx.Err())
	}
}

// Close stops reading the process's output (the process goes on).
func (p *Process) Close() error {
	p.cancel()
	_ = p.pr.Close()
	return nil
}

func (p *Process) start() {
	p.once.Do(func() {
		p.mu.Lock()
		p.started = true
		p.mu.Unlock()
		go p.read()
	})
}

// read follows the sandbox's log subject from the process's start and
// keeps the events of this command: output into the pipe (when Output was
// asked for), then the exit.
func (p *Process) read() {
	defer close(p.done)
	fail := func(err error) {
		p.exitErr = err
		_ = p.pw.CloseWithError(err)
	}
	p.c.mu.Lock()
	j, err := p.c.jetStream()
	p.c.mu.Unlock()
	if err != nil {
		fail(err)
		return
	}
	cfg := js.OrderedConsumerConfig{FilterSubjects: []string{p.logSubj}, DeliverPolicy: js.DeliverByStartTimePolicy, OptStartTime: &p.from}
	if p.afterSeq > 0 {
		cfg.DeliverPolicy, cfg.OptStartTime, cfg.OptStartSeq = js.DeliverByStartSequencePolicy, nil, p.afterSeq+1
	}
	cons, err := j.OrderedConsumer(p.ctx, logStream, cfg)
	if err != nil {
		fail(fmt.Errorf("follow %s: %w", p.logSubj, err))
		return
	}
	it, err := cons.Messages(js.PullMaxMessages(outputPullMsgs))
	if err != nil {
		fail(fmt.Errorf("follow %s: %w", p.logSubj, err))
		return
	}
	defer it.Stop()
	// An exited process whose events aged out of the stream ends with what
	// connect said.
	endWithKnown := func() bool {
		if p.knownExit == nil {
			return false
		}
		p.exit = *p.knownExit
		_ = p.pw.Close()
		return true
	}
	if info := cons.CachedInfo(); info != nil && info.NumPending == 0 && endWithKnown() {
		return
	}
	go func() {
		<-p.ctx.Done()
		it.Stop()
	}()
	p.mu.Lock()
	output := p.output
	p.mu.Unlock()
	for {
		m, err := it.Next()
		if err != nil {
			if p.ctx.Err() != nil {
				err = errors.New("client: process closed")
			}
			fail(fmt.Errorf("read %s: %w", p.logSubj, err))
			return
		}
		last := false
		if md, err := m.Metadata(); err == nil && md.NumPending == 0 {
			last = true // the stream holds nothing more now
		}
		var ev subjects.LogEvent
		if json.Unmarshal(m.Data(), &ev) != nil || ev.CommandID != p.id {
			if last && endWithKnown() {
				return
			}
			continue
		}
		switch ev.Source {
		case subjects.SourceExit:
			if err := json.Unmarshal([]byte(ev.Message), &p.exit); err != nil {
				fail(fmt.Errorf("process %s: bad exit event: %w", p.id, err))
				return
			}
			_ = p.pw.Close()
			return
		case subjects.SourceStdout, subjects.SourceStderr:
			if !output {
				continue
			}
			data := []byte(ev.Message)
			if ev.MessageB64 != "" {
				if data, err = base64.StdEncoding.DecodeString(ev.MessageB64); err != nil {
					continue
				}
			}
			if _, err := p.pw.Write(data); err != nil {
				output = false // the reader went away; go on for the exit
			}
		}
		if last && ev.Source != subjects.SourceExit && endWithKnown() {
			return
		}
	}
}

// Stdin returns a writer to the process's stdin (its terminal, with a
// PTY). Each Write is one request the worker answers once the guest took
// the bytes; Close closes stdin (sends ^D to a terminal).
func (p *Process) Stdin() io.WriteCloser { return stdinWriter{p} }

type stdinWriter struct{ p *Process }

func (w stdinWriter) Write(b []byte) (int, error) {
	return w.p.WriteStdin(context.Background(), b)
}

func (w stdinWriter) Close() error {
	w.p.stdinMu.Lock()
	defer w.p.stdinMu.Unlock()
	if w.p.stdinEnd {
		return nil
	}
	w.p.stdinEnd = true
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return w.p.c.Request(ctx, w.p.verb(subjects.ProcOpStdin), subjects.ProcStdinRequest{Close: true}, nil)
}

// WriteStdin writes b to the process's stdin, in requests of up to 64 KiB.
func (p *Process) WriteStdin(ctx context.Context, b []byte) (int, error) {
	p.stdinMu.Lock()
	defer p.stdinMu.Unlock()
	written := 0
	for len(b) > 0 {
		n := min(len(b), stdinChunk)
		var r subjects.ProcStdinReply
		if err := p.c.Request(ctx, p.verb(subjects.ProcOpStdin), subjects.ProcStdinRequest{DataB64: b[:n]}, &r); err != nil {
			return written, err
		}
		written += r.Written
		if r.Written < n {
			return written, io.ErrShortWrite
		}
		b = b[n:]
	}
	return written, nil
}

// Signal sends a signal (TERM, KILL, INT, HUP, …) to the process's group.
func (p *Process) Signal(ctx context.Context, signal string) error {
	return p.c.Request(ctx, p.verb(subjects.ProcOpSignal), subjects.ProcSignalRequest{Signal: signal}, nil)
}

// Resize sets the size of the process's terminal (PTY processes).
func (p *Process) Resize(ctx context.Context, cols, rows int) error {
	return p.c.Request(ctx, p.verb(subjects.ProcOpResize), subjects.ProcResizeRequest{Cols: cols, Rows: rows}, nil)
}

func (p *Process) verb(op string) string {
	return p.c.subj.Sandbox(p.sandbox, subjects.ProcVerb(p.id, op))
}
