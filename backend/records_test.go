package backend

import (
	"encoding/json"
	"errors"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

func testBackend(secret string) *Backend {
	return &Backend{cfg: Config{WorkerID: "w1", StateDir: "/state", RecordKey: RecordKey([]byte(secret))}, log: slog.New(slog.DiscardHandler)}
}

func testRecord() subjects.SnapshotRecord {
	return subjects.SnapshotRecord{
		SnapshotID: "snap.1", Names: []string{"snap.1"}, Location: "/state/snapshots/snap.1.abc123",
		TemplateMetadata: subjects.TemplateMetadata{Envs: map[string]string{"B": "2", "A": "1"}},
		Kind:             subjects.KindContinuation, CreatedAt: time.Now().UTC(), SizeBytes: 3, SHA256: strings.Repeat("a", 64),
		WorkerID: "w1", Driver: "qemu", Resources: subjects.Resources{VCPUs: 1, MemoryMB: 256}, Generation: "abc123",
		MachineIdentifier: []byte{1, 2}, Artifacts: []subjects.Artifact{{Name: "state", SizeBytes: 3, SHA256: strings.Repeat("b", 64)}},
	}
}

// TestRecordMAC: a signed record survives the trip through JSON (as through
// KV); every edit, a replay under another id, another key and a missing mac
// are refused with an integrity error that names no path or digest.
func TestRecordMAC(t *testing.T) {
	b := testBackend("secret")
	rec, err := b.signRecord(testRecord())
	if err != nil {
		t.Fatal(err)
	}
	data, _ := json.Marshal(rec)
	var back subjects.SnapshotRecord
	if err := json.Unmarshal(data, &back); err != nil {
		t.Fatal(err)
	}
	if err := b.verifyRecord("snap.1", back); err != nil {
		t.Fatalf("signed record after a JSON round trip: %v", err)
	}
	if got, want := b.recordDir(back), filepath.Join("/state", "snapshots", "snap.1.abc123"); got != want {
		t.Errorf("recordDir = %s, want %s", got, want)
	}
	edits := map[string]func(r *subjects.SnapshotRecord){
		"location":   func(r *subjects.SnapshotRecord) { r.Location = "/etc" },
		"generation": func(r *subjects.SnapshotRecord) { r.Generation = "zzz999" },
		"resources":  func(r *subjects.SnapshotRecord) { r.Resources.MemoryMB = 512 },
		"artifact":   func(r *subjects.SnapshotRecord) { r.Artifacts[0].SHA256 = strings.Repeat("c", 64) },
		"env":        func(r *subjects.SnapshotRecord) { r.TemplateMetadata.Envs["A"] = "x" },
		"worker":     func(r *subjects.SnapshotRecord) { r.WorkerID = "w2" },
		"mac":        func(r *subjects.SnapshotRecord) { r.MAC = "v1:" + strings.Repeat("0", 64) },
	}
	for name, edit := range edits {
		var r subjects.SnapshotRecord
		_ = json.Unmarshal(data, &r)
		edit(&r)
		err := b.verifyRecord("snap.1", r)
		if !errors.Is(err, errdefs.ErrIntegrity) || !strings.Contains(err.Error(), "failed authentication") {
			t.Errorf("edited %s: %v", name, err)
		}
		if err != nil && (strings.Contains(err.Error(), "/") || hexRun(err.Error())) {
			t.Errorf("edited %s: error leaks a path or digest: %v", name, err)
		}
	}
	if err := b.verifyRecord("other", back); !errors.Is(err, errdefs.ErrIntegrity) {
		t.Errorf("record replayed under another id: %v", err)
	}
	if err := testBackend("other secret").verifyRecord("snap.1", back); !errors.Is(err, errdefs.ErrIntegrity) {
		t.Errorf("record of another key: %v", err)
	}
	back.MAC = ""
	if err := b.verifyRecord("snap.1", back); !errors.Is(err, errUnsigned) || !strings.Contains(err.Error(), "make the snapshot again") {
		t.Errorf("unsigned record: %v", err)
	}
	// Even a correctly signed record cannot name a path outside the
	// snapshot's directory.
	for name, edit := range map[string]func(r *subjects.SnapshotRecord){
		"generation with a slash": func(r *subjects.SnapshotRecord) { r.Generation = "../x" },
		"artifact with a slash":   func(r *subjects.SnapshotRecord) { r.Artifacts[0].Name = "../../etc/shadow" },
		"artifact ..":             func(r *subjects.SnapshotRecord) { r.Artifacts[0].Name = ".." },
		"bad id":                  func(r *subjects.SnapshotRecord) { r.SnapshotID = "../x" },
	} {
		r := testRecord()
		edit(&r)
		r, _ = b.signRecord(r)
		if err := b.verifyRecord(r.SnapshotID, r); !errors.Is(err, errdefs.ErrIntegrity) {
			t.Errorf("signed record with %s: %v", name, err)
		}
	}
}

func hexRun(s string) bool {
	n := 0
	for _, c := range s {
		if (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') {
			n++
			if n >= 32 {
				return true
			}
		} else {
			n = 0
		}
	}
	return false
}

func TestMachineDir(t *testing.T) {
	b := testBackend("secret")
	for _, tt := range []struct {
		rec  subjects.Sandbox
		want string
	}{
		{subjects.Sandbox{SandboxID: "sb1"}, "/state/sandboxes/sb1"},
		{subjects.Sandbox{SandboxID: "sb1", Dir: "/elsewhere/sb1"}, "/state/sandboxes/sb1"},
		{subjects.Sandbox{SandboxID: "sb1", Dir: "/state/sandboxes/warm-abc"}, "/state/sandboxes/warm-abc"},
		{subjects.Sandbox{SandboxID: "sb1", Dir: "/etc"}, ""},
		{subjects.Sandbox{SandboxID: "sb1", Dir: "/state/sandboxes/sb2"}, ""},
		{subjects.Sandbox{SandboxID: "sb1", Dir: "/state/sandboxes/warm-.."}, ""},
		{subjects.Sandbox{SandboxID: "../x"}, ""},
	} {
		got, err := b.machineDir(tt.rec)
		if got != tt.want || (tt.want == "") != (err != nil) {
			t.Errorf("machineDir(%+v) = %q, %v; want %q", tt.rec, got, err, tt.want)
		}
	}
}

func TestSessionMAC(t *testing.T) {
	b := testBackend("secret-one")
	rec := subjects.Sandbox{SandboxID: "sb1", ClientID: "w1", Network: true, Generation: "g1",
		Egress: &subjects.EgressPolicy{Deny: []string{"0.0.0.0/0"}}}
	mac, err := sessionMAC(b.cfg.RecordKey, rec)
	if err != nil {
		t.Fatal(err)
	}
	signed := rec
	signed.MAC = mac
	if err := b.verifySession(signed); err != nil {
		t.Fatalf("signed session refused: %v", err)
	}
	for name, forge := range map[string]func(*subjects.Sandbox){
		"unsigned":       func(s *subjects.Sandbox) { s.MAC = "" },
		"wider egress":   func(s *subjects.Sandbox) { s.Egress = nil },
		"other worker":   func(s *subjects.Sandbox) { s.ClientID = "w2" },
		"other machine":  func(s *subjects.Sandbox) { s.Dir = "/etc" },
		"mac of another": func(s *subjects.Sandbox) { s.SandboxID = "sb2" },
	} {
		f := signed
		forge(&f)
		if err := b.verifySession(f); !errors.Is(err, errdefs.ErrIntegrity) {
			t.Errorf("%s: verify = %v, want an integrity error", name, err)
		}
	}
	if err := testBackend("secret-two").verifySession(signed); err == nil {
		t.Error("a session signed under another secret was accepted")
	}
}

func TestSessionBinding(t *testing.T) {
	dir := t.TempDir()
	if err := checkSessionBinding(dir, "g1"); !errors.Is(err, errdefs.ErrIntegrity) {
		t.Errorf("no binding file: %v", err)
	}
	if err := bindSession(dir, "g1"); err != nil {
		t.Fatal(err)
	}
	if err := checkSessionBinding(dir, "g1"); err != nil {
		t.Errorf("the machine's own generation refused: %v", err)
	}
	for _, other := range []string{"g2", "", "g1x"} {
		if err := checkSessionBinding(dir, other); !errors.Is(err, errdefs.ErrIntegrity) {
			t.Errorf("generation %q of another instance: %v", other, err)
		}
	}
	if err := bindSession(dir, "../x"); err == nil {
		t.Error("a bad generation was written")
	}
}
