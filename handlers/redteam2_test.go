package handlers

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// startRedteamService serves rt on a real NATS server, owning sandbox sb1.
func startRedteamService(t *testing.T, rt Runtime, cfg Config) *nats.Conn {
	t.Helper()
	nc := testenv.NATS(t)
	cfg.WorkerID, cfg.Runtime = "w1", rt
	svc, err := New(nc, cfg)
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
	return nc
}

// A client that sends requests to made-up verbs of a sandbox it may use
// must not mint a new endpoint label per request: every label is a
// Prometheus series (counter and histogram) and an entry of every
// firkin.worker.status reply, kept for the worker's life.
func TestRedteamEndpointLabelsBounded(t *testing.T) {
	var mu sync.Mutex
	seen := map[string]bool{}
	observed := 0
	nc := startRedteamService(t, &procRuntime{}, Config{Observe: func(endpoint string, _ subjects.Code, _ time.Duration) {
		mu.Lock()
		seen[endpoint] = true
		observed++
		mu.Unlock()
	}})
	const n = 60
	for i := range n {
		for _, verb := range []string{
			fmt.Sprintf("x%d", i),
			fmt.Sprintf("proc.bad%d.stdin", i),
			fmt.Sprintf("proc.k1234567890a.op%d", i),
			fmt.Sprintf("fs.nope%d", i),
		} {
			if _, err := nc.Request("firkin.sandbox.sb1."+verb, []byte(`{}`), 5*time.Second); err != nil {
				t.Fatalf("%s: %v", verb, err)
			}
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if observed < 4*n {
		t.Fatalf("observed %d requests, want %d", observed, 4*n)
	}
	if len(seen) > 10 {
		t.Fatalf("%d distinct endpoint labels from %d requests to made-up verbs (unbounded label cardinality)", len(seen), 4*n)
	}
}
