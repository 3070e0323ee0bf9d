package handlers

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/subjects"
)

// blockingStdin is a runtime whose stdin writes hang until released (a
// process that never reads its stdin, or a guest that stalls).
type blockingStdin struct {
	procRuntime
	release chan struct{}
}

func (b *blockingStdin) ProcessStdin(ctx context.Context, _, _ string, data []byte, _ bool) (subjects.ProcStdinReply, error) {
	select {
	case <-b.release:
	case <-ctx.Done():
	}
	return subjects.ProcStdinReply{Written: len(data)}, nil
}

// Stdin writes are answered in order per process, outside the async path:
// they must still count against MaxInFlight, or a client holds any number
// of requests (each up to the server's max payload) in the worker's memory
// by writing to processes that do not read.
func TestRedteamStdinBoundedByMaxInFlight(t *testing.T) {
	rt := &blockingStdin{release: make(chan struct{})}
	nc := startRedteamService(t, rt, Config{MaxInFlight: 4})
	defer close(rt.release)
	replies := make(chan *nats.Msg, 100)
	sub, err := nc.ChanSubscribe(nats.NewInbox(), replies)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	const procs, each = 10, 3
	for p := range procs {
		cmd := fmt.Sprintf("k%011d", p)
		for range each {
			m := &nats.Msg{Subject: "firkin.sandbox.sb1.proc." + cmd + ".stdin", Reply: sub.Subject, Data: make([]byte, 64<<10)}
			if err := nc.PublishMsg(m); err != nil {
				t.Fatal(err)
			}
		}
	}
	refused := 0
	deadline := time.After(5 * time.Second)
	for refused < procs*each-4 {
		select {
		case m := <-replies:
			if m.Header.Get("Firkin-Error-Code") != string(subjects.CodeCapacityRejected) {
				t.Fatalf("reply while the writes hang: %s %s", m.Header, m.Data)
			}
			refused++
		case <-deadline:
			t.Fatalf("%d of %d stdin writes refused with MaxInFlight 4: the rest are held in memory", refused, procs*each)
		}
	}
}
