package client_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/jobs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// These examples run against the worker TestMain starts; connect() stands
// for nats.Connect(url, client.NkeyFile(".../client.nk")) and client.New.

func ExampleClient_Create() {
	c := connect()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	sb, err := c.Create(ctx, subjects.CreateSandboxRequest{TemplateID: "tiny", TimeoutS: 120})
	if err != nil {
		fmt.Println("create:", err)
		return
	}
	defer c.Kill(context.Background(), sb.SandboxID)
	fmt.Println(sb.TemplateID, sb.State)
	// Output: tiny running
}

func ExampleClient_Exec() {
	c := connect()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	sb, err := c.Create(ctx, subjects.CreateSandboxRequest{TemplateID: "tiny", TimeoutS: 120})
	if err != nil {
		fmt.Println("create:", err)
		return
	}
	defer c.Kill(context.Background(), sb.SandboxID)
	r, err := c.Exec(ctx, sb.SandboxID, subjects.ExecRequest{Command: "echo hello; echo oops >&2; exit 3"})
	if err != nil {
		fmt.Println("exec:", err)
		return
	}
	fmt.Printf("exit %d, stdout %q, stderr %q\n", r.ExitCode, r.Stdout, r.Stderr)
	// Output: exit 3, stdout "hello\n", stderr "oops\n"
}

func ExampleError() {
	c := connect()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// Nobody owns this sandbox: NATS answers "no responders" at once.
	_, err := c.Exec(ctx, "no-such-sandbox", subjects.ExecRequest{Command: "true"})
	var e *client.Error
	if !errors.As(err, &e) {
		fmt.Println("not a *client.Error:", err)
		return
	}
	fmt.Println(e.Code, e.NoResponders)
	fmt.Println(errors.Is(err, errdefs.ErrNotFound), errors.Is(err, client.ErrNoResponders))

	// An error reply of a worker: its code, and the errdefs class.
	_, err = c.Create(ctx, subjects.CreateSandboxRequest{TemplateID: "no-such-template"})
	fmt.Println(subjects.CodeOf(err), errors.Is(err, errdefs.ErrInvalidArgument), errors.Is(err, client.ErrNoResponders))
	// Output:
	// sandbox_not_found true
	// true true
	// invalid_request true false
}

func ExampleClient_SubmitJob() {
	c := connect()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// SubmitJob returns once the job is stored in FIRKIN_JOBS; a worker
	// runs it when it has room.
	sub, err := c.SubmitJob(ctx, "default", jobs.Job{
		TemplateID: "tiny",
		Commands:   []jobs.Command{{Command: "cat /work/greeting"}, {Command: "echo done"}},
		Files:      []jobs.File{{Path: "/work/greeting", Content: "hello from a job\n"}},
	})
	if err != nil {
		fmt.Println("submit:", err)
		return
	}
	fmt.Println(sub.Queue, sub.Stream, strings.HasPrefix(sub.JobID, "job_"), sub.Duplicate)

	res, err := c.WaitJob(ctx, sub.JobID)
	if err != nil {
		fmt.Println("wait:", err)
		return
	}
	fmt.Println(res.Status, len(res.Commands))
	for _, cmd := range res.Commands {
		fmt.Printf("%s: exit %d: %q\n", cmd.Command, cmd.ExitCode, cmd.Stdout)
	}
	// Output:
	// default FIRKIN_JOBS true false
	// succeeded 2
	// cat /work/greeting: exit 0: "hello from a job\n"
	// echo done: exit 0: "done\n"
}

func ExampleClient_WaitJob() {
	c := connect()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	id := client.NewJobID()
	job := jobs.Job{JobID: id, TemplateID: "tiny", Commands: []jobs.Command{{Command: "exit 7"}}}
	res, err := c.SubmitJobAndWait(ctx, "", job)
	if err != nil {
		fmt.Println("submit and wait:", err)
		return
	}
	// A command that exits non-zero is a result, not an error of the wait.
	fmt.Println(res.Status, res.Commands[0].ExitCode, client.ResultErr(res) != nil)

	// A late reader finds the stored result.
	again, err := c.WaitJob(ctx, id)
	fmt.Println(again.Status, again.FinishedAt.Equal(res.FinishedAt), err)

	// The same job submitted again is a duplicate: not stored, not run.
	sub, err := c.SubmitJob(ctx, "", job)
	fmt.Println(sub.Duplicate, err)
	// Output:
	// failed 7 true
	// failed true <nil>
	// true <nil>
}

func ExampleClient_WatchJob() {
	c := connect()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	sub, err := c.SubmitJob(ctx, "", jobs.Job{TemplateID: "tiny", Commands: []jobs.Command{
		{Command: "echo one"}, {Command: "sleep 0.2; echo two"}, {Command: "echo three >&2"},
	}})
	if err != nil {
		fmt.Println("submit:", err)
		return
	}
	// The output streams to FIRKIN_LOGS as the commands run.
	res, err := c.WatchJob(ctx, sub.JobID, func(ev subjects.LogEvent) {
		if ev.Source == "stdout" || ev.Source == "stderr" {
			fmt.Printf("%s: %s", ev.Source, ev.Message)
		}
	})
	if err != nil {
		fmt.Println("watch:", err)
		return
	}
	fmt.Println(res.Status)
	// Output:
	// stdout: one
	// stdout: two
	// stderr: three
	// succeeded
}

func ExampleClient_CancelJob() {
	c := connect()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	sub, err := c.SubmitJob(ctx, "", jobs.Job{TemplateID: "tiny", Commands: []jobs.Command{{Command: "sleep 600"}}})
	if err != nil {
		fmt.Println("submit:", err)
		return
	}
	// Cancel stops a waiting job before it runs, or a running one within
	// about a second.
	r, err := c.CancelJob(ctx, sub.JobID)
	if err != nil {
		fmt.Println("cancel:", err)
		return
	}
	fmt.Println(r.Status)
	res, err := c.WaitJob(ctx, sub.JobID)
	fmt.Println(res.Status, err)
	// Output:
	// cancel_requested
	// canceled <nil>
}

func ExampleClient_JobsStatus() {
	c := connect()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// Every worker answers; Waiting and Running are the cluster's.
	replies, err := c.JobsStatus(ctx)
	if err != nil {
		fmt.Println("status:", err)
		return
	}
	fmt.Println(len(replies), replies[0].Queues[0].Queue, replies[0].Concurrency)
	// Output: 1 default 1
}
