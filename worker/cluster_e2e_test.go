package worker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	js "github.com/nats-io/nats.go/jetstream"

	"github.com/firkin-dev/firkin-worker/backend"
	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/jobs"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/worker"
)

// clusterOpts are the settings both workers of a cluster test share: short
// heartbeats, one token secret (session records are signed with it), room
// for four sandboxes each.
func clusterOpts(c *worker.Config) {
	c.HeartbeatInterval = 200 * time.Millisecond
	c.TokenSecret = "cluster-test-secret-0123456789"
	c.Limits = backend.Limits{MaxSessions: 4, MaxMemoryMB: 8192}
}

// member is a second worker that joined the first one's embedded server.
type member struct {
	w       *worker.Worker
	state   string
	logs    *syncWriter
	crashed bool
}

// joinWorker starts a second worker on e's embedded NATS server, with the
// first worker's store and service identities.
func joinWorker(t *testing.T, e *env, opts ...envOption) *member {
	t.Helper()
	img := testenv.Image(t, runtime.GOARCH)
	logs := &syncWriter{}
	cfg := worker.Config{
		StateDir:        t.TempDir(),
		NATSURL:         e.w.NATSURL(),
		NATSNkey:        filepath.Join(e.state, worker.WorkerSeedFile),
		NATSServiceNkey: filepath.Join(e.state, worker.ServiceSeedFile),
		ProxyListen:     "127.0.0.1:0",
		AgentBinary:     testenv.AgentBinary(t, runtime.GOARCH),
		Image:           &img,
		Accel:           "auto",
		Pool:            map[string]int{},
		WaitTemplates:   true,
		Logger:          slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	for _, o := range opts {
		o(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	w, err := worker.Start(ctx, cfg)
	if err != nil {
		t.Fatalf("start second worker: %v\n%s", err, logs.String())
	}
	m := &member{w: w, state: cfg.StateDir, logs: logs}
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := w.Stop(sctx); err != nil && !m.crashed {
			t.Errorf("stop second worker: %v", err)
		}
		if t.Failed() {
			t.Logf("second worker log (tail):\n%s", tail(logs.String(), 6000))
			dumpConsoles(t, cfg.StateDir)
		}
	})
	return m
}

func (e *env) workers() []subjects.WorkerRecord {
	e.t.Helper()
	var rep subjects.ListWorkersReply
	if err := e.c.Request(e.ctx(30*time.Second), subjects.Default.ListWorkers(), struct{}{}, &rep); err != nil {
		e.t.Fatalf("workers.list: %v", err)
	}
	return rep.Workers
}

func (e *env) createOn(ctx context.Context, workerID string, req subjects.CreateSandboxRequest) (subjects.Sandbox, error) {
	var sb subjects.Sandbox
	err := e.c.Request(ctx, subjects.Default.WorkerCreate(workerID), req, &sb)
	return sb, err
}

func (e *env) sessionState(id string) (string, error) {
	// A short bound: a request the queue group handed to a worker that
	// just crashed is lost, and the poll asks again.
	list, err := e.c.List(e.ctx(3 * time.Second))
	if err != nil {
		return "", err
	}
	for _, sb := range list {
		if sb.SandboxID == id {
			return sb.State, nil
		}
	}
	return "", fmt.Errorf("sandbox %s not listed", id)
}

// TestClusterTwoWorkers runs two workers on one NATS server: both are
// members, creates spread over both, a requested id is owned by one of
// them only, a drained worker takes no creates, and the sandboxes of a
// worker that crashed are marked lost within the bound and their ids can be
// claimed again.
func TestClusterTwoWorkers(t *testing.T) {
	e := startWorker(t, clusterOpts)
	m2 := joinWorker(t, e, clusterOpts)
	id1, id2 := e.w.ID(), m2.w.ID()
	if id1 == id2 {
		t.Fatal("both workers have one id")
	}

	// Members.
	eventually(t, 5*time.Second, "workers.list shows both", func() error {
		ws := e.workers()
		if len(ws) != 2 {
			return fmt.Errorf("%d members: %+v", len(ws), ws)
		}
		for _, w := range ws {
			if w.State != subjects.WorkerActive || w.Capacity.Sandboxes != 4 || w.Driver == "" || w.Version == "" {
				return fmt.Errorf("member %+v", w)
			}
		}
		return nil
	})

	// Creates spread: six through the queue group, both workers own some.
	owned := map[string][]string{}
	for i := range 6 {
		sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", TimeoutS: 600})
		owned[sb.ClientID] = append(owned[sb.ClientID], sb.SandboxID)
		if got := e.exec(sb.SandboxID, "echo "+sb.SandboxID); strings.TrimSpace(got.Stdout) != sb.SandboxID {
			t.Fatalf("create %d: exec on %s: %+v", i, sb.SandboxID, got)
		}
	}
	if len(owned[id1]) == 0 || len(owned[id2]) == 0 || len(owned[id1])+len(owned[id2]) != 6 {
		t.Fatalf("creates not spread over both workers: %v", owned)
	}
	t.Logf("six creates: %d on %s, %d on %s", len(owned[id1]), id1, len(owned[id2]), id2)
	// Keep one sandbox on each worker.
	for _, ids := range owned {
		for _, id := range ids[1:] {
			if err := e.c.Kill(e.ctx(time.Minute), id); err != nil {
				t.Fatal(err)
			}
		}
	}
	keep2 := owned[id2][0]

	// One id claimed on both workers at once: one owns it, the other says
	// conflict.
	dup := "dup-" + backend.NewID(8)
	type result struct {
		sb  subjects.Sandbox
		err error
	}
	results := make(chan result, 2)
	for _, wid := range []string{id1, id2} {
		go func() {
			sb, err := e.createOn(e.ctx(3*time.Minute), wid, subjects.CreateSandboxRequest{TemplateID: "tiny", SandboxID: dup})
			results <- result{sb, err}
		}()
	}
	var won, conflicts int
	for range 2 {
		r := <-results
		switch {
		case r.err == nil:
			won++
			t.Cleanup(func() { _ = e.c.Kill(context.Background(), dup) })
		case subjects.CodeOf(r.err) == subjects.CodeConflict:
			conflicts++
		default:
			t.Errorf("concurrent create of %s: %v", dup, r.err)
		}
	}
	if won != 1 || conflicts != 1 {
		t.Fatalf("concurrent creates of one id: %d succeeded, %d conflicts; want 1 and 1", won, conflicts)
	}
	if st, err := e.sessionState(dup); err != nil || st != subjects.StateRunning {
		t.Errorf("record of %s: %q, %v", dup, st, err)
	}
	if err := e.c.Kill(e.ctx(time.Minute), dup); err != nil {
		t.Fatal(err)
	}
	// A create that fails after its id was claimed (no worker admits 16
	// GiB) releases the claim: the id is free again.
	big := "big-" + backend.NewID(8)
	_, err := e.c.Create(e.ctx(time.Minute), subjects.CreateSandboxRequest{TemplateID: "tiny", SandboxID: big, Resources: &subjects.Resources{MemoryMB: 16384}})
	wantCode(t, "create over every worker's memory", err, subjects.CodeCapacityRejected)
	if st, err := e.sessionState(big); err == nil {
		t.Errorf("failed create left a record in state %s", st)
	}
	if sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", SandboxID: big}); sb.SandboxID != big {
		t.Errorf("id of a failed create not free again: %+v", sb)
	}
	if err := e.c.Kill(e.ctx(time.Minute), big); err != nil {
		t.Fatal(err)
	}

	// Drain the second worker: answered when drained; new creates go to
	// the first; its running sandbox keeps running.
	var drained subjects.DrainReply
	if err := e.c.Request(e.ctx(time.Minute), subjects.Default.WorkerDrain(id2), subjects.DrainRequest{Wait: true, TimeoutS: 10}, &drained); err != nil {
		t.Fatalf("drain: %v", err)
	}
	if drained.State != subjects.WorkerDrained || drained.WorkerID != id2 || drained.Sandboxes != 1 {
		t.Errorf("drain reply %+v; want %s drained with one sandbox", drained, id2)
	}
	for _, w := range e.workers() {
		if w.WorkerID == id2 && w.State != subjects.WorkerDrained {
			t.Errorf("heartbeat of the drained worker says %s", w.State)
		}
	}
	for range 2 {
		if sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"}); sb.ClientID != id1 {
			t.Errorf("create after drain placed on %s, want %s", sb.ClientID, id1)
		}
	}
	_, err = e.createOn(e.ctx(time.Minute), id2, subjects.CreateSandboxRequest{TemplateID: "tiny"})
	wantCode(t, "create on the drained worker's own subject", err, subjects.CodeCapacityRejected)
	if got := e.exec(keep2, "echo still"); strings.TrimSpace(got.Stdout) != "still" {
		t.Errorf("sandbox on the drained worker: %+v", got)
	}

	// The second worker crashes (no goodbye): its sandbox is marked lost
	// within the heartbeat TTL and one interval, with one event, and its
	// id can be claimed again.
	lost, err := e.nc.SubscribeSync(subjects.Default.Event(subjects.EventLost, keep2))
	if err != nil {
		t.Fatal(err)
	}
	_ = e.nc.Flush()
	bound := e.w.Cluster().LostWithin()
	m2.crashed = true
	worker.Crash(m2.w)
	crashed := time.Now()
	msg, err := lost.NextMsg(bound + 5*time.Second)
	if err != nil {
		t.Fatalf("lost event: %v", err)
	}
	// The worker's last beat was at most an interval before the crash;
	// the server's expiry and the event's delivery add a little.
	if took := time.Since(crashed); took > bound+500*time.Millisecond {
		t.Errorf("marked lost after %s; bound %s", took, bound)
	}
	var ev subjects.LifecycleEvent
	if err := json.Unmarshal(msg.Data, &ev); err != nil || ev.SandboxID != keep2 || ev.WorkerID != id2 {
		t.Errorf("lost event %s: %v", msg.Data, err)
	}
	eventually(t, 10*time.Second, "sandbox of the crashed worker listed lost", func() error {
		st, err := e.sessionState(keep2)
		if err != nil {
			return err
		}
		if st != subjects.StateLost {
			return fmt.Errorf("state %s", st)
		}
		return nil
	})
	if extra, err := lost.NextMsg(time.Second); err == nil {
		t.Errorf("second lost event: %s", extra.Data)
	}
	if ws := e.workers(); len(ws) != 1 || ws[0].WorkerID != id1 {
		t.Errorf("members after the crash: %+v", ws)
	}
	sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", SandboxID: keep2})
	if sb.ClientID != id1 || sb.State != subjects.StateRunning {
		t.Errorf("lost id claimed again: %+v", sb)
	}
}

// TestClusterRecoveryKeepsClaimedIDs: a worker (a child process, with
// --keep-machines) is killed; its sandboxes are marked lost; one id is
// claimed on the other worker meanwhile. The restarted worker reattaches
// the sandbox nobody claimed and leaves the claimed id to its new owner
// (its own old machine of that id is swept).
func TestClusterRecoveryKeepsClaimedIDs(t *testing.T) {
	e := startWorker(t, clusterOpts)
	agentBin := testenv.AgentBinary(t, runtime.GOARCH)
	bin := workerBinary(t)
	state := t.TempDir()
	shareDebCache(t, state)
	args := []string{"--state-dir", state, "--nats-url", e.w.NATSURL(),
		"--nats-nkey", filepath.Join(e.state, worker.WorkerSeedFile), "--nats-service-nkey", filepath.Join(e.state, worker.ServiceSeedFile),
		"--token-secret", "cluster-test-secret-0123456789", "--heartbeat-interval", "200ms",
		"--proxy-listen", "127.0.0.1:0", "--agent", agentBin, "--accel", "auto", "--pool", "", "--keep-machines"}
	first := startBinary(t, bin, args...)
	var id2 string
	eventually(t, 10*time.Second, "second worker listed", func() error {
		for _, w := range e.workers() {
			if w.WorkerID != e.w.ID() {
				id2 = w.WorkerID
				return nil
			}
		}
		return fmt.Errorf("not yet")
	})
	ctx := e.ctx(5 * time.Minute)
	claimed, kept := "rc-"+backend.NewID(8), "rk-"+backend.NewID(8)
	for _, id := range []string{claimed, kept} {
		if _, err := e.createOn(ctx, id2, subjects.CreateSandboxRequest{TemplateID: "tiny", SandboxID: id, TimeoutS: 600}); err != nil {
			t.Fatalf("create %s on %s: %v", id, id2, err)
		}
		t.Cleanup(func() { _ = e.c.Kill(context.Background(), id) })
	}
	e.exec(kept, "echo survived > /root/mark; sync")

	_ = first.cmd.Process.Kill() // crash; the machines live on
	<-first.done
	eventually(t, e.w.Cluster().LostWithin()+5*time.Second, "sandboxes of the killed worker marked lost", func() error {
		for _, id := range []string{claimed, kept} {
			if st, err := e.sessionState(id); err != nil || st != subjects.StateLost {
				return fmt.Errorf("%s: %s %v", id, st, err)
			}
		}
		return nil
	})
	sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", SandboxID: claimed})
	if sb.ClientID != e.w.ID() {
		t.Fatalf("lost id claimed by %s", sb.ClientID)
	}
	e.exec(claimed, "echo first-worker > /root/owner")

	startBinary(t, bin, args...)
	eventually(t, time.Minute, "unclaimed sandbox reattached", func() error {
		r, err := e.c.Exec(e.ctx(30*time.Second), kept, subjects.ExecRequest{Command: "cat /root/mark"})
		if err != nil || r.Stdout != "survived\n" {
			return fmt.Errorf("%+v %v", r, err)
		}
		return nil
	})
	if st, err := e.sessionState(kept); err != nil || st != subjects.StateRunning {
		t.Errorf("reattached sandbox's record: %s %v", st, err)
	}
	list, err := e.c.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range list {
		if s.SandboxID == claimed && (s.ClientID != e.w.ID() || s.State != subjects.StateRunning) {
			t.Errorf("claimed id's record after the old owner came back: %+v", s)
		}
	}
	if r := e.exec(claimed, "cat /root/owner"); r.Stdout != "first-worker\n" {
		t.Errorf("claimed id answered by another machine: %+v", r)
	}
	if procs := qemuProcesses(filepath.Join(state, "sandboxes", claimed)); len(procs) != 0 {
		t.Errorf("the old machine of the claimed id still runs: %v", procs)
	}
}

// TestClusterDrainHandsJobsBack: a worker running a job is drained with a
// short timeout; the job is handed back and completes on the other worker,
// and the jobs submitted afterwards run there too.
func TestClusterDrainHandsJobsBack(t *testing.T) {
	opts := func(c *worker.Config) {
		clusterOpts(c)
		c.JobConcurrency = 1
		c.Pool = map[string]int{"tiny": 1}
	}
	e := startWorker(t, opts)
	m2 := joinWorker(t, e, opts)
	ids := map[string]bool{e.w.ID(): true, m2.w.ID(): true}
	j, err := js.New(e.nc)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := j.KeyValue(e.ctx(time.Minute), jobs.ResultsBucket)
	if err != nil {
		t.Fatal(err)
	}
	je := &jobsEnv{env: e, kv: kv}
	slow := "slow-" + backend.NewID(6)
	je.submit(`{"job_id":"`+slow+`","template_id":"tiny","commands":["sleep 4","echo done"]}`, "")
	var runner string
	eventually(t, time.Minute, "the slow job runs", func() error {
		for _, w := range e.workers() {
			if w.Load.Jobs == 1 {
				runner = w.WorkerID
				return nil
			}
		}
		return fmt.Errorf("no worker runs it")
	})
	delete(ids, runner)
	var other string
	for id := range ids {
		other = id
	}
	var rep subjects.DrainReply
	t0 := time.Now()
	if err := e.c.Request(e.ctx(time.Minute), subjects.Default.WorkerDrain(runner), subjects.DrainRequest{Wait: true, TimeoutS: 1}, &rep); err != nil {
		t.Fatalf("drain %s: %v", runner, err)
	}
	if rep.State != subjects.WorkerDrained || rep.JobsRunning != 0 {
		t.Errorf("drain reply %+v", rep)
	}
	if took := time.Since(t0); took > 4*time.Second {
		t.Errorf("drain with a 1 s timeout took %s: the job was not handed back", took)
	}
	res := je.result(slow, 2*time.Minute)
	if res.Status != jobs.StatusSucceeded || res.WorkerID != other || res.Attempts != 2 || len(res.Commands) != 2 || res.Commands[1].Stdout != "done\n" {
		t.Errorf("handed-back job's result: %+v; want succeeded on %s at the second attempt", res, other)
	}
	after := "after-" + backend.NewID(6)
	je.submit(`{"job_id":"`+after+`","template_id":"tiny","commands":["echo hi"]}`, "")
	if res := je.result(after, 2*time.Minute); res.Status != jobs.StatusSucceeded || res.WorkerID != other {
		t.Errorf("job after the drain: %+v; want succeeded on %s", res, other)
	}
	// The drained worker released its warm machine and refills nothing.
	eventually(t, 30*time.Second, "warm machines released", func() error {
		for _, w := range e.workers() {
			if w.WorkerID == runner && w.Load.Warm != 0 {
				return fmt.Errorf("%d warm", w.Load.Warm)
			}
		}
		return nil
	})
}

// TestClusterCutOffWorker: a worker whose heartbeat stops for longer than
// its TTL (cut off, but running) has its sandboxes marked lost; one id is
// claimed on the other worker meanwhile. When its heartbeat is back it
// takes back the sandbox nobody claimed and stops its own copy of the
// claimed one: no id has two owners.
func TestClusterCutOffWorker(t *testing.T) {
	e := startWorker(t, clusterOpts)
	m2 := joinWorker(t, e, clusterOpts)
	id1, id2 := e.w.ID(), m2.w.ID()
	ctx := e.ctx(5 * time.Minute)
	claimed, kept := "cc-"+backend.NewID(8), "ck-"+backend.NewID(8)
	for _, id := range []string{claimed, kept} {
		if _, err := e.createOn(ctx, id2, subjects.CreateSandboxRequest{TemplateID: "tiny", SandboxID: id, TimeoutS: 600}); err != nil {
			t.Fatalf("create %s on %s: %v", id, id2, err)
		}
		t.Cleanup(func() { _ = e.c.Kill(context.Background(), id) })
	}
	e.exec(kept, "echo kept > /root/mark")

	bound := e.w.Cluster().LostWithin()
	m2.w.Cluster().Hold(bound + 3*time.Second)
	eventually(t, bound+5*time.Second, "sandboxes of the cut-off worker marked lost", func() error {
		for _, id := range []string{claimed, kept} {
			if st, err := e.sessionState(id); err != nil || st != subjects.StateLost {
				return fmt.Errorf("%s: %s %v", id, st, err)
			}
		}
		return nil
	})
	// Claimed on the first worker while the second is cut off.
	if sb, err := e.createOn(ctx, id1, subjects.CreateSandboxRequest{TemplateID: "tiny", SandboxID: claimed}); err != nil || sb.ClientID != id1 {
		t.Fatalf("claim %s on %s: %+v %v", claimed, id1, sb, err)
	}
	e.exec(claimed, "echo first > /root/owner")

	eventually(t, 30*time.Second, "the cut-off worker gave up the claimed id and took back the other", func() error {
		if m2.w.Backend().Owns(claimed) {
			return fmt.Errorf("%s still owns %s", id2, claimed)
		}
		if st, err := e.sessionState(kept); err != nil || st != subjects.StateRunning {
			return fmt.Errorf("%s: %s %v", kept, st, err)
		}
		return nil
	})
	if !m2.w.Backend().Owns(kept) {
		t.Errorf("%s no longer runs %s", id2, kept)
	}
	if r := e.exec(kept, "cat /root/mark"); r.Stdout != "kept\n" {
		t.Errorf("taken-back sandbox: %+v", r)
	}
	list, err := e.c.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range list {
		if s.SandboxID == claimed && (s.ClientID != id1 || s.State != subjects.StateRunning) {
			t.Errorf("claimed id's record: %+v", s)
		}
		if s.SandboxID == kept && s.ClientID != id2 {
			t.Errorf("taken-back sandbox's record: %+v", s)
		}
	}
	// Only the first worker answers for the claimed id.
	for range 5 {
		if r := e.exec(claimed, "cat /root/owner"); r.Stdout != "first\n" {
			t.Fatalf("claimed id answered by another machine: %+v", r)
		}
	}
}
