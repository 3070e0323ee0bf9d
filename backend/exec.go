package backend

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/firkin-dev/firkin-worker/agent"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/internal/jsonsize"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// OutputWriter is what a LogWriter may also do: batch a command's output
// under flow control (Output blocks while too many events are
// unacknowledged, at most until ctx ends) and count the output bytes it
// could not store. The JetStream store's writers do.
type OutputWriter interface {
	Output(ctx context.Context, source, commandID string, data []byte)
	Dropped() int64
}

// Exec runs a command in a sandbox. Output is published to the sandbox's log
// stream as it is produced, within the sandbox's log budget, and the reply
// carries up to ReplyOutputCap bytes of each stream (less when the encoded
// reply would not fit MaxReplyBytes). A command that outlives its timeout is
// killed and the call fails with errdefs.ErrTimeout.
func (b *Backend) Exec(ctx context.Context, id string, req subjects.ExecRequest) (subjects.ExecReply, error) {
	if err := req.Validate(); err != nil {
		return subjects.ExecReply{}, err
	}
	timeout := b.cfg.ExecDefaultTimeout
	if req.TimeoutMS < 0 || time.Duration(req.TimeoutMS)*time.Millisecond > b.cfg.ExecMaxTimeout {
		return subjects.ExecReply{}, invalid("timeout_ms %d: want 0..%d", req.TimeoutMS, b.cfg.ExecMaxTimeout.Milliseconds())
	} else if req.TimeoutMS > 0 {
		timeout = time.Duration(req.TimeoutMS) * time.Millisecond
	}
	s, err := b.lookup(id)
	if err != nil {
		return subjects.ExecReply{}, err
	}
	cmdID := NewID(12)

	// The guest kills the command at timeout; the host waits a little longer
	// so the guest's answer (with TimedOut) normally arrives first.
	ctx, cancel := context.WithTimeout(ctx, timeout+5*time.Second)
	defer cancel()
	logs := b.cfg.Store.Logs(id)
	fwd := newOutputForwarder(ctx, logs, s.logBudget(b.cfg.LogBytesPerSecond, b.cfg.LogBytesTotal), id, cmdID)
	forward, endLive := b.execLive(req.StreamSubject, cmdID, fwd.write)
	out := newOutputCollector(b.cfg.ReplyOutputCap, forward)
	start := time.Now()
	res, err := s.mach().Exec(ctx, agent.ExecRequest{
		Command: req.Command,
		Args:    req.Args,
		Direct:  req.Args != nil,
		Env:     req.Env,
		Cwd:     req.Cwd,
		User:    req.User,
		Stdin:   []byte(req.Stdin),
		Timeout: timeout,
	}, out.write)
	elapsed := time.Since(start)
	flushCtx, flushCancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer flushCancel()
	dropped := fwd.finish(flushCtx, b)
	endLive(res, err, elapsed, dropped)
	switch {
	case errors.Is(err, context.DeadlineExceeded) || (err == nil && res.TimedOut):
		return subjects.ExecReply{}, errdefs.Wrap(errdefs.ErrTimeout, fmt.Errorf("command %s timed out after %s and was killed (output so far is in the log stream)", cmdID, timeout))
	case err != nil:
		return subjects.ExecReply{}, fmt.Errorf("exec in sandbox %s: %w", id, err)
	}
	reply := subjects.ExecReply{ExitCode: res.ExitCode, Signal: res.Signal, DurationMS: elapsed.Milliseconds(), CommandID: cmdID, LogsDroppedBytes: dropped}
	reply.Truncated = out.truncated
	reply.Stdout, reply.StdoutB64 = encodeOutput(out.stdout, out.truncated)
	reply.Stderr, reply.StderrB64 = encodeOutput(out.stderr, out.truncated)
	fitReply(&reply, b.cfg.MaxReplyBytes)
	return reply, nil
}

// outputForwarder sends a command's output to the log stream within the
// sandbox's log budget and counts what it drops.
type outputForwarder struct {
	ctx       context.Context
	logs      LogWriter
	ow        OutputWriter // nil when logs cannot batch
	budget    *logBudget
	sandbox   string
	command   string
	overflow  int64 // bytes over the budget
	overWhy   string
	published bool
}

func newOutputForwarder(ctx context.Context, logs LogWriter, budget *logBudget, sandbox, command string) *outputForwarder {
	ow, _ := logs.(OutputWriter)
	return &outputForwarder{ctx: ctx, logs: logs, ow: ow, budget: budget, sandbox: sandbox, command: command}
}

// write is called from one goroutine at a time (agent.OutputFunc); it blocks
// while the log writer's window is full (the guest's stream then waits).
func (f *outputForwarder) write(stream agent.Stream, data []byte) {
	n, why := f.budget.take(len(data), time.Now())
	if n < len(data) {
		f.overflow += int64(len(data) - n)
		f.overWhy = why
	}
	if n == 0 {
		return
	}
	f.published = true
	if f.ow != nil {
		f.ow.Output(f.ctx, string(stream), f.command, data[:n])
		return
	}
	f.logs.Publish(subjects.NewLogEvent(string(stream), f.sandbox, f.command, data[:n]))
}

// finish flushes the command's output, says in a system log event how much
// of it is not in the log stream, and returns that many bytes.
func (f *outputForwarder) finish(ctx context.Context, b *Backend) int64 {
	ferr := f.logs.Flush(ctx)
	if ferr != nil {
		b.log.Warn("flush exec logs", "sandbox", f.sandbox, "command", f.command, "err", ferr)
	}
	var lost int64
	if f.ow != nil {
		lost = f.ow.Dropped()
	} else if ferr != nil && f.published {
		lost = -1 // unknown
	}
	if f.overflow == 0 && lost == 0 {
		return 0
	}
	b.logDropped.Add(f.overflow + max(lost, 0))
	var msg string
	switch {
	case f.overflow > 0 && lost != 0:
		msg = fmt.Sprintf("command %s: %d bytes of output dropped (%s), %s not stored (%v)", f.command, f.overflow, f.overWhy, lostText(lost), ferr)
	case f.overflow > 0:
		msg = fmt.Sprintf("command %s: %d bytes of output dropped (%s)", f.command, f.overflow, f.overWhy)
	default:
		msg = fmt.Sprintf("command %s: %s of output not stored (%v)", f.command, lostText(lost), ferr)
	}
	b.log.Warn("exec output not all in the log stream", "sandbox", f.sandbox, "command", f.command, "over_budget_bytes", f.overflow, "not_stored_bytes", lost)
	ev := subjects.NewLogEvent(subjects.SourceSystem, f.sandbox, f.command, []byte(msg))
	f.logs.Publish(ev)
	// Flush returns the writer's first error again: the note itself was
	// lost only when the count of bytes not stored grew.
	if err := f.logs.Flush(ctx); err != nil && (f.ow == nil || f.ow.Dropped() > max(lost, 0)) {
		b.log.Warn("write dropped-output log event", "sandbox", f.sandbox, "command", f.command, "err", err)
	}
	return f.overflow + max(lost, 0)
}

func lostText(n int64) string {
	if n < 0 {
		return "some bytes"
	}
	return fmt.Sprintf("%d bytes", n)
}

// logBudget is a sandbox's log budget: a token bucket of rate bytes per
// second holding up to four seconds' worth, and a total over the sandbox's
// life. Negative rate or total: no limit.
type logBudget struct {
	mu          sync.Mutex
	rate, burst float64
	tokens      float64
	last        time.Time
	total, left int64 // left of total; <0 when unlimited
}

func newLogBudget(rate, total int64, now time.Time) *logBudget {
	b := &logBudget{rate: float64(rate), burst: 4 * float64(rate), last: now, total: total, left: total}
	b.tokens = b.burst
	return b
}

// take returns how many of n bytes fit the budget now (and uses them up),
// and why the rest did not.
func (b *logBudget) take(n int, now time.Time) (int, string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	ok, why := n, ""
	if b.left >= 0 && int64(ok) > b.left {
		ok, why = int(b.left), fmt.Sprintf("over the sandbox's log budget of %d bytes in total", b.total)
	}
	if b.rate >= 0 {
		b.tokens = min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
		b.last = now
		if float64(ok) > b.tokens {
			ok, why = int(b.tokens), fmt.Sprintf("over the sandbox's log rate of %d bytes/s", int64(b.rate))
		}
		b.tokens -= float64(ok)
	}
	if b.left >= 0 {
		b.left -= int64(ok)
	}
	return ok, why
}

// logBudget returns the sandbox's log budget, made on first use.
func (s *session) logBudget(rate, total int64) *logBudget {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.budget == nil {
		s.budget = newLogBudget(rate, total, time.Now())
	}
	return s.budget
}

// outputCollector keeps the first cap bytes of each stream for the reply and
// forwards every chunk to the log stream.
type outputCollector struct {
	mu             sync.Mutex
	cap            int
	stdout, stderr []byte
	truncated      bool
	forward        agent.OutputFunc
}

func newOutputCollector(cap int, forward agent.OutputFunc) *outputCollector {
	return &outputCollector{cap: cap, forward: forward}
}

func (c *outputCollector) write(stream agent.Stream, data []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	buf := &c.stdout
	if stream == agent.Stderr {
		buf = &c.stderr
	}
	room := c.cap - len(*buf)
	if room < len(data) {
		c.truncated = true
	}
	if room > 0 {
		*buf = append(*buf, data[:min(room, len(data))]...)
	}
	c.forward(stream, data)
}

// encodeOutput returns the output as text, or as base64 when it is not valid
// UTF-8. When the reply cap cut the last rune in two, the partial rune is
// dropped rather than turning the whole output into base64.
func encodeOutput(b []byte, truncated bool) (text, b64 string) {
	if utf8.Valid(b) {
		return string(b), ""
	}
	for cut := 1; truncated && cut <= 3 && cut < len(b); cut++ {
		if head := b[:len(b)-cut]; utf8.Valid(head) && !utf8.FullRune(b[len(b)-cut:]) {
			return string(head), ""
		}
	}
	return "", base64.StdEncoding.EncodeToString(b)
}

// fitReply cuts the output a reply carries (keeping its head) until the
// reply encodes to at most max bytes, and sets Truncated when it cut: text
// full of characters JSON escapes grows up to six times. Each stream gets
// half the room, or what the other leaves.
func fitReply(r *subjects.ExecReply, max int) {
	out, errs := newOutputField(r.Stdout, r.StdoutB64), newOutputField(r.Stderr, r.StderrB64)
	bare := *r
	bare.Stdout, bare.StdoutB64, bare.Stderr, bare.StderrB64 = "", "", "", ""
	bare.Truncated = true
	base, _ := json.Marshal(bare)
	// The base64 fields are omitted when empty: count their names and
	// quotes once each, and some slack.
	room := max - len(base) - 64
	if out.size()+errs.size() <= room {
		return
	}
	r.Truncated = true
	roomOut := room / 2
	if errs.size() < room-roomOut {
		roomOut = room - errs.size()
	}
	out.cut(roomOut)
	errs.cut(room - out.size())
	r.Stdout, r.StdoutB64 = out.text, out.b64
	r.Stderr, r.StderrB64 = errs.text, errs.b64
}

// outputField is one stream's output in a reply: text or base64.
type outputField struct{ text, b64 string }

func newOutputField(text, b64 string) *outputField { return &outputField{text, b64} }

// size is the encoded size of the field's value (quotes included).
func (f *outputField) size() int {
	if f.b64 != "" {
		return len(f.b64) + 2
	}
	return jsonsize.String(f.text)
}

func (f *outputField) cut(room int) {
	room = max(room, 2)
	if f.b64 != "" {
		f.b64 = f.b64[:min(len(f.b64), (room-2)/4*4)]
		return
	}
	f.text, _ = jsonsize.Cut(f.text, room)
}
