package worker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/worker"
)

// TestRedteam2 attacks a real worker through NATS with the client
// credential: made-up per-sandbox verbs must not grow the worker's metric
// labels (and its status reply) without bound, and stdin writes to
// processes that never read must count against the worker's in-flight
// bound instead of piling up, each holding its payload in memory.
func TestRedteam2(t *testing.T) {
	e := startWorker(t)
	id := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", TimeoutS: 600}).SandboxID
	nc := e.clientConn()

	status := func() subjects.WorkerStatusReply {
		t.Helper()
		m, err := nc.Request("firkin.worker.status", nil, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var st subjects.WorkerStatusReply
		if err := json.Unmarshal(m.Data, &st); err != nil {
			t.Fatalf("status: %v: %.200s", err, m.Data)
		}
		return st
	}

	t.Run("made-up verbs", func(t *testing.T) {
		before := len(status().Endpoints)
		for i := range 200 {
			if _, err := nc.Request(fmt.Sprintf("firkin.sandbox.%s.v%d", id, i), nil, 10*time.Second); err != nil {
				t.Fatal(err)
			}
		}
		after := status().Endpoints
		if len(after) > before+2 { // + sandbox.unknown and the first status request's own
			t.Fatalf("200 requests to made-up verbs added %d endpoint entries to the status reply", len(after)-before)
		}
		found := false
		for _, ep := range after {
			found = found || ep.Endpoint == "sandbox.unknown" && ep.Requests >= 200
		}
		if !found {
			t.Fatalf("no sandbox.unknown entry counting the requests: %+v", after)
		}
	})

	t.Run("stdin to processes that do not read", func(t *testing.T) {
		c := client.New(nc)
		const procs, each = 6, 50 // 300 writes: under the per-process queue (64), over MaxInFlight (256)
		replies := make(chan *nats.Msg, procs*each)
		sub, err := nc.ChanSubscribe(nats.NewInbox(), replies)
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Unsubscribe()
		payload := []byte(strings.Repeat("x", 64<<10))
		for range procs {
			p, err := c.StartProcess(e.ctx(time.Minute), id, subjects.ProcStartRequest{Command: "sleep 10", Background: true})
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			for range each {
				if err := nc.PublishMsg(&nats.Msg{Subject: fmt.Sprintf("firkin.sandbox.%s.proc.%s.stdin", id, p.ID()), Reply: sub.Subject, Data: payload}); err != nil {
					t.Fatal(err)
				}
			}
		}
		// The first write to each process fits its pipe and is answered;
		// every other one hangs, so all but the in-flight bound of those
		// must be refused.
		refused, answered := 0, 0
		deadline := time.After(20 * time.Second)
		for refused < procs*each-256-procs {
			select {
			case m := <-replies:
				answered++
				if m.Header.Get("Firkin-Error-Code") == string(subjects.CodeCapacityRejected) {
					refused++
				}
			case <-deadline:
				t.Fatalf("%d of %d stdin writes refused: the worker holds more than its in-flight bound", refused, procs*each)
			}
		}
		// The processes exit; the hung writes fail and free their slots.
		for got := answered; got < procs*each; got++ {
			select {
			case <-replies:
			case <-time.After(45 * time.Second):
				t.Fatalf("%d of %d stdin writes answered", got, procs*each)
			}
		}
	})
}

// The Prometheus endpoint (--metrics-listen) is one of the worker's own
// ports: a create's egress "host:PORT" must not open it to a guest, however
// wide --egress-host-ports is.
func TestRedteam2MetricsPortNotEgress(t *testing.T) {
	e := startWorker(t, func(c *worker.Config) {
		c.MetricsListen = "127.0.0.1:0"
		c.EgressHostPorts = "1-65535"
	})
	port := portOf(t, "tcp://"+e.w.MetricsAddr())
	sb, err := e.c.Create(e.ctx(3*time.Minute), subjects.CreateSandboxRequest{TemplateID: "tiny",
		Egress: &subjects.EgressPolicy{Allow: []string{fmt.Sprintf("host:%d", port)}}})
	if err == nil {
		t.Cleanup(func() { _ = e.c.Kill(context.Background(), sb.SandboxID) })
		if e.guestGet(sb.SandboxID, fmt.Sprintf("http://10.0.2.2:%d/metrics", port), "firkin_") {
			t.Fatalf("a guest read the worker's metrics endpoint through egress host:%d", port)
		}
	}
	wantCode(t, fmt.Sprintf("host:%d (the worker's metrics port)", port), err, subjects.CodeInvalidRequest)
}
