package handlers

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// fakeCluster places every create on "w2" unless pinned, and answers a
// forwarded create on the client's reply subject as w2 would.
type fakeCluster struct {
	nc *nats.Conn

	mu       sync.Mutex
	pinned   []bool
	forwards []string // reply subjects
	draining bool
	full     bool
}

func (f *fakeCluster) Members(context.Context) ([]subjects.WorkerRecord, error) {
	return []subjects.WorkerRecord{{WorkerID: "w1", State: subjects.WorkerActive}, {WorkerID: "w2", State: subjects.WorkerActive}}, nil
}

func (f *fakeCluster) Place(_ context.Context, _ subjects.CreateSandboxRequest, pinned bool) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pinned = append(f.pinned, pinned)
	switch {
	case f.full:
		return "", errdefs.Wrap(errdefs.ErrCapacity, errors.New("draining, nowhere to go"))
	case pinned:
		return "", nil
	}
	return "w2", nil
}

func (f *fakeCluster) Forward(_ context.Context, target, reply string, data []byte) error {
	f.mu.Lock()
	f.forwards = append(f.forwards, reply)
	f.mu.Unlock()
	var req subjects.CreateSandboxRequest
	if err := json.Unmarshal(data, &req); err != nil || target != "w2" {
		return errors.New("bad forward")
	}
	out, _ := json.Marshal(subjects.Sandbox{SandboxID: "fwd", TemplateID: req.TemplateID, ClientID: target})
	return f.nc.Publish(reply, out)
}

func (f *fakeCluster) Drain(_ context.Context, req subjects.DrainRequest) (subjects.DrainReply, error) {
	f.mu.Lock()
	f.draining = true
	f.mu.Unlock()
	state := subjects.WorkerDraining
	if req.Wait {
		state = subjects.WorkerDrained
	}
	return subjects.DrainReply{WorkerID: "w1", State: state}, nil
}

func (f *fakeCluster) Draining() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.draining
}

func TestClusterEndpoints(t *testing.T) {
	nc := testenv.NATS(t)
	rt := &fakeRuntime{block: make(chan struct{})}
	fc := &fakeCluster{nc: nc}
	svc, err := New(nc, Config{WorkerID: "w1", Runtime: rt, Cluster: fc})
	if err != nil {
		t.Fatal(err)
	}
	if err := svc.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = svc.Stop(context.Background()) })
	c := client.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// Placed elsewhere: forwarded with the client's reply subject, and this
	// worker neither creates nor replies (one reply: the target's).
	inbox := nats.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.PublishRequest(subjects.Default.CreateSandbox(), inbox, []byte(`{"template_id":"tiny"}`)); err != nil {
		t.Fatal(err)
	}
	m, err := sub.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var sb subjects.Sandbox
	if err := json.Unmarshal(m.Data, &sb); err != nil || sb.ClientID != "w2" {
		t.Fatalf("forwarded create answered %s (%v)", m.Data, err)
	}
	if extra, err := sub.NextMsg(300 * time.Millisecond); err == nil {
		t.Errorf("second reply to a forwarded create: %s", extra.Data)
	}
	fc.mu.Lock()
	if len(fc.forwards) != 1 || fc.forwards[0] != inbox {
		t.Errorf("forwards %v, want one to %s", fc.forwards, inbox)
	}
	fc.mu.Unlock()
	rt.mu.Lock()
	for _, call := range rt.calls {
		if call == "create tiny" {
			t.Error("a forwarded create also ran here")
		}
	}
	rt.mu.Unlock()

	// Pinned: a forwarded create, and one on this worker's own subject.
	fwd := nats.NewMsg(subjects.Default.CreateSandbox())
	fwd.Data = []byte(`{"template_id":"here"}`)
	fwd.Header.Set(subjects.ForwardedHeader, "w9")
	if reply, err := nc.RequestMsgWithContext(ctx, fwd); err != nil || !json.Valid(reply.Data) || string(reply.Data) == "" {
		t.Fatalf("forwarded create: %v", err)
	}
	var own subjects.Sandbox
	if err := c.Request(ctx, subjects.Default.WorkerCreate("w1"), subjects.CreateSandboxRequest{TemplateID: "own"}, &own); err != nil || own.SandboxID != "sb1" {
		t.Fatalf("create on the worker's own subject: %+v %v", own, err)
	}
	fc.mu.Lock()
	if len(fc.pinned) != 3 || fc.pinned[0] || !fc.pinned[1] || !fc.pinned[2] {
		t.Errorf("placement pinned flags %v, want false, true, true", fc.pinned)
	}
	fc.mu.Unlock()

	var workers subjects.ListWorkersReply
	if err := c.Request(ctx, subjects.Default.ListWorkers(), struct{}{}, &workers); err != nil || len(workers.Workers) != 2 {
		t.Errorf("workers.list: %+v %v", workers, err)
	}
	var drain subjects.DrainReply
	if err := c.Request(ctx, subjects.Default.WorkerDrain("w1"), subjects.DrainRequest{Wait: true}, &drain); err != nil || drain.State != subjects.WorkerDrained {
		t.Errorf("drain: %+v %v", drain, err)
	}
	if err := c.Request(ctx, subjects.Default.WorkerDrain("w1"), map[string]any{"wait": "yes"}, &drain); subjects.CodeOf(err) != subjects.CodeInvalidRequest {
		t.Errorf("drain with a bad body: %v", err)
	}
	if _, err := c.SetPool(ctx, "tiny", 2); subjects.CodeOf(err) != subjects.CodeConflict {
		t.Errorf("pool.set while draining: %v, want conflict", err)
	}
	fc.mu.Lock()
	fc.full = true
	fc.mu.Unlock()
	_, err = c.Create(ctx, subjects.CreateSandboxRequest{TemplateID: "tiny"})
	if subjects.CodeOf(err) != subjects.CodeCapacityRejected {
		t.Errorf("create with nowhere to go: %v, want capacity_rejected", err)
	}
}
