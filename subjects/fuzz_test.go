package subjects

import (
	"bytes"
	"encoding/json"
	"errors"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// requestTypes are the bodies the handlers decode with Decode, one per
// request subject (struct{} is the body of list, get, kill, pool.status...).
var requestTypes = []struct {
	name string
	new  func() any
}{
	{"create", func() any { return new(CreateSandboxRequest) }},
	{"exec", func() any { return new(ExecRequest) }},
	{"snapshot", func() any { return new(SnapshotRequest) }},
	{"template.build", func() any { return new(BuildTemplateRequest) }},
	{"route", func() any { return new(RouteRequest) }},
	{"timeout", func() any { return new(TimeoutRequest) }},
	{"logs", func() any { return new(LogsRequest) }},
	{"pool.set", func() any { return new(PoolSetRequest) }},
	{"empty", func() any { return new(struct{}) }},
}

// FuzzDecodeRequests decodes one body as every request type the handlers
// take: an error is an invalid argument, and an accepted request encodes to
// JSON that Decode accepts again and that encodes to the same bytes (the
// decoder and the encoder agree on every request type).
func FuzzDecodeRequests(f *testing.F) {
	for _, s := range []string{
		`{"template_id":"tiny","sandbox_id":"a-1","resources":{"vcpus":2,"memory_mb":512},"timeout_s":60,"env":{"A":"b"},"metadata":{"k":"v"},"public_traffic":true,"network":false,"egress":{"allow":["example.com","10.0.0.0/8"],"deny":["*.evil.test"]}}`,
		`{"command":"echo hi","cwd":"/tmp","env":{"X":"\u00e9"},"user":"root","stdin":"in","timeout_ms":5}`,
		`{"name":"snap.1","kind":"template","template_metadata":{"envs":{"A":"1"},"start_cmd":"s","ready_cmd":"r"},"stop":true}`,
		`{"template_id":"t","from":"tiny","steps":["apk add x"],"ready_timeout_s":3}`,
		`{"port":8080}`, `{"timeout_s":-1}`, `{"cursor":18446744073709551615,"limit":1000}`,
		`{"template_id":"tiny","target":3}`, ``, `  `, `null`, `{}`, `{"Port":1,"port":2}`,
		`{"env":{}}`, `{"egress":null}`, `{"command":"\ud800"}`, "{\"command\":\"\xff\"}",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, rt := range requestTypes {
			v := rt.new()
			if err := Decode(data, v); err != nil {
				if !errors.Is(err, errdefs.ErrInvalidArgument) {
					t.Fatalf("%s: Decode(%q): unclassified error %v", rt.name, data, err)
				}
				continue
			}
			enc, err := json.Marshal(v)
			if err != nil {
				t.Fatalf("%s: accepted %q but cannot encode it: %v", rt.name, data, err)
			}
			w := rt.new()
			if err := Decode(enc, w); err != nil {
				t.Fatalf("%s: accepted %q, its encoding %s is refused: %v", rt.name, data, enc, err)
			}
			again, err := json.Marshal(w)
			if err != nil || !bytes.Equal(enc, again) {
				t.Fatalf("%s: %q decodes to %s, which decodes to %s (%v)", rt.name, data, enc, again, err)
			}
		}
	})
}

// kvKey is the NATS KV key charset (nats.go's validKeyRe), which the
// snapshot, session and template buckets key by these names.
var kvKey = regexp.MustCompile(`^[-/_=\.a-zA-Z0-9]+$`)

// safeName reports whether name is one file name (no separator, no NUL, not
// "." or "..", no ".." anywhere) and at most 255 bytes.
func safeName(name string) bool {
	return name != "" && len(name) <= 255 && !strings.ContainsAny(name, "/\\\x00") &&
		!strings.Contains(name, "..") && filepath.Base(name) == name && name != "."
}

// singleToken reports whether s is one NATS subject token.
func singleToken(s string) bool { return validToken(s) && strings.IndexFunc(s, isSpace) < 0 }

func isSpace(r rune) bool {
	return r == ' ' || r == '\t' || r == '\r' || r == '\n' || r == '\f' || r == '\v'
}

// FuzzValidateIDs holds the validators to what the code that trusts them
// needs: an accepted sandbox or template id is one subject token, one file
// name and a KV key and round trips through its subjects; an accepted
// snapshot name is a KV key and a file name whose subjects parse back to it;
// a template id is a snapshot name (templates are stored as snapshots).
func FuzzValidateIDs(f *testing.F) {
	for _, s := range []string{
		"abc", "a-1", "tiny", "t_1", "snap.1", "Snap-2_x.y", "a", strings.Repeat("a", 63), strings.Repeat("a", 64),
		strings.Repeat("b", 128), "..", ".", "a..b", ".a", "a.", "a/b", "a\x00b", "A", "-a", "_a", "a b", "a*", "a>",
		"é", "a\n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if err := ValidateSandboxID(s); err == nil {
			if len(s) > 63 || !singleToken(s) || !safeName(s) || !kvKey.MatchString(s) || strings.ToLower(s) != s {
				t.Fatalf("sandbox id %q accepted", s)
			}
			for _, verb := range SandboxVerbs {
				id, v, err := Default.ParseSandbox(Default.Sandbox(s, verb))
				if err != nil || id != s || v != verb {
					t.Fatalf("sandbox id %q verb %s: parsed back as %q %q %v", s, verb, id, v, err)
				}
			}
			if !singleToken(strings.TrimPrefix(Default.Logs(s), "firkin.logs.")) {
				t.Fatalf("logs subject of %q is not one token", s)
			}
		} else if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Fatalf("sandbox id %q: unclassified error %v", s, err)
		}
		if err := ValidateTemplateID(s); err == nil {
			if len(s) > 63 || !singleToken(s) || !safeName(s) || !kvKey.MatchString(s) || strings.ToLower(s) != s {
				t.Fatalf("template id %q accepted", s)
			}
			if err := ValidateSnapshotName(s); err != nil {
				t.Fatalf("template id %q is not a snapshot name: %v", s, err)
			}
		} else if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Fatalf("template id %q: unclassified error %v", s, err)
		}
		if err := ValidateSnapshotName(s); err == nil {
			if len(s) > 128 || !safeName(s) || !kvKey.MatchString(s) || strings.HasPrefix(s, ".") || strings.HasSuffix(s, ".") {
				t.Fatalf("snapshot name %q accepted", s)
			}
			for _, tok := range strings.Split(s, ".") {
				if !singleToken(tok) {
					t.Fatalf("snapshot name %q has token %q", s, tok)
				}
			}
			for _, verb := range []string{"get", "delete"} {
				sid, v, err := Default.ParseSnapshot(Default.Snapshot(s, verb))
				if err != nil || sid != s || v != verb {
					t.Fatalf("snapshot %q verb %s: parsed back as %q %q %v", s, verb, sid, v, err)
				}
			}
		} else if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Fatalf("snapshot name %q: unclassified error %v", s, err)
		}
	})
}

// FuzzParseSnapshot: what ParseSnapshot accepts is a valid snapshot name
// and a verb without a dot that build the same subject again; what it and
// ParseSandbox refuse is an invalid argument (a client's mistake, answered
// invalid_request, not a runtime failure).
func FuzzParseSnapshot(f *testing.F) {
	for _, s := range []string{
		"firkin.snapshot.abc.get", "firkin.snapshot.a.b.c.delete", "firkin.snapshot..get", "firkin.snapshot.a..b.get",
		"firkin.snapshot.get", "firkin.snapshot.", "firkin.snapshots.a.get", "firkin.snapshot.a/b.get", "firkin.snapshot.abc.",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if _, _, err := Default.ParseSandbox(s); err != nil && !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Fatalf("ParseSandbox(%q): unclassified error %v", s, err)
		}
		sid, verb, err := Default.ParseSnapshot(s)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("ParseSnapshot(%q): unclassified error %v", s, err)
			}
			return
		}
		if ValidateSnapshotName(sid) != nil || strings.Contains(verb, ".") || Default.Snapshot(sid, verb) != s {
			t.Fatalf("ParseSnapshot(%q) = %q %q but does not round trip", s, sid, verb)
		}
	})
}

// knownCodes are the error codes of the contract.
var knownCodes = []Code{CodeInvalidRequest, CodeSandboxNotFound, CodeSnapshotNotFound, CodeConflict, CodeTemplateBuildFailed,
	CodeCapacityRejected, CodeRuntimeFailed, CodeUnsupported, CodeProtocolFailure, CodeTimeout, CodeDiskPressure}

// FuzzErrorReply decodes an error reply as a client does: the error it
// turns into maps back (CodeOf) to the code it came with, or to
// runtime_failed for a code the contract does not have, whatever the
// message says; and every code has an error status.
func FuzzErrorReply(f *testing.F) {
	for _, s := range []string{
		`{"error":{"code":"sandbox_not_found","message":"no sandbox x"}}`,
		`{"error":{"code":"snapshot_not_found","message":"sandbox_not_found"}}`,
		`{"error":{"code":"disk_pressure","message":""}}`,
		`{"error":{"code":"teapot","message":"invalid_request: x"}}`,
		`{"error":{"code":"","message":"x"}}`,
		`{"error":{"code":"TIMEOUT"}}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var body ErrorBody
		if json.Unmarshal(data, &body) != nil {
			return
		}
		code := body.Error.Code
		err := body.Error.Err()
		want := CodeRuntimeFailed
		for _, k := range knownCodes {
			if code == k {
				want = k
			}
		}
		if got := CodeOf(err); got != want {
			t.Fatalf("error reply %s: CodeOf(Err()) = %s, want %s", data, got, want)
		}
		if s := code.Status(); s < 400 || s > 599 {
			t.Fatalf("code %q: status %d", code, s)
		}
	})
}
