package worker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	js "github.com/nats-io/nats.go/jetstream"

	"github.com/firkin-dev/firkin-worker/backend"
	"github.com/firkin-dev/firkin-worker/jobs"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/worker"
)

// pubAck is the JetStream server's answer to a publish sent as a request.
type pubAck struct {
	Stream    string `json:"stream"`
	Seq       uint64 `json:"seq"`
	Duplicate bool   `json:"duplicate"`
	Error     *struct {
		Description string `json:"description"`
	} `json:"error"`
}

// jobsEnv is a worker under test with a client's view of jobs.
type jobsEnv struct {
	*env
	kv js.KeyValue
}

// submit publishes a job as a request (as `nats req` does) and returns the
// server's PubAck.
func (e *jobsEnv) submit(body, msgID string) pubAck {
	e.t.Helper()
	m := nats.NewMsg("firkin.jobs.default")
	m.Data = []byte(body)
	if msgID != "" {
		m.Header.Set(nats.MsgIdHdr, msgID)
	}
	reply, err := e.nc.RequestMsg(m, 10*time.Second)
	if err != nil {
		e.t.Fatalf("submit %s: %v", body, err)
	}
	var ack pubAck
	if err := json.Unmarshal(reply.Data, &ack); err != nil || ack.Error != nil || ack.Stream != jobs.Stream {
		e.t.Fatalf("submit %s: answer %s (%v)", body, reply.Data, err)
	}
	return ack
}

// result waits for a job's result in the bucket, as a late reader does.
func (e *jobsEnv) result(id string, d time.Duration) jobs.Result {
	e.t.Helper()
	var res jobs.Result
	eventually(e.t, d, "result of "+id, func() error {
		entry, err := e.kv.Get(context.Background(), id)
		if err != nil {
			return err
		}
		return json.Unmarshal(entry.Value(), &res)
	})
	return res
}

func (e *jobsEnv) status() jobs.StatusReply {
	e.t.Helper()
	m, err := e.nc.Request("firkin.jobs.status", nil, 5*time.Second)
	if err != nil {
		e.t.Fatalf("jobs.status: %v", err)
	}
	var st jobs.StatusReply
	if err := json.Unmarshal(m.Data, &st); err != nil || len(st.Queues) == 0 {
		e.t.Fatalf("jobs.status = %s (%v)", m.Data, err)
	}
	return st
}

func (e *jobsEnv) cancel(id string) jobs.CancelReply {
	e.t.Helper()
	m, err := e.nc.Request("firkin.jobs."+id+".cancel", nil, 10*time.Second)
	if err != nil {
		e.t.Fatalf("cancel %s: %v", id, err)
	}
	var r jobs.CancelReply
	if err := json.Unmarshal(m.Data, &r); err != nil || r.JobID != id {
		e.t.Fatalf("cancel %s = %s (%v)", id, m.Data, err)
	}
	return r
}

// drained waits until the default queue has nothing waiting or running.
func (e *jobsEnv) drained(d time.Duration) {
	e.t.Helper()
	eventually(e.t, d, "queue drained", func() error {
		q := e.status().Queues[0]
		if q.Waiting != 0 || q.Running != 0 {
			return fmt.Errorf("%+v", q)
		}
		return nil
	})
}

// TestJobs runs jobs through one real worker (pool tiny=2, two jobs at
// once): results, failures, invalid jobs, retries and dead letters,
// duplicates, backpressure and cancel.
func TestJobs(t *testing.T) {
	e0 := startWorker(t, func(c *worker.Config) {
		c.Pool = map[string]int{"tiny": 2}
		c.JobConcurrency = 2
		c.JobMaxDeliver = 3
		c.JobBackoff = 200 * time.Millisecond
		// Small enough that a job asking for 8 vCPUs is refused by
		// admission (capacity_rejected: an infrastructure failure).
		c.Limits = backend.Limits{MaxSessions: 16, MaxVCPUs: 6, MaxMemoryMB: 8192}
	})
	j, err := js.New(e0.nc)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := j.KeyValue(e0.ctx(time.Minute), jobs.ResultsBucket)
	if err != nil {
		t.Fatalf("client reads the results bucket: %v", err)
	}
	e := &jobsEnv{env: e0, kv: kv}
	// Let the pool fill so the timings are those of a steady worker.
	eventually(t, 3*time.Minute, "warm pool", func() error {
		if st := e.w.Backend().PoolStatus(); len(st.Templates) == 0 || st.Templates[0].Ready < 2 {
			return fmt.Errorf("%+v", st)
		}
		return nil
	})
	dead, err := e.nc.SubscribeSync("firkin.jobs.dead.default")
	if err != nil {
		t.Fatal(err)
	}

	t.Run("success with files, several commands and a snapshot", func(t *testing.T) {
		sub, err := e.nc.SubscribeSync("firkin.results.ok-1")
		if err != nil {
			t.Fatal(err)
		}
		t0 := time.Now()
		e.submit(`{"job_id":"ok-1","template_id":"tiny","env":{"WHO":"job"},
			"files":[{"path":"/work/in.txt","content":"hello file\n"},{"path":"/work/run.sh","content_b64":"ZWNobyBzY3JpcHQgJFdITwo=","mode":"755"}],
			"commands":["cat /work/in.txt", {"command":"/work/run.sh","cwd":"/work"}, {"command":"cat; echo $X >&2","stdin":"in\n","env":{"X":"y"}}, "stat -c %a /work/run.sh"],
			"snapshot":{"name":"job-snap-1"}}`, "")
		m, err := sub.NextMsg(3 * time.Minute)
		if err != nil {
			t.Fatalf("result on firkin.results.ok-1: %v", err)
		}
		t.Logf("publish to result: %s", time.Since(t0))
		var res jobs.Result
		if err := json.Unmarshal(m.Data, &res); err != nil {
			t.Fatal(err)
		}
		if res.Status != jobs.StatusSucceeded || len(res.Commands) != 4 || res.SnapshotID != "job-snap-1" || res.WorkerID != e.w.ID() || res.Attempts != 1 {
			t.Fatalf("result = %+v", res)
		}
		want := []string{"hello file\n", "script job\n", "in\n", "755\n"}
		for i, c := range res.Commands {
			if c.Stdout != want[i] || c.ExitCode != 0 || c.CommandID == "" {
				t.Errorf("commands[%d] = %+v, want stdout %q", i, c, want[i])
			}
		}
		if res.Commands[2].Stderr != "y\n" {
			t.Errorf("stderr = %q", res.Commands[2].Stderr)
		}
		if late := e.result("ok-1", time.Second); late.Status != jobs.StatusSucceeded || late.StreamSeq != res.StreamSeq {
			t.Errorf("KV result = %+v", late)
		}
		// The snapshot holds the files; the job's sandbox is gone.
		sb := e.create(subjects.CreateSandboxRequest{SnapshotID: "job-snap-1"})
		if r := e.exec(sb.SandboxID, "cat /work/in.txt"); r.Stdout != "hello file\n" {
			t.Errorf("file in the snapshot = %q", r.Stdout)
		}
		if _, err := e.c.Get(e.ctx(10*time.Second), res.SandboxID); err == nil {
			t.Errorf("the job's sandbox %s still runs", res.SandboxID)
		}
	})

	t.Run("a failing command stops the job unless keep_going", func(t *testing.T) {
		e.submit(`{"job_id":"fail-1","template_id":"tiny","commands":["echo a","exit 3","echo never"]}`, "")
		e.submit(`{"job_id":"fail-2","template_id":"tiny","keep_going":true,"commands":["echo a","exit 3","echo after"]}`, "")
		r1 := e.result("fail-1", 2*time.Minute)
		if r1.Status != jobs.StatusFailed || len(r1.Commands) != 2 || r1.Commands[1].ExitCode != 3 || r1.Attempts != 1 {
			t.Errorf("fail-1 = %+v", r1)
		}
		r2 := e.result("fail-2", 2*time.Minute)
		if r2.Status != jobs.StatusFailed || len(r2.Commands) != 3 || r2.Commands[2].Stdout != "after\n" {
			t.Errorf("fail-2 = %+v", r2)
		}
	})

	t.Run("an invalid job is not retried and is dead-lettered", func(t *testing.T) {
		e.submit(`{"template_id":"tiny","commands":["true"],"bogus":1}`, "bad-1")
		e.submit(`{"job_id":"bad-2","template_id":"nope","commands":["true"]}`, "")
		r1 := e.result("bad-1", time.Minute)
		if r1.Status != jobs.StatusInvalid || r1.Code != "invalid_request" || r1.Attempts != 1 || !strings.Contains(r1.Error, "bogus") {
			t.Errorf("bad-1 = %+v", r1)
		}
		r2 := e.result("bad-2", time.Minute)
		if r2.Status != jobs.StatusInvalid || r2.Attempts != 1 || !strings.Contains(r2.Error, "nope") {
			t.Errorf("bad-2 = %+v", r2)
		}
		seen := map[string]jobs.DeadLetter{}
		for len(seen) < 2 {
			m, err := dead.NextMsg(time.Minute)
			if err != nil {
				t.Fatalf("dead letters: %v (have %v)", err, seen)
			}
			var dl jobs.DeadLetter
			if err := json.Unmarshal(m.Data, &dl); err != nil {
				t.Fatal(err)
			}
			seen[dl.JobID] = dl
		}
		if dl := seen["bad-1"]; dl.Status != jobs.StatusInvalid || dl.Reason == "" || len(dl.Job) == 0 {
			t.Errorf("dead letter of bad-1 = %+v", dl)
		}
	})

	t.Run("an infrastructure failure is retried, then dead", func(t *testing.T) {
		e.submit(`{"job_id":"infra-1","template_id":"tiny","resources":{"vcpus":8},"commands":["true"]}`, "")
		r := e.result("infra-1", 2*time.Minute)
		if r.Status != jobs.StatusDead || r.Code != "capacity_rejected" || r.Attempts != 3 {
			t.Errorf("infra-1 = %+v", r)
		}
		m, err := dead.NextMsg(time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		var dl jobs.DeadLetter
		if err := json.Unmarshal(m.Data, &dl); err != nil || dl.JobID != "infra-1" || dl.Status != jobs.StatusDead || dl.Attempts != 3 {
			t.Errorf("dead letter = %s (%v)", m.Data, err)
		}
	})

	t.Run("a duplicate runs once", func(t *testing.T) {
		sub, err := e.nc.SubscribeSync("firkin.results.>")
		if err != nil {
			t.Fatal(err)
		}
		a1 := e.submit(`{"template_id":"tiny","commands":["echo once"]}`, "dup-1")
		a2 := e.submit(`{"template_id":"tiny","commands":["echo once"]}`, "dup-1")
		if a1.Duplicate || !a2.Duplicate || a2.Seq != a1.Seq {
			t.Errorf("pub acks %+v %+v: want the second a duplicate of the first", a1, a2)
		}
		r := e.result("dup-1", 2*time.Minute)
		// The same job id in the body, without the header, after the
		// first finished: acked without running.
		e.submit(`{"job_id":"dup-1","template_id":"tiny","commands":["echo twice"]}`, "")
		e.drained(time.Minute)
		if again := e.result("dup-1", time.Second); again.StreamSeq != r.StreamSeq || again.Commands[0].Stdout != "once\n" {
			t.Errorf("result after the duplicate = %+v", again)
		}
		n := 0
		for {
			m, err := sub.NextMsg(200 * time.Millisecond)
			if err != nil {
				break
			}
			if strings.HasSuffix(m.Subject, ".dup-1") {
				n++
			}
		}
		if n != 1 {
			t.Errorf("%d results published for dup-1, want 1", n)
		}
	})

	t.Run("one echo job, publish to result", func(t *testing.T) {
		eventually(t, time.Minute, "warm pool refilled", func() error {
			if st := e.w.Backend().PoolStatus(); st.Templates[0].Ready < 2 {
				return fmt.Errorf("%+v", st)
			}
			return nil
		})
		sub, err := e.nc.SubscribeSync("firkin.results.echo-1")
		if err != nil {
			t.Fatal(err)
		}
		t0 := time.Now()
		e.submit(`{"job_id":"echo-1","template_id":"tiny","commands":["echo hi"]}`, "")
		m, err := sub.NextMsg(time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		elapsed := time.Since(t0)
		var r jobs.Result
		if err := json.Unmarshal(m.Data, &r); err != nil || r.Status != jobs.StatusSucceeded || r.Commands[0].Stdout != "hi\n" {
			t.Fatalf("echo-1 = %s (%v)", m.Data, err)
		}
		t.Logf("one echo job: publish to result %s (queued %d ms, ran %d ms; accelerator %s)", elapsed, r.QueuedMS, r.DurationMS, e.w.Backend().Accelerator())
	})

	t.Run("more jobs than room wait and all complete", func(t *testing.T) {
		const n = 20
		t0 := time.Now()
		for i := range n {
			e.submit(fmt.Sprintf(`{"job_id":"many-%d","template_id":"tiny","commands":["echo %d"]}`, i, i), "")
		}
		if st := e.status(); st.Queues[0].Waiting == 0 {
			t.Logf("status right after submitting: %+v (nothing waiting already)", st)
		}
		var results []jobs.Result
		for i := range n {
			r := e.result(fmt.Sprintf("many-%d", i), 5*time.Minute)
			if r.Status != jobs.StatusSucceeded || r.Commands[0].Stdout != fmt.Sprintf("%d\n", i) {
				t.Errorf("many-%d = %+v", i, r)
			}
			results = append(results, r)
		}
		elapsed := time.Since(t0)
		t.Logf("%d echo jobs in %s: %.1f jobs/min", n, elapsed, float64(n)/elapsed.Minutes())
		// Never more than two at once on this worker.
		type edge struct {
			at time.Time
			d  int
		}
		var edges []edge
		for _, r := range results {
			edges = append(edges, edge{r.StartedAt, 1}, edge{r.FinishedAt, -1})
		}
		slices.SortFunc(edges, func(a, b edge) int {
			if c := a.at.Compare(b.at); c != 0 {
				return c
			}
			return a.d - b.d
		})
		most, cur := 0, 0
		for _, ed := range edges {
			cur += ed.d
			most = max(most, cur)
		}
		if most > 2 {
			t.Errorf("%d jobs ran at once, want at most 2", most)
		}
		// In order: the stream hands them out by sequence.
		for i := 1; i < n; i++ {
			if results[i].StartedAt.Before(results[i-1].StartedAt.Add(-time.Second)) {
				t.Errorf("many-%d started at %s, before many-%d at %s", i, results[i].StartedAt, i-1, results[i-1].StartedAt)
			}
		}
	})

	t.Run("cancel a waiting and a running job", func(t *testing.T) {
		e.submit(`{"job_id":"long-1","template_id":"tiny","commands":["sleep 30"]}`, "")
		e.submit(`{"job_id":"long-2","template_id":"tiny","commands":["sleep 30"]}`, "")
		e.submit(`{"job_id":"wait-1","template_id":"tiny","commands":["echo ran"]}`, "")
		eventually(t, time.Minute, "both long jobs running", func() error {
			if q := e.status().Queues[0]; q.RunningHere != 2 || q.Waiting != 1 {
				return fmt.Errorf("%+v", q)
			}
			return nil
		})
		if r := e.cancel("wait-1"); r.Status != "cancel_requested" {
			t.Errorf("cancel wait-1 = %+v", r)
		}
		t0 := time.Now()
		if r := e.cancel("long-1"); r.Status != "cancel_requested" {
			t.Errorf("cancel long-1 = %+v", r)
		}
		r1 := e.result("long-1", 20*time.Second)
		if r1.Status != jobs.StatusCanceled || time.Since(t0) > 15*time.Second {
			t.Errorf("long-1 = %+v after %s", r1, time.Since(t0))
		}
		rw := e.result("wait-1", 20*time.Second)
		if rw.Status != jobs.StatusCanceled || len(rw.Commands) != 0 || rw.SandboxID != "" {
			t.Errorf("wait-1 = %+v", rw)
		}
		e.cancel("long-2")
		if r := e.result("long-2", 20*time.Second); r.Status != jobs.StatusCanceled {
			t.Errorf("long-2 = %+v", r)
		}
		if r := e.cancel("long-2"); r.Status != jobs.StatusCanceled {
			t.Errorf("cancel of a finished job = %+v", r)
		}
		e.drained(time.Minute)
	})
}
