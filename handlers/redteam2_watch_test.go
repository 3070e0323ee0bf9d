package handlers

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// A watch subject rides in the request body, so it is not bounded by the
// server's control line the way a reply subject is: one of 8 KiB would
// make the worker's next publish to it overflow the control line, and the
// server would cut the worker's service connection (every client's
// replies in flight lost, repeatable at will).
func TestRedteamWatchSubjectBounded(t *testing.T) {
	nc := testenv.NATS(t)
	var disconnects atomic.Int32
	svcNC, err := nats.Connect(nc.ConnectedUrl(), nats.DisconnectErrHandler(func(*nats.Conn, error) { disconnects.Add(1) }))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(svcNC.Close)
	rt := &fsRuntime{files: map[string][]byte{}, events: make(chan []subjects.WatchEvent, 1)}
	svc, err := New(svcNC, Config{WorkerID: "w1", Runtime: rt})
	if err != nil {
		t.Fatal(err)
	}
	if err := svc.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = svc.Stop(ctx)
	})
	svc.Own("sb1")
	long := "_INBOX." + strings.Repeat("a", 8<<10)
	body := []byte(`{"path":"/work","subject":"` + long + `"}`)
	m, err := nc.Request("firkin.sandbox.sb1.fs.watch", body, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if m.Header.Get("Firkin-Error-Code") == "" {
		// Accepted: an event now goes to the long subject.
		rt.events <- []subjects.WatchEvent{{Op: subjects.WatchCreate, Name: "f"}}
		time.Sleep(500 * time.Millisecond)
	}
	if n := disconnects.Load(); n > 0 {
		t.Fatalf("the service connection was cut %d times by a watch subject of %d bytes", n, len(long))
	}
	if m.Header.Get("Firkin-Error-Code") != string(subjects.CodeInvalidRequest) {
		t.Fatalf("watch with a subject of %d bytes: %s %.100s", len(long), m.Header, m.Data)
	}
}
