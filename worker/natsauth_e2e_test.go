package worker_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	js "github.com/nats-io/nats.go/jetstream"

	"github.com/firkin-dev/firkin-worker/jetstream"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// TestClientIdentity drives a real worker with the client identity the
// worker made: the API, discovery and logs work; forging a log line, a KV
// record or an answer for the sandbox is refused; the worker's own identity
// is a different one that may write logs.
func TestClientIdentity(t *testing.T) {
	e := startWorker(t)
	if nc, err := nats.Connect(e.w.NATSURL(), nats.Timeout(2*time.Second)); !errors.Is(err, nats.ErrAuthorization) {
		if nc != nil {
			nc.Close()
		}
		t.Fatalf("anonymous client: %v, want an authorization violation", err)
	}
	sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
	if r := e.exec(sb.SandboxID, "echo through the client identity"); r.Stdout != "through the client identity\n" {
		t.Fatalf("exec = %+v", r)
	}
	if m, err := e.nc.Request("$SRV.PING.firkin-worker", nil, 5*time.Second); err != nil || !strings.Contains(string(m.Data), e.w.ID()) {
		t.Fatalf("$SRV.PING: %v %v", m, err)
	}

	violations := make(chan error, 16)
	e.nc.SetErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
		select {
		case violations <- err:
		default:
		}
	})
	forged := "firkin.logs." + sb.SandboxID
	if err := e.nc.Publish(forged, []byte(`{"message":"forged","source":"stdout"}`)); err != nil {
		t.Fatal(err)
	}
	if _, err := e.nc.SubscribeSync("firkin.sandbox." + sb.SandboxID + ".exec"); err != nil {
		t.Fatal(err)
	}
	_ = e.nc.Flush()
	want := map[string]bool{`Publish to "` + forged + `"`: false, `Subscription to "firkin.sandbox.` + sb.SandboxID + `.exec"`: false}
	for deadline := time.After(5 * time.Second); ; {
		missing := 0
		for _, seen := range want {
			if !seen {
				missing++
			}
		}
		if missing == 0 {
			break
		}
		select {
		case err := <-violations:
			for k := range want {
				if errors.Is(err, nats.ErrPermissionViolation) && strings.Contains(err.Error(), k) {
					want[k] = true
				}
			}
		case <-deadline:
			t.Fatalf("permission violations seen: %v", want)
		}
	}
	j, _ := js.New(e.nc)
	kv, err := j.KeyValue(e.ctx(10*time.Second), jetstream.SnapshotsBucket)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(e.ctx(2*time.Second), "tiny", []byte(`{"snapshot_id":"tiny"}`)); err == nil {
		t.Error("the client identity wrote a KV record")
	}
	if entry, err := kv.Get(e.ctx(5*time.Second), "tiny"); err != nil || string(entry.Value()) == `{"snapshot_id":"tiny"}` {
		t.Errorf("tiny's record after the client's put: %v %v", entry, err)
	}

	// The worker identity may write the log stream.
	wj, _ := js.New(e.workerConn())
	if _, err := wj.Publish(e.ctx(5*time.Second), forged, []byte(`{"message":"from the worker identity","source":"system"}`)); err != nil {
		t.Fatalf("worker identity publishes a log: %v", err)
	}
	logs, err := e.c.Logs(e.ctx(10*time.Second), sb.SandboxID, subjects.LogsRequest{Limit: 1000})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, ev := range logs.Events {
		got = append(got, ev.Message)
	}
	all := strings.Join(got, "\n")
	if strings.Contains(all, "forged") || !strings.Contains(all, "from the worker identity") {
		t.Errorf("log events: %q", all)
	}
}
