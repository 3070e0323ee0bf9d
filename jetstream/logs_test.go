package jetstream

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	js "github.com/nats-io/nats.go/jetstream"

	"github.com/firkin-dev/firkin-worker/subjects"
)

// fakeFuture is an ack future the test resolves by hand.
type fakeFuture struct {
	ok   chan *js.PubAck
	err  chan error
	data []byte
}

func (f *fakeFuture) Ok() <-chan *js.PubAck { return f.ok }
func (f *fakeFuture) Err() <-chan error     { return f.err }
func (f *fakeFuture) Msg() *nats.Msg        { return &nats.Msg{Data: f.data} }

// fakePub records publishes; acks are given by the test (or at once when
// autoAck is set).
type fakePub struct {
	mu      sync.Mutex
	futures []*fakeFuture
	autoAck bool
	fail    error
}

func (p *fakePub) PublishAsync(_ string, data []byte, _ ...js.PublishOpt) (js.PubAckFuture, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.fail != nil {
		return nil, p.fail
	}
	// Copied, as a connection does: the publisher reuses its buffer once
	// the event is acknowledged.
	f := &fakeFuture{ok: make(chan *js.PubAck, 1), err: make(chan error, 1), data: append([]byte(nil), data...)}
	if p.autoAck {
		f.ok <- &js.PubAck{}
	}
	p.futures = append(p.futures, f)
	return f, nil
}

func (p *fakePub) events(t *testing.T) []subjects.LogEvent {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []subjects.LogEvent
	for _, f := range p.futures {
		var ev subjects.LogEvent
		if err := json.Unmarshal(f.data, &ev); err != nil {
			t.Fatal(err)
		}
		out = append(out, ev)
	}
	return out
}

func (p *fakePub) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.futures)
}

func (p *fakePub) future(i int) *fakeFuture {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.futures[i]
}

func eventBytes(ev subjects.LogEvent) []byte {
	if ev.MessageB64 != "" {
		b, _ := base64.StdEncoding.DecodeString(ev.MessageB64)
		return b
	}
	return []byte(ev.Message)
}

func TestLogPublisherBatchesOutput(t *testing.T) {
	pub := &fakePub{autoAck: true}
	p := newLogPublisher(pub, "logs.x", subjects.LogEvent{SandboxID: "sb"})
	p.linger = time.Hour                       // only size, a change of source and Flush publish
	line := []byte(strings.Repeat("y\n", 512)) // 1 KiB
	total := 0
	for range 300 { // 300 KiB
		p.Output(context.Background(), "stdout", "c1", line)
		total += len(line)
	}
	p.Output(context.Background(), "stderr", "c1", []byte("oops"))
	if err := p.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	evs := pub.events(t)
	// 300 KiB in 64 KiB events: 5 of stdout, then one of stderr.
	if len(evs) != 6 {
		t.Fatalf("%d events, want 6", len(evs))
	}
	got := 0
	for _, ev := range evs[:5] {
		if ev.Source != "stdout" || ev.CommandID != "c1" || ev.SandboxID != "sb" || ev.MessageB64 != "" {
			t.Errorf("event %+v", ev)
		}
		got += len(ev.Message)
	}
	if got != total {
		t.Errorf("stdout bytes %d, want %d", got, total)
	}
	if evs[5].Source != "stderr" || evs[5].Message != "oops" {
		t.Errorf("last event %+v", evs[5])
	}
	if p.Dropped() != 0 {
		t.Errorf("dropped %d", p.Dropped())
	}
}

func TestLogPublisherKeepsRunesWhole(t *testing.T) {
	pub := &fakePub{autoAck: true}
	p := newLogPublisher(pub, "logs.x", subjects.LogEvent{SandboxID: "sb"})
	p.linger = time.Hour
	// "é" is two bytes; an odd prefix makes a batch boundary cut one.
	text := "x" + strings.Repeat("é", MaxLogChunk)
	p.Output(context.Background(), "stdout", "c", []byte(text))
	if err := p.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	var sb strings.Builder
	for _, ev := range pub.events(t) {
		if ev.MessageB64 != "" {
			t.Fatalf("an event of text went to base64 (%d bytes)", len(eventBytes(ev)))
		}
		sb.WriteString(ev.Message)
	}
	if sb.String() != text {
		t.Errorf("text changed: %d bytes, want %d", sb.Len(), len(text))
	}
}

func TestLogPublisherLingers(t *testing.T) {
	pub := &fakePub{autoAck: true}
	p := newLogPublisher(pub, "logs.x", subjects.LogEvent{SandboxID: "sb"})
	p.linger = 5 * time.Millisecond
	p.Output(context.Background(), "stdout", "c", []byte("hello"))
	deadline := time.Now().Add(5 * time.Second)
	for pub.count() == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	evs := pub.events(t)
	if len(evs) != 1 || evs[0].Message != "hello" {
		t.Fatalf("events %+v, want one with hello after the linger", evs)
	}
}

func TestLogPublisherWindowBlocksThenMoves(t *testing.T) {
	pub := &fakePub{}
	p := newLogPublisher(pub, "logs.x", subjects.LogEvent{SandboxID: "sb"})
	p.window, p.linger = 2, time.Hour
	chunk := make([]byte, MaxLogChunk) // one full event per call
	p.Output(context.Background(), "stdout", "c", chunk)
	p.Output(context.Background(), "stdout", "c", chunk)
	done := make(chan struct{})
	go func() {
		p.Output(context.Background(), "stdout", "c", chunk) // window full: waits
		close(done)
	}()
	select {
	case <-done:
		t.Fatal("third event published while two were unacknowledged")
	case <-time.After(100 * time.Millisecond):
	}
	if n := pub.count(); n != 2 {
		t.Fatalf("%d publishes with a window of 2", n)
	}
	pub.future(0).ok <- &js.PubAck{}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the window did not move after an ack")
	}
	pub.future(1).ok <- &js.PubAck{}
	pub.future(2).err <- errors.New("stream full")
	if err := p.Flush(context.Background()); err == nil || !strings.Contains(err.Error(), "stream full") {
		t.Errorf("flush: %v, want the rejected event's error", err)
	}
	if got := p.Dropped(); got != MaxLogChunk {
		t.Errorf("dropped %d, want %d (the rejected event)", got, MaxLogChunk)
	}
}

func TestLogPublisherStallDropsAndCounts(t *testing.T) {
	pub := &fakePub{}
	p := newLogPublisher(pub, "logs.x", subjects.LogEvent{SandboxID: "sb"})
	p.window, p.linger, p.stall = 1, time.Hour, 50*time.Millisecond
	chunk := make([]byte, MaxLogChunk)
	p.Output(context.Background(), "stdout", "c", chunk) // in the window, never acked
	t0 := time.Now()
	p.Output(context.Background(), "stdout", "c", chunk) // stalls, dropped
	p.Output(context.Background(), "stdout", "c", chunk) // stalled: dropped at once
	if d := time.Since(t0); d > 2*time.Second {
		t.Errorf("two writes to a stalled window took %s", d)
	}
	if got := p.Dropped(); got != 2*MaxLogChunk {
		t.Errorf("dropped %d, want %d", got, 2*MaxLogChunk)
	}
	// The window moves: writes go through again.
	pub.future(0).ok <- &js.PubAck{}
	p.Output(context.Background(), "stdout", "c", chunk)
	if n := pub.count(); n != 2 {
		t.Errorf("%d publishes after the window moved, want 2", n)
	}
	// A cancelled writer does not wait either.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	p.stall = time.Hour
	p.Output(ctx, "stdout", "c", chunk)
	if got := p.Dropped(); got != 3*MaxLogChunk {
		t.Errorf("dropped %d after a cancelled write, want %d", got, 3*MaxLogChunk)
	}
}

func TestLogPublisherCountsPublishErrors(t *testing.T) {
	pub := &fakePub{fail: errors.New("connection closed")}
	p := newLogPublisher(pub, "logs.x", subjects.LogEvent{SandboxID: "sb"})
	p.Output(context.Background(), "stdout", "c", []byte("lost"))
	if err := p.Flush(context.Background()); err == nil {
		t.Error("flush after a failed publish: no error")
	}
	if got := p.Dropped(); got != 4 {
		t.Errorf("dropped %d, want 4", got)
	}
}

func TestLogsPageFitsMaxPayload(t *testing.T) {
	s := openStore(t)
	ctx := context.Background()
	p := s.Logs("big")
	const n = 60
	for i := range n {
		// 64 KiB of output that doubles in JSON (a quote per byte pair).
		p.Output(ctx, subjects.SourceStdout, "c"+string(rune('a'+i%26)), []byte(strings.Repeat("x\"", MaxLogChunk/2)))
	}
	if err := p.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	maxPayload := s.nc.MaxPayload()
	var cursor uint64
	seen := 0
	for range n + 1 { // every page makes progress
		page, err := s.ReadLogs(ctx, "big", cursor, 200)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := json.Marshal(page)
		if int64(len(body)) > maxPayload-replyHeadroom {
			t.Fatalf("page of %d events encodes to %d bytes, server max payload %d", len(page.Events), len(body), maxPayload)
		}
		if len(page.Events) == 0 {
			break
		}
		if seen+len(page.Events) < n && !page.Truncated {
			t.Errorf("a page of %d of %d events is not marked truncated", len(page.Events), n-seen)
		}
		seen += len(page.Events)
		cursor = page.NextCursor
	}
	if seen != n {
		t.Fatalf("paged %d events, want %d", seen, n)
	}

	// A bound smaller than one event: each page carries one event, cut.
	page, err := s.readLogs(ctx, s.subj.Logs("big"), 0, 10, 16<<10)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(page)
	if len(page.Events) != 1 || !page.Truncated || len(body) > 16<<10+64 || page.NextCursor == 0 {
		t.Fatalf("page under a 16 KiB bound: %d events, truncated %v, %d bytes, next %d", len(page.Events), page.Truncated, len(body), page.NextCursor)
	}
	next, err := s.readLogs(ctx, s.subj.Logs("big"), page.NextCursor, 10, 16<<10)
	if err != nil || len(next.Events) != 1 || next.NextCursor <= page.NextCursor {
		t.Fatalf("second page under a 16 KiB bound: %+v, %v", next.NextCursor, err)
	}
}

// BenchmarkLogOutput measures the host side of exec output into FIRKIN_LOGS
// (a real nats-server, file store): 30 MB written in 16 KiB chunks, then
// flushed. "batched" is the LogPublisher (64 KiB events, window of 16);
// "event-per-chunk" is what it replaced: one event per chunk, every ack
// future kept until the end.
func BenchmarkLogOutput(b *testing.B) {
	const total, chunk = 30_000_000, 16 << 10
	data := []byte(strings.Repeat("y\n", chunk/2))
	ctx := context.Background()
	b.Run("batched", func(b *testing.B) {
		s := openStore(b)
		b.SetBytes(total)
		for i := 0; b.Loop(); i++ {
			p := s.Logs(fmt.Sprintf("b%d", i))
			for n := 0; n < total; n += chunk {
				p.Output(ctx, subjects.SourceStdout, "c", data)
			}
			if err := p.Flush(ctx); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("event-per-chunk", func(b *testing.B) {
		s := openStore(b)
		b.SetBytes(total)
		for i := 0; b.Loop(); i++ {
			subject := s.subj.Logs(fmt.Sprintf("u%d", i))
			var futures []js.PubAckFuture
			for n := 0; n < total; n += chunk {
				ev, _ := json.Marshal(subjects.NewLogEvent(subjects.SourceStdout, "u", "c", data))
				f, err := s.js.PublishAsync(subject, ev)
				if err != nil {
					b.Fatal(err)
				}
				futures = append(futures, f)
			}
			for _, f := range futures {
				select {
				case <-f.Ok():
				case err := <-f.Err():
					b.Fatal(err)
				}
			}
		}
	})
}

func TestLogPublisherFlushCountsUnconfirmed(t *testing.T) {
	pub := &fakePub{}
	p := newLogPublisher(pub, "logs.x", subjects.LogEvent{SandboxID: "sb"})
	p.Output(context.Background(), "stdout", "c", []byte("never acked"))
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := p.Flush(ctx); err == nil {
		t.Fatal("flush without an ack: no error")
	}
	if got := p.Dropped(); got != int64(len("never acked")) {
		t.Errorf("dropped %d after an unconfirmed flush, want %d", got, len("never acked"))
	}
}
