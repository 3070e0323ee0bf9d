package handlers

import (
	"bytes"
	"context"
	"testing"

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
		"proc.bad.stdin":          "sandbox.proc.bad.stdin",
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
