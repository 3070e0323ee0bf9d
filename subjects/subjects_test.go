package subjects

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

func TestParseSandbox(t *testing.T) {
	tests := []struct {
		subject, id, verb string
		ok                bool
	}{
		{"firkin.sandbox.abc123.exec", "abc123", "exec", true},
		{"firkin.sandbox.a-b.get", "a-b", "get", true},
		{"firkin.sandbox.ABC.get", "", "", false},
		{"firkin.sandbox.-ab.get", "", "", false},
		{"firkin.sandbox.abc", "", "", false},
		{"firkin.sandbox.abc.proc.start", "abc", "proc.start", true},
		{"firkin.sandbox.abc.proc.k1234567890a.stdin", "abc", "proc.k1234567890a.stdin", true},
		{"firkin.sandbox.abc.exec.", "", "", false},
		{"firkin.sandbox.abc.proc..stdin", "", "", false},
		{"firkin.sandbox.abc.proc.*.stdin", "", "", false},
		{"firkin.sandbox.abc.exec.more", "abc", "exec.more", true},
		{"firkin.sandbox.abc.fs.chunk.t1", "abc", "fs.chunk.t1", true},
		{"firkin.sandbox.abc.fs..read", "", "", false},
		{"firkin.sandbox.abc.fs.*", "", "", false},
		{"firkin.sandbox.abc.fs.>", "", "", false},
		{"firkin.sandbox.abc.fs.", "", "", false},
		{"firkin.sandbox.abc.a.b.c.d.e.f.g.h.i", "", "", false},
		{"other.sandbox.abc.exec", "", "", false},
		{"firkin.sandbox." + strings.Repeat("a", 64) + ".get", "", "", false},
	}
	for _, tt := range tests {
		id, verb, err := Default.ParseSandbox(tt.subject)
		if (err == nil) != tt.ok || id != tt.id || verb != tt.verb {
			t.Errorf("ParseSandbox(%q) = %q, %q, %v; want %q, %q, ok=%v", tt.subject, id, verb, err, tt.id, tt.verb, tt.ok)
		}
		if err != nil && !errors.Is(err, errdefs.ErrInvalidArgument) && strings.HasPrefix(tt.subject, "firkin.sandbox.") && strings.Count(tt.subject, ".") == 3 {
			t.Errorf("ParseSandbox(%q): error %v is not an invalid argument", tt.subject, err)
		}
	}
}

func TestParseSnapshot(t *testing.T) {
	sid, verb, err := Default.ParseSnapshot("firkin.snapshot.my.snap-1.get")
	if err != nil || sid != "my.snap-1" || verb != "get" {
		t.Fatalf("got %q %q %v", sid, verb, err)
	}
	for _, bad := range []string{"firkin.snapshot.list", "firkin.snapshot...get", "firkin.snapshot..get", "firkin.snapshot.a/b.get",
		"firkin.snapshot.a..get", "firkin.snapshot..a.get", "firkin.snapshot.a..b.get", "firkin.snapshot.a.*.get"} {
		if _, _, err := Default.ParseSnapshot(bad); err == nil {
			t.Errorf("ParseSnapshot(%q) accepted", bad)
		}
	}
}

func TestValidateSnapshotName(t *testing.T) {
	for _, ok := range []string{"a", "A.b_c-d", strings.Repeat("x", 128)} {
		if err := ValidateSnapshotName(ok); err != nil {
			t.Errorf("%q rejected: %v", ok, err)
		}
	}
	for _, bad := range []string{"", ".", "..", "a/b", `a\b`, "a b", strings.Repeat("x", 129), "é",
		".a", "a.", "a..b", "a=b", "a*", "a>", "a\x00"} {
		if err := ValidateSnapshotName(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestNewPrefix(t *testing.T) {
	if _, err := New("a.b"); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"a..b", "a.*", "a >", "."} {
		if _, err := New(bad); err == nil {
			t.Errorf("prefix %q accepted", bad)
		}
	}
	s, _ := New("")
	if got := s.Sandbox("x1", VerbExec); got != "firkin.sandbox.x1.exec" {
		t.Errorf("Sandbox subject = %q", got)
	}
}

func TestCodeRoundTrip(t *testing.T) {
	for _, code := range []Code{CodeInvalidRequest, CodeSandboxNotFound, CodeSnapshotNotFound, CodeConflict,
		CodeTemplateBuildFailed, CodeCapacityRejected, CodeRuntimeFailed, CodeUnsupported, CodeProtocolFailure,
		CodeTimeout, CodeDiskPressure} {
		err := ErrorDetail{Code: code, Message: "m"}.Err()
		if got := CodeOf(err); got != code {
			t.Errorf("CodeOf(Err(%s)) = %s", code, got)
		}
	}
	if got := CodeOf(fmt.Errorf("wrapped: %w", errdefs.Wrap(errdefs.ErrCapacity, errors.New("full")))); got != CodeCapacityRejected {
		t.Errorf("wrapped capacity = %s", got)
	}
	if CodeOf(errors.New("boom")) != CodeRuntimeFailed || CodeRuntimeFailed.Status() != 500 || CodeDiskPressure.Status() != 507 {
		t.Error("default code or status wrong")
	}
}

func TestDecode(t *testing.T) {
	var req CreateSandboxRequest
	if err := Decode(nil, &req); err != nil {
		t.Fatalf("empty body: %v", err)
	}
	if err := Decode([]byte(`{"template_id":"tiny","resources":{"vcpus":2}}`), &req); err != nil || req.Resources.VCPUs != 2 {
		t.Fatalf("valid body: %v %+v", err, req)
	}
	for _, bad := range []string{`{`, `{"nope":1}`, `{"template_id":3}`, `{} {}`, `[]`, `"x"`} {
		var r CreateSandboxRequest
		err := Decode([]byte(bad), &r)
		if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("Decode(%s) = %v, want invalid argument", bad, err)
		}
	}
}

func FuzzDecode(f *testing.F) {
	for _, s := range []string{`{}`, `{"template_id":"tiny"}`, `{"command":"echo","env":{"A":"B"},"timeout_ms":5}`, `{"resources":{"vcpus":-1}}`, `{"a":`, "\x00"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var c CreateSandboxRequest
		if err := Decode(data, &c); err != nil && !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Fatalf("unclassified error %v", err)
		}
		var e ExecRequest
		_ = Decode(data, &e)
		var s SnapshotRequest
		_ = Decode(data, &s)
		var b BuildTemplateRequest
		_ = Decode(data, &b)
	})
}

func FuzzParseSandbox(f *testing.F) {
	f.Add("firkin.sandbox.abc.exec")
	f.Add("firkin.sandbox..")
	f.Add("firkin.sandbox.abc.proc.k1234567890a.stdin")
	f.Add("firkin.sandbox.abc.fs.read")
	f.Add("firkin.sandbox.abc.fs.chunk.0123abcd")
	f.Add("firkin.sandbox.abc.fs..x")
	f.Fuzz(func(t *testing.T, s string) {
		id, verb, err := Default.ParseSandbox(s)
		if err == nil {
			for _, tok := range strings.Split(verb, ".") {
				if !validToken(tok) {
					t.Fatalf("ParseSandbox(%q): verb token %q is not a subject token", s, tok)
				}
			}
		}
		if err == nil && (ValidateSandboxID(id) != nil || !validVerb(verb) || strings.Count(verb, ".") >= maxVerbTokens || Default.Sandbox(id, verb) != s) {
			t.Fatalf("ParseSandbox(%q) = %q %q but does not round trip", s, id, verb)
		}
	})
}
