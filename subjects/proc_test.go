package subjects

import (
	"errors"
	"strings"
	"testing"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

func TestParseProcVerb(t *testing.T) {
	for _, tt := range []struct {
		verb, cmd, op string
		ok, valid     bool
	}{
		{"exec", "", "", false, true},
		{"fs.read", "", "", false, true},
		{"proc.start", "", "start", true, true},
		{"proc.list", "", "list", true, true},
		{"proc.k1234567890a.stdin", "k1234567890a", "stdin", true, true},
		{"proc.k1234567890a.signal", "k1234567890a", "signal", true, true},
		{"proc.k1234567890a.resize", "k1234567890a", "resize", true, true},
		{"proc.k1234567890a.connect", "k1234567890a", "connect", true, true},
		{"proc.k1234567890a.kill", "", "", true, false},
		{"proc.K1234567890a.stdin", "", "", true, false},
		{"proc.1234567890ab.stdin", "", "", true, false},
		{"proc.short.stdin", "", "", true, false},
		{"proc.k1234567890a", "", "", true, false},
		{"proc.stop", "", "", true, false},
		{"proc.k1234567890a.stdin.x", "", "", true, false},
	} {
		cmd, op, ok, err := ParseProcVerb(tt.verb)
		if ok != tt.ok || (err == nil) != tt.valid || cmd != tt.cmd || op != tt.op {
			t.Errorf("ParseProcVerb(%q) = %q %q %v %v; want %q %q %v valid=%v", tt.verb, cmd, op, ok, err, tt.cmd, tt.op, tt.ok, tt.valid)
		}
		if err != nil && !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("ParseProcVerb(%q): error %v is not an invalid argument", tt.verb, err)
		}
	}
}

func TestParseSignal(t *testing.T) {
	for in, want := range map[string]string{"TERM": "TERM", "SIGTERM": "TERM", "term": "TERM", "sigkill": "KILL", "WINCH": "WINCH"} {
		if got, err := ParseSignal(in); err != nil || got != want {
			t.Errorf("ParseSignal(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", "SIG", "15", "SEGV", "TERM ", strings.Repeat("SIG", 10) + "TERM"} {
		if _, err := ParseSignal(in); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("ParseSignal(%q) = %v, want invalid", in, err)
		}
	}
	if SignalName(15) != "TERM" || SignalName(9) != "KILL" || SignalName(11) != "SEGV" || SignalName(99) != "" {
		t.Error("SignalName")
	}
}

func TestProcStartRequestValidate(t *testing.T) {
	ok := ProcStartRequest{Command: "sh", Args: []string{"-c", "true"}, Tag: "web", PTY: &PTYSize{Cols: 80, Rows: 24}}
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	for name, r := range map[string]ProcStartRequest{
		"no command":   {},
		"nul":          {Command: "a\x00b"},
		"arg nul":      {Command: "a", Args: []string{"x\x00"}},
		"tag":          {Command: "a", Tag: strings.Repeat("t", 65)},
		"tag control":  {Command: "a", Tag: "a\nb"},
		"pty 0":        {Command: "a", PTY: &PTYSize{}},
		"pty huge":     {Command: "a", PTY: &PTYSize{Cols: 1001, Rows: 1}},
		"timeout":      {Command: "a", TimeoutMS: -1},
		"many args":    {Command: "a", Args: make([]string, MaxProcArgs+1)},
		"long command": {Command: strings.Repeat("a", MaxProcCommand+1)},
	} {
		if err := r.Validate(); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%s: Validate = %v, want invalid", name, err)
		}
	}
}

func TestExecRequestValidate(t *testing.T) {
	for _, ok := range []ExecRequest{{Command: "echo hi"}, {Command: "echo", Args: []string{"a b"}}, {Command: "true", Args: []string{}}} {
		if err := ok.Validate(); err != nil {
			t.Errorf("%+v: %v", ok, err)
		}
	}
	for name, r := range map[string]ExecRequest{
		"no command": {},
		"argv nul":   {Command: "a\x00b", Args: []string{}},
		"arg nul":    {Command: "a", Args: []string{"x\x00"}},
		"many args":  {Command: "a", Args: make([]string, MaxProcArgs+1)},
		"long args":  {Command: "a", Args: []string{strings.Repeat("a", MaxProcArgLen+1)}},
	} {
		if err := r.Validate(); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%s: Validate = %v, want invalid", name, err)
		}
	}
}

// FuzzParseProcVerb: whatever verb the subject carries, an accepted one
// names a valid command id (one subject token) and a known op, and builds
// back to itself.
func FuzzParseProcVerb(f *testing.F) {
	for _, s := range []string{"proc.start", "proc.list", "proc.k1234567890a.stdin", "proc..stdin", "proc.k1234567890a.", "exec", "proc"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, verb string) {
		cmd, op, ok, err := ParseProcVerb(verb)
		if !ok {
			if err != nil || strings.HasPrefix(verb, "proc.") {
				t.Fatalf("ParseProcVerb(%q): ok=false, err %v", verb, err)
			}
			return
		}
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("ParseProcVerb(%q): unclassified error %v", verb, err)
			}
			return
		}
		if cmd == "" {
			if verb != "proc."+op || (op != "start" && op != "list") {
				t.Fatalf("ParseProcVerb(%q) = %q %q", verb, cmd, op)
			}
			return
		}
		if ValidateCommandID(cmd) != nil || !validToken(cmd) || ProcVerb(cmd, op) != verb {
			t.Fatalf("ParseProcVerb(%q) = %q %q: does not round trip", verb, cmd, op)
		}
		id, v, err := Default.ParseSandbox(Default.Sandbox("sb1", verb))
		if err != nil || id != "sb1" || v != verb {
			t.Fatalf("sandbox subject of verb %q parsed as %q %q %v", verb, id, v, err)
		}
	})
}
