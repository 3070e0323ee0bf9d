package jetstream

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"sync"
	"time"
	"unicode/utf8"

	js "github.com/nats-io/nats.go/jetstream"

	"github.com/firkin-dev/firkin-worker/internal/jsonsize"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// MaxLogChunk is the most output bytes one log event carries; longer output
// is split over several events, and output is batched into events of up to
// this size.
const MaxLogChunk = 64 << 10

// Defaults of a LogPublisher's flow control.
const (
	// DefaultLogWindow is how many log events may wait for their
	// acknowledgement at once per publisher; a full window blocks the
	// writer (and so the guest's output stream) until one is stored.
	DefaultLogWindow = 16
	// DefaultLogLinger is how long output waits for more output before it
	// is published as a smaller event.
	DefaultLogLinger = 5 * time.Millisecond
	// DefaultLogStall bounds how long a writer waits for a window slot;
	// after that, output is dropped and counted until the window moves.
	DefaultLogStall = 10 * time.Second
)

// LogPublisher publishes log events of one subject asynchronously, in order,
// with at most a window of unacknowledged events: when the window is full,
// Publish and Output wait (bounded) for the oldest acknowledgement. Output is
// batched into events of up to MaxLogChunk bytes, each published once it is
// full, when the next output is of another source or command, after a short
// linger, or by Flush. Output that could not be stored (a publish error, a
// rejected event, a stalled window) is counted in Dropped, never lost in
// silence. It is safe for concurrent use.
type LogPublisher struct {
	pub     asyncPublisher
	subject string
	base    subjects.LogEvent // SandboxID or TemplateID of every event
	window  int
	linger  time.Duration
	stall   time.Duration

	mu      sync.Mutex
	pending []pendingEvent  // oldest first, at most window
	free    []*bytes.Buffer // buffers of acknowledged events
	stalled bool            // the window did not move within stall: drop without waiting
	err     error
	dropped int64

	batch    []byte
	batchSrc string
	batchCmd string
	batchAt  time.Time
	timer    *time.Timer
}

// asyncPublisher is the part of JetStream a LogPublisher uses.
type asyncPublisher interface {
	PublishAsync(subject string, data []byte, opts ...js.PublishOpt) (js.PubAckFuture, error)
}

type pendingEvent struct {
	f     js.PubAckFuture
	bytes int           // output bytes the event carries
	buf   *bytes.Buffer // the encoded event, reused once acknowledged
}

func newLogPublisher(pub asyncPublisher, subject string, base subjects.LogEvent) *LogPublisher {
	return &LogPublisher{pub: pub, subject: subject, base: base, window: DefaultLogWindow, linger: DefaultLogLinger, stall: DefaultLogStall}
}

// Logs returns a publisher for the sandbox's log subject.
func (s *Store) Logs(sandboxID string) *LogPublisher {
	return newLogPublisher(s.js, s.subj.Logs(sandboxID), subjects.LogEvent{SandboxID: sandboxID})
}

// BuildLogs returns a publisher for a template build's log subject.
func (s *Store) BuildLogs(templateID string) *LogPublisher {
	return newLogPublisher(s.js, s.subj.BuildLogs(templateID), subjects.LogEvent{TemplateID: templateID})
}

// Publish sends ev (after any batched output, splitting long messages)
// without waiting for its acknowledgement, but waits while the window is
// full. The first error is kept and returned by Flush.
func (p *LogPublisher) Publish(ev subjects.LogEvent) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ctx := context.Background()
	p.emitLocked(ctx, true)
	for _, part := range splitEvent(ev) {
		p.publishLocked(ctx, part, len(part.Message)+base64.StdEncoding.DecodedLen(len(part.MessageB64)))
	}
}

// Output adds one chunk of a command's output (source stdout or stderr) to
// the current batch and publishes full batches. It blocks while the window
// is full, at most until ctx ends or the window stalls; output it cannot
// publish is counted in Dropped. data is not retained.
func (p *LogPublisher) Output(ctx context.Context, source, commandID string, data []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.batch) > 0 && (source != p.batchSrc || commandID != p.batchCmd) {
		p.emitLocked(ctx, true)
	}
	for len(data) > 0 {
		if p.batch == nil {
			p.batch = make([]byte, 0, MaxLogChunk) // the one batch buffer
		}
		if len(p.batch) == 0 {
			p.batchSrc, p.batchCmd, p.batchAt = source, commandID, time.Now()
		}
		n := min(len(data), MaxLogChunk-len(p.batch))
		p.batch = append(p.batch, data[:n]...)
		data = data[n:]
		if len(p.batch) >= MaxLogChunk {
			p.emitLocked(ctx, false)
		}
	}
	if len(p.batch) > 0 && p.timer == nil {
		p.timer = time.AfterFunc(p.linger, p.lingered)
	}
}

// lingered publishes output that waited the linger for more.
func (p *LogPublisher) lingered() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.timer = nil
	p.emitLocked(context.Background(), true)
}

// emitLocked publishes the current batch. Unless all is set, up to three
// bytes of a rune cut at the batch's end stay for the next batch, so text
// output does not turn into base64 at batch boundaries.
func (p *LogPublisher) emitLocked(ctx context.Context, all bool) {
	if len(p.batch) == 0 {
		return
	}
	n := len(p.batch)
	if !all {
		n = textCut(p.batch)
	}
	ev := subjects.NewLogEvent(p.batchSrc, p.base.SandboxID, p.batchCmd, p.batch[:n])
	ev.TemplateID = p.base.TemplateID
	ev.TimestampUnixSeconds, ev.Timestamp = p.batchAt.Unix(), p.batchAt.UTC().Format(time.RFC3339Nano)
	p.publishLocked(ctx, ev, n)
	rest := copy(p.batch, p.batch[n:])
	p.batch = p.batch[:rest]
	if rest == 0 && p.timer != nil {
		p.timer.Stop()
		p.timer = nil
	}
}

// textCut returns how much of b to publish now: all of it, unless b is valid
// UTF-8 but for a rune cut at its end, which is then held back.
func textCut(b []byte) int {
	for cut := 1; cut <= 3 && cut < len(b); cut++ {
		head, tail := b[:len(b)-cut], b[len(b)-cut:]
		if utf8.RuneStart(tail[0]) {
			if !utf8.FullRune(tail) && utf8.Valid(head) {
				return len(head)
			}
			break
		}
	}
	return len(b)
}

// publishLocked publishes one event once the window has room; n is how many
// output bytes it carries (counted as dropped when it is not stored).
func (p *LogPublisher) publishLocked(ctx context.Context, ev subjects.LogEvent, n int) {
	if err := p.roomLocked(ctx); err != nil {
		p.dropLocked(n, err)
		return
	}
	var buf *bytes.Buffer
	if k := len(p.free); k > 0 {
		buf, p.free = p.free[k-1], p.free[:k-1]
		buf.Reset()
	} else {
		buf = new(bytes.Buffer)
	}
	if err := json.NewEncoder(buf).Encode(ev); err != nil {
		p.dropLocked(n, fmt.Errorf("encode log event: %w", err))
		return
	}
	f, err := p.pub.PublishAsync(p.subject, bytes.TrimSuffix(buf.Bytes(), []byte("\n")))
	if err != nil {
		p.dropLocked(n, fmt.Errorf("publish log event to %s: %w", p.subject, err))
		p.free = append(p.free, buf)
		return
	}
	p.pending = append(p.pending, pendingEvent{f: f, bytes: n, buf: buf})
}

// doneLocked forgets the oldest pending event, acknowledged or failed (its
// buffer is reused: the publish no longer needs it).
func (p *LogPublisher) doneLocked() {
	if buf := p.pending[0].buf; buf != nil && buf.Cap() <= 2*MaxLogChunk*6 {
		p.free = append(p.free, buf)
	}
	p.pending = p.pending[1:]
}

// roomLocked waits until fewer than window events are unacknowledged. It
// gives up when ctx ends or the oldest event is not acknowledged within the
// stall timeout; once stalled, it does not wait again until the window
// moves.
func (p *LogPublisher) roomLocked(ctx context.Context) error {
	stalled := fmt.Errorf("log events to %s: no acknowledgement within %s with %d unacknowledged", p.subject, p.stall, p.window)
	p.reapLocked()
	if len(p.pending) < p.window {
		return nil
	}
	if p.stalled {
		return stalled
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("log events to %s: %w", p.subject, err)
	}
	timer := time.NewTimer(p.stall)
	defer timer.Stop()
	for len(p.pending) >= p.window {
		oldest := p.pending[0]
		select {
		case <-oldest.f.Ok():
		case err := <-oldest.f.Err():
			p.dropLocked(oldest.bytes, fmt.Errorf("log event to %s not stored: %w", p.subject, err))
		case <-ctx.Done():
			return fmt.Errorf("log events to %s: %w", p.subject, ctx.Err())
		case <-timer.C:
			p.stalled = true
			return stalled
		}
		p.doneLocked()
	}
	return nil
}

// reapLocked forgets acknowledged events at the head of the window.
func (p *LogPublisher) reapLocked() {
	for len(p.pending) > 0 {
		select {
		case <-p.pending[0].f.Ok():
		case err := <-p.pending[0].f.Err():
			p.dropLocked(p.pending[0].bytes, fmt.Errorf("log event to %s not stored: %w", p.subject, err))
		default:
			return
		}
		p.doneLocked()
		p.stalled = false
	}
	if len(p.pending) == 0 {
		p.pending = nil // let the backing array go
	}
}

func (p *LogPublisher) dropLocked(n int, err error) {
	p.dropped += int64(n)
	if p.err == nil {
		p.err = err
	}
}

// Dropped returns how many output bytes were not stored so far (publish
// errors, rejected events, a stalled window, a context that ended).
func (p *LogPublisher) Dropped() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.dropped
}

// Flush publishes the batched output and waits until every published event
// is stored, or ctx ends: events not acknowledged by then are counted in
// Dropped (not confirmed stored). It returns the first error since the
// publisher was made.
func (p *LogPublisher) Flush(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.emitLocked(ctx, true)
	for len(p.pending) > 0 {
		oldest := p.pending[0]
		select {
		case <-oldest.f.Ok():
		case err := <-oldest.f.Err():
			p.dropLocked(oldest.bytes, fmt.Errorf("log event to %s not stored: %w", p.subject, err))
		case <-ctx.Done():
			err := fmt.Errorf("flush log events to %s: %d events not acknowledged: %w", p.subject, len(p.pending), ctx.Err())
			for _, e := range p.pending {
				p.dropLocked(e.bytes, err)
			}
			p.pending, p.free, p.stalled = nil, nil, false
			return err
		}
		p.doneLocked()
	}
	p.pending, p.free, p.stalled = nil, nil, false
	return p.err
}

func splitEvent(ev subjects.LogEvent) []subjects.LogEvent {
	if len(ev.Message) <= MaxLogChunk && len(ev.MessageB64) <= MaxLogChunk*4/3+4 {
		return []subjects.LogEvent{ev}
	}
	var out []subjects.LogEvent
	if ev.MessageB64 != "" {
		raw, _ := base64.StdEncoding.DecodeString(ev.MessageB64)
		for len(raw) > 0 {
			n := min(len(raw), MaxLogChunk)
			part := ev
			part.MessageB64 = base64.StdEncoding.EncodeToString(raw[:n])
			out = append(out, part)
			raw = raw[n:]
		}
		return out
	}
	msg := ev.Message
	for len(msg) > 0 {
		n := min(len(msg), MaxLogChunk)
		for n < len(msg) && !utf8.RuneStart(msg[n]) {
			n-- // keep runes whole
		}
		part := ev
		part.Message = msg[:n]
		out = append(out, part)
		msg = msg[n:]
	}
	return out
}

// ReadLogs returns up to limit events of subject stored after cursor (a
// stream sequence; 0 reads from the start) and the cursor of the next page.
// A page is also bounded by bytes, so that its reply fits the connected
// server's max payload: when it stops early, Truncated is set and the rest
// follows from NextCursor.
func (s *Store) ReadLogs(ctx context.Context, sandboxID string, cursor uint64, limit int) (subjects.LogsReply, error) {
	return s.readLogs(ctx, s.subj.Logs(sandboxID), cursor, limit, LogsPageBytes(s.nc.MaxPayload()))
}

// replyHeadroom is what a reply needs beside its body (micro headers, the
// page's own fields).
const replyHeadroom = 8 << 10

// LogsPageBytes is how many bytes of encoded events a logs page may carry
// when replies may be maxPayload bytes long.
func LogsPageBytes(maxPayload int64) int {
	return int(max(maxPayload-replyHeadroom, 16<<10))
}

func (s *Store) readLogs(ctx context.Context, subject string, cursor uint64, limit, maxBytes int) (subjects.LogsReply, error) {
	reply := subjects.LogsReply{Events: []subjects.LogEvent{}, NextCursor: cursor}
	cfg := js.OrderedConsumerConfig{FilterSubjects: []string{subject}, DeliverPolicy: js.DeliverAllPolicy}
	if cursor > 0 {
		cfg.DeliverPolicy = js.DeliverByStartSequencePolicy
		cfg.OptStartSeq = cursor + 1
	}
	cons, err := s.js.OrderedConsumer(ctx, LogStream, cfg)
	if err != nil {
		return reply, fmt.Errorf("read logs %s: %w", subject, err)
	}
	info := cons.CachedInfo()
	if info == nil || info.NumPending == 0 {
		return reply, nil
	}
	want := min(limit, int(info.NumPending))
	// The server stops at maxBytes of messages (their data is about the
	// size of the events in the reply); the exact bound is kept below.
	batch, err := cons.Fetch(want, js.FetchMaxWait(2*time.Second), js.FetchMaxBytes(maxBytes))
	if err != nil {
		return reply, fmt.Errorf("read logs %s: %w", subject, err)
	}
	used, got := 0, 0
	for msg := range batch.Messages() {
		got++
		meta, err := msg.Metadata()
		if err != nil {
			return reply, fmt.Errorf("read logs %s: %w", subject, err)
		}
		var ev subjects.LogEvent
		if err := json.Unmarshal(msg.Data(), &ev); err != nil {
			reply.NextCursor = meta.Sequence.Stream
			continue // not ours; skip rather than fail the page
		}
		size := encodedLen(ev) + 1
		if used+size > maxBytes {
			reply.Truncated = true
			break
		}
		used += size
		reply.Events = append(reply.Events, ev)
		reply.NextCursor = meta.Sequence.Stream
	}
	if got < want {
		reply.Truncated = true // the server stopped at maxBytes (or the wait)
	}
	if len(reply.Events) == 0 && reply.NextCursor == cursor {
		// Not even one event fits the bound (a server with a small max
		// payload): return the first, cut, so that paging moves on.
		return s.readOversized(ctx, subject, cursor, maxBytes, reply, batch.Error())
	}
	return reply, nil
}

// readOversized returns a page of the one event after cursor, its message
// cut to fit maxBytes.
func (s *Store) readOversized(ctx context.Context, subject string, cursor uint64, maxBytes int, reply subjects.LogsReply, fetchErr error) (subjects.LogsReply, error) {
	cfg := js.OrderedConsumerConfig{FilterSubjects: []string{subject}, DeliverPolicy: js.DeliverByStartSequencePolicy, OptStartSeq: cursor + 1}
	if cursor == 0 {
		cfg.DeliverPolicy, cfg.OptStartSeq = js.DeliverAllPolicy, 0
	}
	cons, err := s.js.OrderedConsumer(ctx, LogStream, cfg)
	if err != nil {
		return reply, fmt.Errorf("read logs %s: %w", subject, err)
	}
	msg, err := cons.Next(js.FetchMaxWait(2 * time.Second))
	if err != nil {
		if fetchErr != nil {
			err = fetchErr
		}
		return reply, fmt.Errorf("read logs %s: %w", subject, err)
	}
	meta, err := msg.Metadata()
	if err != nil {
		return reply, fmt.Errorf("read logs %s: %w", subject, err)
	}
	reply.NextCursor = meta.Sequence.Stream
	var ev subjects.LogEvent
	if json.Unmarshal(msg.Data(), &ev) != nil {
		return reply, nil // not ours; the cursor moved past it
	}
	room := maxBytes - encodedLen(subjects.LogEvent{Timestamp: ev.Timestamp, TimestampUnixSeconds: ev.TimestampUnixSeconds,
		Source: ev.Source, SandboxID: ev.SandboxID, TemplateID: ev.TemplateID, CommandID: ev.CommandID}) - 32
	if ev.MessageB64 != "" {
		ev.MessageB64 = ev.MessageB64[:max(min(len(ev.MessageB64), room)/4*4, 0)]
	} else {
		ev.Message, _ = jsonsize.Cut(ev.Message, max(room, 2))
	}
	reply.Events = append(reply.Events, ev)
	reply.Truncated = true
	return reply, nil
}

func encodedLen(ev subjects.LogEvent) int {
	b, err := json.Marshal(ev)
	if err != nil {
		return 0
	}
	return len(b)
}

// PublishEvent publishes a lifecycle event on <prefix>.events.<kind>.<id>
// (captured by the FIRKIN_EVENTS stream).
func (s *Store) PublishEvent(ctx context.Context, ev subjects.LifecycleEvent) error {
	data, err := json.Marshal(ev)
	if err != nil {
		return fmt.Errorf("encode event: %w", err)
	}
	if _, err := s.js.Publish(ctx, s.subj.Event(ev.Kind, ev.SandboxID), data); err != nil {
		return fmt.Errorf("publish %s event for %s: %w", ev.Kind, ev.SandboxID, err)
	}
	return nil
}
