package worker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	js "github.com/nats-io/nats.go/jetstream"

	"github.com/firkin-dev/firkin-worker/embedded"
	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/jobs"
	"github.com/firkin-dev/firkin-worker/worker"
)

// TestJobsWorkerKilled: the worker running a job (a child process) is
// killed with SIGKILL; after the ack wait the job runs to completion on
// another worker of the same NATS server.
func TestJobsWorkerKilled(t *testing.T) {
	testenv.RequireQEMU(t, runtime.GOARCH)
	agentBin := testenv.AgentBinary(t, runtime.GOARCH)
	srv, err := embedded.Start(embedded.Config{Listen: "127.0.0.1:-1", StoreDir: t.TempDir(), Anonymous: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Shutdown)
	url := srv.ClientURL()
	const secret = "jobs-kill-test-secret-0123456789abcdef"

	bin := workerBinary(t)
	stateA := t.TempDir()
	shareDebCache(t, stateA)
	a := startBinary(t, bin, "--state-dir", stateA, "--nats-url", url, "--proxy-listen", "127.0.0.1:0",
		"--agent", agentBin, "--pool", "tiny=0", "--keep-machines=false", "--token-secret", secret)
	t.Cleanup(func() { killMachines(stateA) })

	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	m := nats.NewMsg("firkin.jobs.default")
	m.Data = []byte(`{"job_id":"crash-1","template_id":"tiny","commands":["sleep 5; echo done"]}`)
	if reply, err := nc.RequestMsg(m, 10*time.Second); err != nil || !strings.Contains(string(reply.Data), `"seq"`) {
		t.Fatalf("submit: %v %v", reply, err)
	}
	var workerA string
	eventually(t, 2*time.Minute, "the first worker runs the job", func() error {
		r, err := nc.Request("firkin.jobs.status", nil, 5*time.Second)
		if err != nil {
			return err
		}
		var st jobs.StatusReply
		if err := json.Unmarshal(r.Data, &st); err != nil {
			return err
		}
		if st.Queues[0].RunningHere != 1 {
			return fmt.Errorf("%+v", st)
		}
		workerA = st.WorkerID
		return nil
	})
	killedAt := time.Now()
	_ = a.cmd.Process.Kill()
	<-a.done
	killMachines(stateA)

	e := startWorker(t, func(c *worker.Config) {
		c.NATSURL = url
		c.TokenSecret = secret
	})
	j, err := js.New(e.nc)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := j.KeyValue(e.ctx(time.Minute), jobs.ResultsBucket)
	if err != nil {
		t.Fatal(err)
	}
	var res jobs.Result
	eventually(t, 2*time.Minute, "the job's result", func() error {
		entry, err := kv.Get(context.Background(), "crash-1")
		if err != nil {
			return err
		}
		return json.Unmarshal(entry.Value(), &res)
	})
	t.Logf("result %s after the kill", time.Since(killedAt))
	// Attempt 1 died with worker A; the new worker may need more than one
	// (its first create can wait for the template A was still uploading).
	if res.Status != jobs.StatusSucceeded || res.WorkerID != e.w.ID() || res.WorkerID == workerA || res.Attempts < 2 ||
		len(res.Commands) != 1 || res.Commands[0].Stdout != "done\n" {
		t.Fatalf("result = %+v (killed worker %s)", res, workerA)
	}
}

// killMachines kills the QEMU processes of a state directory (a worker
// killed with SIGKILL may leave them).
func killMachines(state string) {
	for _, p := range qemuProcesses(state) {
		if pid, err := strconv.Atoi(strings.Fields(p)[0][:len(strings.Fields(p)[0])-1]); err == nil {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}
