package handlers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// fakeRuntime is a logic-only stand-in for the backend: it records calls and
// answers from tables, so the handlers' decode/validate/reply paths can be
// tested without VMs (those are covered end to end in package worker).
type fakeRuntime struct {
	mu    sync.Mutex
	calls []string
	block chan struct{}
}

func (f *fakeRuntime) record(s string) {
	f.mu.Lock()
	f.calls = append(f.calls, s)
	f.mu.Unlock()
}

func (f *fakeRuntime) Create(_ context.Context, req subjects.CreateSandboxRequest) (subjects.Sandbox, error) {
	f.record("create " + req.TemplateID)
	if req.TemplateID == "boom" {
		return subjects.Sandbox{}, errors.New("qemu exploded at /secret/path")
	}
	return subjects.Sandbox{SandboxID: "sb1", TemplateID: req.TemplateID, State: subjects.StateRunning}, nil
}
func (f *fakeRuntime) List(context.Context) ([]subjects.Sandbox, error) { return nil, nil }
func (f *fakeRuntime) Get(_ context.Context, id string) (subjects.Sandbox, error) {
	return subjects.Sandbox{SandboxID: id}, nil
}
func (f *fakeRuntime) Exec(_ context.Context, id string, req subjects.ExecRequest) (subjects.ExecReply, error) {
	if req.Command == "block" {
		<-f.block
	}
	return subjects.ExecReply{Stdout: req.Command + "\n"}, nil
}
func (f *fakeRuntime) Kill(_ context.Context, id string) (subjects.KillReply, error) {
	return subjects.KillReply{SandboxID: id, State: subjects.StateStopped}, nil
}
func (f *fakeRuntime) SetTimeout(_ context.Context, id string, _ subjects.TimeoutRequest) (subjects.Sandbox, error) {
	return subjects.Sandbox{SandboxID: id}, nil
}
func (f *fakeRuntime) Logs(_ context.Context, id string, req subjects.LogsRequest) (subjects.LogsReply, error) {
	f.record(fmt.Sprintf("logs %s %d", id, req.Limit))
	return subjects.LogsReply{Events: []subjects.LogEvent{}}, nil
}
func (f *fakeRuntime) Snapshot(context.Context, string, subjects.SnapshotRequest) (subjects.SnapshotRecord, error) {
	return subjects.SnapshotRecord{}, nil
}
func (f *fakeRuntime) BuildTemplate(context.Context, subjects.BuildTemplateRequest) (subjects.SnapshotRecord, error) {
	return subjects.SnapshotRecord{}, nil
}
func (f *fakeRuntime) ListSnapshots(context.Context) ([]subjects.SnapshotRecord, error) {
	return []subjects.SnapshotRecord{{SnapshotID: "a"}}, nil
}
func (f *fakeRuntime) GetSnapshot(_ context.Context, sid string) (subjects.SnapshotRecord, error) {
	f.record("get snapshot " + sid)
	return subjects.SnapshotRecord{}, fmt.Errorf("%w: %s", subjects.ErrSnapshotNotFound, sid)
}
func (f *fakeRuntime) DeleteSnapshot(context.Context, string) (subjects.DeleteSnapshotReply, error) {
	return subjects.DeleteSnapshotReply{}, errdefs.Wrap(errdefs.ErrConflict, errors.New("in use"))
}
func (f *fakeRuntime) PoolStatus() subjects.PoolStatusReply {
	return subjects.PoolStatusReply{WorkerID: "w"}
}
func (f *fakeRuntime) SetPool(context.Context, subjects.PoolSetRequest) (subjects.PoolStatusReply, error) {
	return subjects.PoolStatusReply{WorkerID: "w"}, nil
}
func (f *fakeRuntime) Route(context.Context, string, subjects.RouteRequest) (subjects.RouteReply, error) {
	return subjects.RouteReply{}, errdefs.Wrap(errdefs.ErrUnsupported, errors.New("no proxy"))
}

func startService(t *testing.T) (*Service, *fakeRuntime, *client.Client, *nats.Conn) {
	t.Helper()
	nc := testenv.NATS(t)
	rt := &fakeRuntime{block: make(chan struct{})}
	svc, err := New(nc, Config{WorkerID: "w1", Runtime: rt})
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
	return svc, rt, client.New(nc), nc
}

func TestEndpointsAndErrors(t *testing.T) {
	svc, rt, c, nc := startService(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	sb, err := c.Create(ctx, subjects.CreateSandboxRequest{TemplateID: "tiny"})
	if err != nil || sb.SandboxID != "sb1" {
		t.Fatalf("create: %+v %v", sb, err)
	}
	// A 5xx hides nothing the client needs but carries an error id.
	_, err = c.Create(ctx, subjects.CreateSandboxRequest{TemplateID: "boom"})
	if subjects.CodeOf(err) != subjects.CodeRuntimeFailed {
		t.Fatalf("runtime failure: %v", err)
	}
	msg, err := nc.Request("firkin.sandbox.create", []byte(`{"template_id":"boom"}`), 5*time.Second)
	if err != nil || msg.Header.Get("Nats-Service-Error-Code") != "500" {
		t.Fatalf("headers: %v %v", msg, err)
	}
	var body subjects.ErrorBody
	_ = json.Unmarshal(msg.Data, &body)
	if body.Error.Code != subjects.CodeRuntimeFailed {
		t.Fatalf("body %s", msg.Data)
	}

	// Per-sandbox subjects answer only once owned.
	if _, err := c.Exec(ctx, "sb1", subjects.ExecRequest{Command: "x"}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("exec before own: %v", err)
	}
	svc.Own("sb1")
	r, err := c.Exec(ctx, "sb1", subjects.ExecRequest{Command: "x"})
	if err != nil || r.Stdout != "x\n" {
		t.Fatalf("exec: %+v %v", r, err)
	}
	// A long exec does not hold up the next request on the same sandbox.
	done := make(chan error, 1)
	go func() {
		_, err := c.Exec(ctx, "sb1", subjects.ExecRequest{Command: "block"})
		done <- err
	}()
	if _, err := c.Get(ctx, "sb1"); err != nil {
		t.Fatalf("get while an exec runs: %v", err)
	}
	close(rt.block)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	_, err = c.Route(ctx, "sb1", 80)
	if subjects.CodeOf(err) != subjects.CodeUnsupported {
		t.Fatalf("route: %v", err)
	}
	if err := c.RequestRaw(ctx, "firkin.sandbox.sb1.reboot", nil, nil); subjects.CodeOf(err) != subjects.CodeInvalidRequest {
		t.Fatalf("unknown verb: %v", err)
	}
	svc.Release("sb1")
	if _, err := c.Get(ctx, "sb1"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("get after release: %v", err)
	}

	// Logs are answered by any worker, with the default limit.
	if _, err := c.Logs(ctx, "gone1", subjects.LogsRequest{}); err != nil {
		t.Fatal(err)
	}
	// Snapshot ids with dots reach the runtime whole.
	if _, err := c.GetSnapshot(ctx, "my.snap"); subjects.CodeOf(err) != subjects.CodeSnapshotNotFound {
		t.Fatalf("get snapshot: %v", err)
	}
	if err := c.DeleteSnapshot(ctx, "x"); subjects.CodeOf(err) != subjects.CodeConflict {
		t.Fatalf("delete snapshot: %v", err)
	}
	if list, err := c.ListSnapshots(ctx); err != nil || len(list) != 1 {
		t.Fatalf("list snapshots: %v %v", list, err)
	}
	rt.mu.Lock()
	defer rt.mu.Unlock()
	want := map[string]bool{"logs gone1 100": true, "get snapshot my.snap": true}
	for _, c := range rt.calls {
		delete(want, c)
	}
	if len(want) != 0 {
		t.Errorf("runtime never saw %v (calls %v)", want, rt.calls)
	}
}

// TestForeignReplyIgnored: a request whose reply subject names a stream,
// KV, event or worker subject gets no answer there, on any server (this one
// lets everybody publish anything).
func TestForeignReplyIgnored(t *testing.T) {
	svc, rt, _, nc := startService(t)
	svc.Own("sb1")
	spy, err := nc.SubscribeSync(">")
	if err != nil {
		t.Fatal(err)
	}
	for _, reply := range []string{"$KV.firkin_snapshots.tiny", "$JS.API.STREAM.PURGE.FIRKIN_LOGS", "firkin.events.killed.sb1", "_FIRKIN_WORKER_INBOX.x"} {
		for _, subject := range []string{"firkin.sandbox.create", "firkin.sandbox.sb1.exec"} {
			if err := nc.PublishRequest(subject, reply, []byte(`{"template_id":"tiny","command":"x"}`)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(500 * time.Millisecond)
	for time.Now().Before(deadline) {
		m, err := spy.NextMsg(100 * time.Millisecond)
		if err != nil {
			continue
		}
		if !strings.HasPrefix(m.Subject, "firkin.sandbox.") {
			t.Errorf("the service answered on %s: %q", m.Subject, m.Data)
		}
	}
	rt.mu.Lock()
	defer rt.mu.Unlock()
	if len(rt.calls) != 0 {
		t.Errorf("the runtime ran %v for requests with foreign replies", rt.calls)
	}
}
