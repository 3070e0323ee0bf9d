package client_test

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/jobs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// TestErrorClasses checks that an *Error matches the errdefs class of its
// code both ways, and ErrNoResponders only when nobody answered.
func TestErrorClasses(t *testing.T) {
	for _, tc := range []struct {
		code  subjects.Code
		class error
	}{
		{subjects.CodeInvalidRequest, errdefs.ErrInvalidArgument},
		{subjects.CodeSandboxNotFound, errdefs.ErrNotFound},
		{subjects.CodeSnapshotNotFound, subjects.ErrSnapshotNotFound},
		{subjects.CodeConflict, errdefs.ErrConflict},
		{subjects.CodeCapacityRejected, errdefs.ErrCapacity},
		{subjects.CodeTimeout, errdefs.ErrTimeout},
		{subjects.CodeDiskPressure, errdefs.ErrDiskPressure},
		{subjects.CodeRuntimeFailed, errdefs.ErrInternalFailure},
	} {
		err := error(&client.Error{Code: tc.code, Message: "m", Subject: "firkin.x"})
		if !errors.Is(err, tc.class) || subjects.CodeOf(err) != tc.code || errors.Is(err, client.ErrNoResponders) {
			t.Errorf("%s: Is(class)=%v CodeOf=%s Is(ErrNoResponders)=%v", tc.code, errors.Is(err, tc.class), subjects.CodeOf(err), errors.Is(err, client.ErrNoResponders))
		}
		if got, want := err.Error(), "firkin.x: "+string(tc.code)+": m"; got != want {
			t.Errorf("Error() = %q, want %q", got, want)
		}
	}
	if err := error(&client.Error{Code: subjects.CodeRuntimeFailed, NoResponders: true}); !errors.Is(err, client.ErrNoResponders) {
		t.Error("NoResponders error does not match ErrNoResponders")
	}
	if client.ResultErr(jobs.Result{Status: jobs.StatusSucceeded}) != nil {
		t.Error("ResultErr of a succeeded job is not nil")
	}
	if err := client.ResultErr(jobs.Result{JobID: "j", Status: jobs.StatusDead, Code: subjects.CodeCapacityRejected, Error: "full"}); !errors.Is(err, errdefs.ErrCapacity) {
		t.Errorf("ResultErr of a dead job = %v, want capacity_rejected", err)
	}
}

// TestJobRequestErrors checks the job methods' errors against the worker:
// a queue nobody consumes, an invalid job, invalid ids, a drain of a
// worker nobody serves, and a wait that ends with its context.
func TestJobRequestErrors(t *testing.T) {
	c := connect()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	job := jobs.Job{TemplateID: "tiny", Commands: []jobs.Command{{Command: "true"}}}

	_, err := c.SubmitJob(ctx, "nobody-consumes", job)
	var e *client.Error
	if !errors.As(err, &e) || !e.NoResponders || e.Code != subjects.CodeInvalidRequest || !errors.Is(err, client.ErrNoResponders) {
		t.Errorf("submit to an unconsumed queue: %v, want no responders, invalid_request", err)
	}
	if _, err := c.SubmitJob(ctx, "", jobs.Job{TemplateID: "tiny"}); subjects.CodeOf(err) != subjects.CodeInvalidRequest {
		t.Errorf("submit without commands: %v, want invalid_request", err)
	}
	if _, err := c.SubmitJob(ctx, "status", job); subjects.CodeOf(err) != subjects.CodeInvalidRequest {
		t.Errorf("submit to queue status: %v, want invalid_request", err)
	}
	if _, err := c.CancelJob(ctx, "bad.id"); subjects.CodeOf(err) != subjects.CodeInvalidRequest {
		t.Errorf("cancel bad.id: %v, want invalid_request", err)
	}
	if err := c.DrainWorker(ctx, "a.b", nil, nil); subjects.CodeOf(err) != subjects.CodeInvalidRequest {
		t.Errorf("drain worker a.b: %v, want invalid_request", err)
	}
	if err := c.DrainWorker(ctx, "nosuchworker", nil, nil); !errors.Is(err, client.ErrNoResponders) {
		t.Errorf("drain an unknown worker: %v, want no responders", err)
	}
	// A prefix nobody serves (inside the client identity's firkin.>).
	other, err := subjects.New("firkin.nobody")
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	sctx, scancel := context.WithTimeout(ctx, 5*time.Second)
	defer scancel()
	if _, err := c.WithPrefix(other).JobsStatus(sctx); !errors.Is(err, client.ErrNoResponders) || time.Since(start) > time.Second {
		t.Errorf("jobs status under a prefix nobody serves: %v after %s, want no responders at once", err, time.Since(start))
	}
	if st, err := c.PoolStatusAll(ctx); err != nil || len(st) != 1 || len(st[0].Templates) == 0 {
		t.Errorf("pool status of every worker: %+v, %v; want one worker's", st, err)
	}
	short, cancelShort := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancelShort()
	start = time.Now()
	if _, err := c.WaitJob(short, client.NewJobID()); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("wait for an unknown job: %v, want deadline exceeded", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("wait ended %s after its deadline", d)
	}
}

// TestWatchFinishedJob submits a job with a context that has no deadline
// (the flushes bound themselves), then watches it after it finished: the
// late watcher gets the stored result and the job's output replayed from
// FIRKIN_LOGS.
func TestWatchFinishedJob(t *testing.T) {
	c := connect()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stop := time.AfterFunc(2*time.Minute, cancel) // bounded, without a deadline
	defer stop.Stop()
	res, err := c.SubmitJobAndWait(ctx, "", jobs.Job{TemplateID: "tiny", Commands: []jobs.Command{{Command: "echo replay; echo err >&2"}}})
	if err != nil || res.Status != jobs.StatusSucceeded || res.SandboxID == "" {
		t.Fatalf("submit and wait: %+v, %v", res, err)
	}
	var out []string
	again, err := c.WatchJob(ctx, res.JobID, func(ev subjects.LogEvent) {
		if ev.SandboxID != res.SandboxID {
			t.Errorf("event of sandbox %s, want %s", ev.SandboxID, res.SandboxID)
		}
		if ev.Source == "stdout" || ev.Source == "stderr" {
			out = append(out, ev.Source+":"+ev.Message)
		}
	})
	if err != nil || again.FinishedAt != res.FinishedAt {
		t.Fatalf("watch a finished job: %+v, %v", again, err)
	}
	slices.Sort(out) // stdout and stderr of one command may interleave either way
	if len(out) != 2 || out[0] != "stderr:err\n" || out[1] != "stdout:replay\n" {
		t.Errorf("replayed output %q, want stdout replay, stderr err", out)
	}
}
