package worker_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	js "github.com/nats-io/nats.go/jetstream"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/worker"
)

// clusterSecret is the worker secret both workers share, so each
// authenticates the other's records.
const clusterSecret = "two-workers-one-cluster-shared-worker-secret-for-records"

// joinSharing starts a second worker that joins a's embedded server with
// a's worker identities (a cluster's workers share their NATS users) and the
// same secret, with a state directory of its own, and returns it as an env
// on a's client connection.
func joinSharing(t *testing.T, a *env) *env {
	t.Helper()
	m := joinWorker(t, a, func(c *worker.Config) { c.TokenSecret = clusterSecret })
	return &env{t: t, w: m.w, state: m.state, logs: m.logs, nc: a.nc, c: a.c}
}

// createOn makes a sandbox on one worker (its backend directly: creates
// through NATS go to any worker) and kills it when the test ends.
func createOn(t *testing.T, e *env, req subjects.CreateSandboxRequest) subjects.Sandbox {
	t.Helper()
	sb, err := e.w.Backend().Create(e.ctx(3*time.Minute), req)
	if err != nil {
		t.Fatalf("create %+v on worker %s: %v", req, e.w.ID(), err)
	}
	t.Cleanup(func() {
		if _, err := e.w.Backend().Kill(context.Background(), sb.SandboxID); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("kill %s: %v", sb.SandboxID, err)
		}
	})
	return sb
}

func poolOf(t *testing.T, e *env, template string) subjects.PoolTemplateStatus {
	t.Helper()
	for _, s := range e.w.Backend().PoolStatus().Templates {
		if s.TemplateID == template {
			return s
		}
	}
	return subjects.PoolTemplateStatus{}
}

// poolSet sends firkin.pool.set and returns every reply that came within 3
// seconds (an error reply as one with scope "error").
func poolSet(t *testing.T, nc *nats.Conn, req subjects.PoolSetRequest) []subjects.PoolStatusReply {
	t.Helper()
	data, _ := json.Marshal(req)
	inbox := nats.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := nc.PublishRequest("firkin.pool.set", inbox, data); err != nil {
		t.Fatal(err)
	}
	var out []subjects.PoolStatusReply
	deadline := time.Now().Add(3 * time.Second)
	for {
		m, err := sub.NextMsg(time.Until(deadline))
		if err != nil {
			return out
		}
		var r subjects.PoolStatusReply
		if err := json.Unmarshal(m.Data, &r); err != nil || r.WorkerID == "" {
			r.Scope = "error"
		}
		out = append(out, r)
	}
}

// TestTwoWorkersShareTemplatesAndSnapshots runs two workers on one NATS: the
// second takes the built-in template the first made instead of building
// its own, a template built on the first fills the second's warm pool, a
// continuation snapshot saved on the first restores on the second with its
// files, pool targets apply cluster-wide or per worker, deletes are refused
// while either worker uses a snapshot and remove the objects and the
// copies when they go through.
func TestTwoWorkersShareTemplatesAndSnapshots(t *testing.T) {
	a := startWorker(t, func(c *worker.Config) { c.TokenSecret = clusterSecret })
	tinyA, err := a.c.GetSnapshot(a.ctx(10*time.Second), "tiny")
	if err != nil {
		t.Fatal(err)
	}
	b := joinSharing(t, a)
	// (5) The second worker used the first's tiny: fetched, not rebuilt.
	tinyB, err := a.c.GetSnapshot(a.ctx(10*time.Second), "tiny")
	if err != nil {
		t.Fatal(err)
	}
	if tinyB.Generation != tinyA.Generation || tinyB.WorkerID != a.w.ID() {
		t.Errorf("tiny after the second worker started: generation %s by %s, want %s by %s (rebuilt?)", tinyB.Generation, tinyB.WorkerID, tinyA.Generation, a.w.ID())
	}
	if strings.Contains(b.logs.String(), "booting image tiny") {
		t.Error("the second worker booted tiny's image although the cluster has its template")
	}
	if !strings.Contains(b.logs.String(), "snapshot fetched from the object store") {
		t.Error("the second worker did not fetch tiny from the object store")
	}

	// (2) A template built on the first fills the second's warm pool.
	tpl, err := a.w.Backend().BuildTemplate(a.ctx(5*time.Minute), subjects.BuildTemplateRequest{
		TemplateID: "shared", From: "tiny", Steps: []string{"echo built-on-a > /root/built; sync"}})
	if err != nil {
		t.Fatal(err)
	}
	// (3) A target for the second worker only: only it answers.
	var replies []subjects.PoolStatusReply
	eventually(t, 2*time.Minute, "per-worker pool.set on the second worker", func() error {
		replies = poolSet(t, a.nc, subjects.PoolSetRequest{TemplateID: "shared", Target: 1, WorkerID: b.w.ID()})
		if len(replies) != 1 || replies[0].WorkerID != b.w.ID() || replies[0].Scope != "worker" {
			return fmt.Errorf("replies %+v", replies)
		}
		return nil
	})
	if poolOf(t, a, "shared").Target != 0 {
		t.Errorf("a target set for the second worker applies on the first: %+v", poolOf(t, a, "shared"))
	}
	eventually(t, 4*time.Minute, "a warm 'shared' machine on the second worker", func() error {
		if s := poolOf(t, b, "shared"); s.Ready < 1 {
			return fmt.Errorf("pool %+v", s)
		}
		return nil
	})
	sb := createOn(t, b, subjects.CreateSandboxRequest{TemplateID: "shared"})
	if sb.Source != subjects.SourcePool || sb.ClientID != b.w.ID() {
		t.Errorf("create of 'shared' on the second worker: source %s on %s, want pool on %s", sb.Source, sb.ClientID, b.w.ID())
	}
	if r := a.exec(sb.SandboxID, "cat /root/built"); r.Stdout != "built-on-a\n" {
		t.Errorf("sandbox of the shared template sees %q", r.Stdout)
	}
	// (4) Deleting the template is refused while the second worker's pool
	// (and its sandbox) use it.
	wantCode(t, "delete a template another worker pools", a.c.DeleteSnapshot(a.ctx(30*time.Second), "shared"), subjects.CodeConflict)

	// (1) A continuation snapshot saved on the first restores on the second.
	src := createOn(t, a, subjects.CreateSandboxRequest{TemplateID: "tiny"})
	a.exec(src.SandboxID, "echo saved-on-a > /root/cont; sync")
	rec, err := a.c.Snapshot(a.ctx(2*time.Minute), src.SandboxID, subjects.SnapshotRequest{Name: "cont-1"})
	if err != nil {
		t.Fatal(err)
	}
	if rec.WorkerID != a.w.ID() {
		t.Fatalf("snapshot saved by %s, want %s", rec.WorkerID, a.w.ID())
	}
	var times []time.Duration
	for i := range 2 {
		t0 := time.Now()
		clone := createOn(t, b, subjects.CreateSandboxRequest{SnapshotID: "cont-1"})
		r := a.exec(clone.SandboxID, "cat /root/cont")
		times = append(times, time.Since(t0))
		if clone.Source != subjects.SourceRestore || r.Stdout != "saved-on-a\n" {
			t.Fatalf("restore %d of cont-1 on the second worker: source %s, sees %q", i, clone.Source, r.Stdout)
		}
		if _, err := b.w.Backend().Kill(b.ctx(time.Minute), clone.SandboxID); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("cross-worker restore of a %d MiB continuation snapshot (create → first stdout): first use with the fetch %s, cached %s",
		rec.SizeBytes>>20, times[0].Round(time.Millisecond), times[1].Round(time.Millisecond))
	for _, e := range []*env{a, b} {
		for _, line := range strings.Split(e.logs.String(), "\n") {
			if strings.Contains(line, "snapshot=cont-1") && (strings.Contains(line, "uploaded") || strings.Contains(line, "fetched") || strings.Contains(line, "waiting")) {
				t.Log(line)
			}
		}
	}
	cached := filepath.Join(b.state, "snapshots", "cont-1."+rec.Generation)
	if _, err := os.Stat(cached); err != nil {
		t.Fatalf("the second worker has no copy of cont-1: %v", err)
	}

	// Delete goes through once nothing uses it: objects and copies go.
	if _, err := a.w.Backend().Kill(a.ctx(time.Minute), src.SandboxID); err != nil {
		t.Fatal(err)
	}
	if _, err := b.w.Backend().DeleteSnapshot(b.ctx(time.Minute), "cont-1"); err != nil {
		t.Fatalf("delete cont-1: %v", err)
	}
	j, _ := js.New(a.workerConn())
	obs, err := j.ObjectStore(a.ctx(10*time.Second), "firkin_artifacts")
	if err != nil {
		t.Fatal(err)
	}
	for _, art := range rec.Artifacts {
		if _, err := obs.GetInfo(a.ctx(10*time.Second), "cont-1/"+rec.Generation+"/"+art.Name); !errors.Is(err, js.ErrObjectNotFound) {
			t.Errorf("object of artifact %s after the delete: %v", art.Name, err)
		}
	}
	eventually(t, 30*time.Second, "the first worker drops its copy of cont-1", func() error {
		if _, err := os.Stat(filepath.Join(a.state, "snapshots", "cont-1."+rec.Generation)); !os.IsNotExist(err) {
			return fmt.Errorf("still there: %v", err)
		}
		return nil
	})
	if _, err := os.Stat(cached); !os.IsNotExist(err) {
		t.Errorf("the deleting worker kept its copy: %v", err)
	}

	// (3) A cluster-wide target applies on both workers; it also blocks the
	// template's delete.
	replies = poolSet(t, a.nc, subjects.PoolSetRequest{TemplateID: "shared", Target: 0})
	if len(replies) != 2 || replies[0].Scope != "cluster" || replies[1].Scope != "cluster" {
		t.Errorf("cluster-wide pool.set replies: %+v", replies)
	}
	eventually(t, 30*time.Second, "target 0 on both workers", func() error {
		if pa, pb := poolOf(t, a, "shared"), poolOf(t, b, "shared"); pa.Target != 0 || pb.Target != 0 {
			return fmt.Errorf("first %+v, second %+v", pa, pb)
		}
		return nil
	})
	if _, err := b.w.Backend().Kill(b.ctx(time.Minute), sb.SandboxID); err != nil {
		t.Fatal(err)
	}
	if _, err := a.w.Backend().DeleteSnapshot(a.ctx(time.Minute), "shared"); err != nil {
		t.Fatalf("delete 'shared' once nothing uses it: %v", err)
	}
	eventually(t, 30*time.Second, "the second worker drops 'shared'", func() error {
		if _, err := os.Stat(filepath.Join(b.state, "templates", "shared.json")); !os.IsNotExist(err) {
			return fmt.Errorf("registry file still there: %v", err)
		}
		if _, err := os.Stat(filepath.Join(b.state, "snapshots", "shared."+tpl.Generation)); !os.IsNotExist(err) {
			return fmt.Errorf("copy still there: %v", err)
		}
		return nil
	})
}
