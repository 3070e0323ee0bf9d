package jetstream

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"time"
	"unicode/utf8"

	js "github.com/nats-io/nats.go/jetstream"

	"github.com/firkin-dev/firkin-worker/subjects"
)

// MaxLogChunk is the most output bytes one log event carries; longer output
// is split over several events.
const MaxLogChunk = 64 << 10

// LogPublisher publishes log events of one subject asynchronously, in order,
// and waits for their acknowledgements in Flush.
type LogPublisher struct {
	js      js.JetStream
	subject string
	pending []js.PubAckFuture
	err     error
}

// Logs returns a publisher for the sandbox's log subject.
func (s *Store) Logs(sandboxID string) *LogPublisher {
	return &LogPublisher{js: s.js, subject: s.subj.Logs(sandboxID)}
}

// BuildLogs returns a publisher for a template build's log subject.
func (s *Store) BuildLogs(templateID string) *LogPublisher {
	return &LogPublisher{js: s.js, subject: s.subj.BuildLogs(templateID)}
}

// Publish sends ev (splitting long messages) without waiting for the ack.
// The first error is kept and returned by Flush.
func (p *LogPublisher) Publish(ev subjects.LogEvent) {
	if p.err != nil {
		return
	}
	for _, part := range splitEvent(ev) {
		data, err := json.Marshal(part)
		if err != nil {
			p.err = fmt.Errorf("encode log event: %w", err)
			return
		}
		f, err := p.js.PublishAsync(p.subject, data)
		if err != nil {
			p.err = fmt.Errorf("publish log event to %s: %w", p.subject, err)
			return
		}
		p.pending = append(p.pending, f)
	}
}

// Flush waits until every published event is stored, or ctx ends.
func (p *LogPublisher) Flush(ctx context.Context) error {
	for _, f := range p.pending {
		select {
		case <-f.Ok():
		case err := <-f.Err():
			if p.err == nil {
				p.err = fmt.Errorf("log event to %s not stored: %w", p.subject, err)
			}
		case <-ctx.Done():
			return fmt.Errorf("flush log events to %s: %w", p.subject, ctx.Err())
		}
	}
	p.pending = p.pending[:0]
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
func (s *Store) ReadLogs(ctx context.Context, sandboxID string, cursor uint64, limit int) (subjects.LogsReply, error) {
	return s.readLogs(ctx, s.subj.Logs(sandboxID), cursor, limit)
}

func (s *Store) readLogs(ctx context.Context, subject string, cursor uint64, limit int) (subjects.LogsReply, error) {
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
	batch, err := cons.Fetch(want, js.FetchMaxWait(2*time.Second))
	if err != nil {
		return reply, fmt.Errorf("read logs %s: %w", subject, err)
	}
	for msg := range batch.Messages() {
		meta, err := msg.Metadata()
		if err != nil {
			return reply, fmt.Errorf("read logs %s: %w", subject, err)
		}
		var ev subjects.LogEvent
		if err := json.Unmarshal(msg.Data(), &ev); err != nil {
			continue // not ours; skip rather than fail the page
		}
		reply.Events = append(reply.Events, ev)
		reply.NextCursor = meta.Sequence.Stream
	}
	if err := batch.Error(); err != nil && len(reply.Events) == 0 {
		return reply, fmt.Errorf("read logs %s: %w", subject, err)
	}
	return reply, nil
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
