package jetstream

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/subjects"
)

func openStore(t testing.TB) *Store {
	t.Helper()
	nc := testenv.NATS(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := Open(ctx, nc, Config{}); err != nil {
		t.Fatal(err)
	}
	s, err := Open(ctx, nc, Config{}) // idempotent
	if err != nil {
		t.Fatalf("second Open: %v", err)
	}
	return s
}

func TestSessionsAndSnapshots(t *testing.T) {
	s := openStore(t)
	ctx := context.Background()
	if _, err := s.GetSession(ctx, "nope"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("missing session: %v", err)
	}
	sb := subjects.Sandbox{SandboxID: "abc", ClientID: "w1", State: subjects.StateRunning}
	if err := s.PutSession(ctx, sb); err != nil {
		t.Fatal(err)
	}
	got, err := s.GetSession(ctx, "abc")
	if err != nil || got.ClientID != "w1" {
		t.Fatalf("GetSession = %+v, %v", got, err)
	}
	list, err := s.ListSessions(ctx)
	if err != nil || len(list) != 1 {
		t.Fatalf("ListSessions = %v, %v", list, err)
	}
	if err := s.DeleteSession(ctx, "abc"); err != nil {
		t.Fatal(err)
	}
	if list, _ := s.ListSessions(ctx); len(list) != 0 {
		t.Fatalf("after delete: %v", list)
	}

	rec := subjects.SnapshotRecord{SnapshotID: "s1", Kind: subjects.KindTemplate}
	if err := s.CreateSnapshot(ctx, rec); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateSnapshot(ctx, rec); !errors.Is(err, errdefs.ErrConflict) {
		t.Fatalf("second create: %v, want conflict", err)
	}
	if _, err := s.GetSnapshot(ctx, "s2"); subjects.CodeOf(err) != subjects.CodeSnapshotNotFound {
		t.Fatalf("missing snapshot code = %s", subjects.CodeOf(err))
	}
}

func TestLogsPaging(t *testing.T) {
	s := openStore(t)
	ctx := context.Background()
	p := s.Logs("sb1")
	for i := 0; i < 5; i++ {
		p.Publish(subjects.NewLogEvent(subjects.SourceStdout, "sb1", "c1", []byte{byte('a' + i)}))
	}
	big := strings.Repeat("x", 3*MaxLogChunk+10)
	p.Publish(subjects.NewLogEvent(subjects.SourceStdout, "sb1", "c2", []byte(big)))
	p.Publish(subjects.NewLogEvent(subjects.SourceStderr, "sb1", "c3", []byte{0xff, 0xfe}))
	if err := p.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	s.Logs("other").Publish(subjects.NewLogEvent(subjects.SourceSystem, "other", "", []byte("noise")))

	page, err := s.ReadLogs(ctx, "sb1", 0, 3)
	if err != nil || len(page.Events) != 3 || page.Events[0].Message != "a" {
		t.Fatalf("page 1 = %+v, %v", page, err)
	}
	var all []subjects.LogEvent
	all = append(all, page.Events...)
	for page.NextCursor != 0 {
		next, err := s.ReadLogs(ctx, "sb1", page.NextCursor, 3)
		if err != nil {
			t.Fatal(err)
		}
		if len(next.Events) == 0 {
			break
		}
		all = append(all, next.Events...)
		page = next
	}
	var joined strings.Builder
	for _, ev := range all {
		if ev.SandboxID != "sb1" {
			t.Fatalf("foreign event %+v", ev)
		}
		if ev.CommandID == "c2" {
			joined.WriteString(ev.Message)
		}
	}
	if joined.String() != big {
		t.Fatalf("big output: got %d bytes, want %d", joined.Len(), len(big))
	}
	if last := all[len(all)-1]; last.MessageB64 != "//4=" || last.Source != subjects.SourceStderr {
		t.Fatalf("binary event = %+v", last)
	}
}
