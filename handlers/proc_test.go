package handlers

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// The fuzz runtime runs processes too: a command id that reaches it
// invalid is recorded as an invalid sandbox id, which FuzzHandlers reports.
func (f *fuzzRuntime) proc(id, cmd string) {
	f.sandbox(id)
	if cmd != "" && subjects.ValidateCommandID(cmd) != nil {
		f.ids = append(f.ids, "INVALID command id "+cmd)
	}
}
func (f *fuzzRuntime) StartProcess(_ context.Context, id string, _ subjects.ProcStartRequest) (subjects.ProcStartReply, error) {
	f.proc(id, "")
	return subjects.ProcStartReply{}, nil
}
func (f *fuzzRuntime) ListProcesses(_ context.Context, id string) (subjects.ProcListReply, error) {
	f.proc(id, "")
	return subjects.ProcListReply{}, nil
}
func (f *fuzzRuntime) ConnectProcess(_ context.Context, id, cmd string, _ subjects.ProcConnectRequest) (subjects.ProcConnectReply, error) {
	f.proc(id, cmd)
	return subjects.ProcConnectReply{}, nil
}
func (f *fuzzRuntime) ProcessStdin(_ context.Context, id, cmd string, _ []byte, _ bool) (subjects.ProcStdinReply, error) {
	f.proc(id, cmd)
	return subjects.ProcStdinReply{}, nil
}
func (f *fuzzRuntime) SignalProcess(_ context.Context, id, cmd string, _ subjects.ProcSignalRequest) (subjects.ProcSignalReply, error) {
	f.proc(id, cmd)
	return subjects.ProcSignalReply{}, nil
}
func (f *fuzzRuntime) ResizeProcess(_ context.Context, id, cmd string, _ subjects.ProcResizeRequest) (subjects.ProcInfo, error) {
	f.proc(id, cmd)
	return subjects.ProcInfo{}, nil
}

var _ Processes = (*fuzzRuntime)(nil)

func TestDecodeStdin(t *testing.T) {
	for _, tt := range []struct {
		body  string
		data  string
		close bool
		ok    bool
	}{
		{`hello`, "hello", false, true},
		{`{"data":"ls\n"}`, "ls\n", false, true},
		{`{"data_b64":"AAE="}`, "\x00\x01", false, true},
		{`{"close":true}`, "", true, true},
		{`{"data":"x","close":true}`, "x", true, true},
		{`{"other":1}`, `{"other":1}`, false, true}, // not the control object: raw bytes
		{`{"data":"x","data_b64":"AAE="}`, "", false, false},
		{"\x00\xff", "\x00\xff", false, true},
	} {
		data, closeIt, err := decodeStdin([]byte(tt.body))
		if (err == nil) != tt.ok || (err == nil && (!bytes.Equal(data, []byte(tt.data)) || closeIt != tt.close)) {
			t.Errorf("decodeStdin(%q) = %q, %v, %v; want %q, %v, ok=%v", tt.body, data, closeIt, err, tt.data, tt.close, tt.ok)
		}
	}
}

func TestSandboxEndpoint(t *testing.T) {
	for verb, want := range map[string]string{
		"exec":                    "sandbox.exec",
		"proc.start":              "sandbox.proc.start",
		"proc.k1234567890a.stdin": "sandbox.proc.stdin",
		"proc.bad.stdin":          "sandbox.unknown",
		"fs.read":                 "sandbox.fs.read",
		"metrics":                 "sandbox.metrics",
		"whatever.x":              "sandbox.unknown",
	} {
		if got := sandboxEndpoint(verb); got != want {
			t.Errorf("sandboxEndpoint(%q) = %q, want %q", verb, got, want)
		}
	}
}

func TestCheckLiveSubject(t *testing.T) {
	s := &Service{cfg: Config{ReplyPrefixes: []string{"_INBOX."}}}
	for subject, ok := range map[string]bool{
		"":                    true,
		"_INBOX.abc.out":      true,
		"_INBOX.":             false,
		"firkin.logs.x":       false,
		"$KV.firkin_sessions": false,
		"_INBOX.*":            false,
		"_INBOX.a b":          false,
	} {
		if err := s.checkLiveSubject("output_subject", subject); (err == nil) != ok {
			t.Errorf("checkLiveSubject(%q) = %v, want ok=%v", subject, err, ok)
		}
	}
}

// procRuntime records the stdin writes it gets, slowly, in order of arrival.
type procRuntime struct {
	fakeRuntime
	pmu    sync.Mutex
	writes []string
}

func (p *procRuntime) StartProcess(_ context.Context, id string, req subjects.ProcStartRequest) (subjects.ProcStartReply, error) {
	return subjects.ProcStartReply{CommandID: "k1234567890a", SandboxID: id, OutputSubject: req.OutputSubject}, nil
}
func (p *procRuntime) ListProcesses(context.Context, string) (subjects.ProcListReply, error) {
	return subjects.ProcListReply{}, nil
}
func (p *procRuntime) ConnectProcess(context.Context, string, string, subjects.ProcConnectRequest) (subjects.ProcConnectReply, error) {
	return subjects.ProcConnectReply{}, nil
}
func (p *procRuntime) ProcessStdin(_ context.Context, _, _ string, data []byte, _ bool) (subjects.ProcStdinReply, error) {
	time.Sleep(time.Duration(rand.IntN(3)) * time.Millisecond) // let later requests overtake, if they could
	p.pmu.Lock()
	p.writes = append(p.writes, string(data))
	p.pmu.Unlock()
	return subjects.ProcStdinReply{Written: len(data)}, nil
}
func (p *procRuntime) SignalProcess(context.Context, string, string, subjects.ProcSignalRequest) (subjects.ProcSignalReply, error) {
	return subjects.ProcSignalReply{}, nil
}
func (p *procRuntime) ResizeProcess(context.Context, string, string, subjects.ProcResizeRequest) (subjects.ProcInfo, error) {
	return subjects.ProcInfo{}, nil
}

// Stdin writes sent back to back, without waiting for replies, reach the
// runtime in the order they were sent; live subjects outside the inbox are
// refused before the runtime sees them.
func TestProcVerbsThroughNATS(t *testing.T) {
	nc := testenv.NATS(t)
	rt := &procRuntime{}
	svc, err := New(nc, Config{WorkerID: "w1", Runtime: rt, ReplyPrefixes: []string{"_INBOX."}})
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
	svc.Own("sb1")
	c := client.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	err = c.Request(ctx, "firkin.sandbox.sb1.proc.start", subjects.ProcStartRequest{Command: "cat", OutputSubject: "firkin.events.x"}, nil)
	if subjects.CodeOf(err) != subjects.CodeInvalidRequest {
		t.Fatalf("start with a foreign output subject: %v", err)
	}
	var r subjects.ProcStartReply
	if err := c.Request(ctx, "firkin.sandbox.sb1.proc.start", subjects.ProcStartRequest{Command: "cat", OutputSubject: "_INBOX.mine"}, &r); err != nil || r.OutputSubject != "_INBOX.mine" {
		t.Fatalf("start: %+v %v", r, err)
	}
	err = c.Request(ctx, "firkin.sandbox.sb1.proc.nope.stdin", subjects.ProcStdinRequest{Data: "x"}, nil)
	if subjects.CodeOf(err) != subjects.CodeInvalidRequest {
		t.Fatalf("stdin to a malformed command id: %v", err)
	}

	replies := make(chan *nats.Msg, 100)
	sub, err := nc.ChanSubscribe(nats.NewInbox(), replies)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	const n = 50
	var want []string
	for i := range n {
		line := fmt.Sprintf("line %d", i)
		want = append(want, line)
		if err := nc.PublishMsg(&nats.Msg{Subject: "firkin.sandbox.sb1.proc.k1234567890a.stdin", Reply: sub.Subject, Data: []byte(line)}); err != nil {
			t.Fatal(err)
		}
	}
	for range n {
		select {
		case m := <-replies:
			if m.Header.Get("Nats-Service-Error-Code") != "" {
				t.Fatalf("stdin reply: %s", m.Data)
			}
		case <-ctx.Done():
			t.Fatal("stdin replies missing")
		}
	}
	rt.pmu.Lock()
	defer rt.pmu.Unlock()
	if fmt.Sprint(rt.writes) != fmt.Sprint(want) {
		t.Fatalf("stdin writes reached the runtime as %v", rt.writes)
	}
}
