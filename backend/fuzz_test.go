package backend

import (
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// wellFormed is what verifyRecord asks of a record besides its mac.
func wellFormed(rec subjects.SnapshotRecord) bool {
	if subjects.ValidateSnapshotName(rec.SnapshotID) != nil || !generationPattern.MatchString(rec.Generation) || len(rec.Artifacts) > maxArtifacts {
		return false
	}
	for _, a := range rec.Artifacts {
		if !plainFileName(a.Name) || a.SizeBytes < 0 {
			return false
		}
	}
	return true
}

// inside reports whether path is a direct child of dir, with no traversal.
func inside(dir, path string) bool {
	return filepath.Clean(path) == path && filepath.Dir(path) == dir && filepath.Base(path) != ".."
}

func recordSeeds(f *testing.F) {
	good, _ := json.Marshal(testRecord())
	f.Add(good, "snap.1")
	f.Add([]byte(`{"snapshot_id":"a","generation":"g1","mac":"v1:00"}`), "a")
	f.Add([]byte(`{"snapshot_id":"../x","generation":"g","artifacts":[{"name":"..","size_bytes":-1}]}`), "../x")
	f.Add([]byte(`{"snapshot_id":"a","generation":"../../etc","location":"/etc"}`), "a")
	f.Add([]byte(`{"snapshot_id":"a","generation":"g","created_at":"2020-01-01T00:00:00.100+01:00","template_metadata":{"envs":{}}}`), "a")
	f.Add([]byte(`{}`), "")
}

// FuzzVerifyRecord feeds snapshot records as they come from KV or the
// templates directory. A record the fuzzer wrote never verifies (it holds no
// key) and is refused as an integrity error; the same record signed by the
// worker survives a JSON round trip and verifies exactly when it is well
// formed, and then its directory is one entry of <state>/snapshots and it
// verifies under no other id.
func FuzzVerifyRecord(f *testing.F) {
	recordSeeds(f)
	b := testBackend("fuzz secret")
	f.Fuzz(func(t *testing.T, data []byte, sid string) {
		var rec subjects.SnapshotRecord
		if json.Unmarshal(data, &rec) != nil {
			return
		}
		if err := b.verifyRecord(sid, rec); !errors.Is(err, errdefs.ErrIntegrity) {
			t.Fatalf("forged record %s under %q: verify = %v, want an integrity error", data, sid, err)
		}
		signed, err := b.signRecord(rec)
		if err != nil {
			return // not encodable (a time past year 9999): never stored either
		}
		stored, err := json.Marshal(signed)
		if err != nil {
			t.Fatalf("signed record does not encode: %v", err)
		}
		var back subjects.SnapshotRecord
		if err := json.Unmarshal(stored, &back); err != nil {
			t.Fatalf("signed record %s does not decode: %v", stored, err)
		}
		err = b.verifyRecord(back.SnapshotID, back)
		if want := wellFormed(back); (err == nil) != want {
			t.Fatalf("signed record %s: verify = %v, well formed %v", stored, err, want)
		}
		if err != nil {
			if !errors.Is(err, errdefs.ErrIntegrity) {
				t.Fatalf("signed record %s: unclassified error %v", stored, err)
			}
			return
		}
		if dir := b.recordDir(back); !inside(filepath.Join("/state", "snapshots"), dir) {
			t.Fatalf("signed record %s: directory %q is not one entry of the snapshots dir", stored, dir)
		}
		for _, a := range back.Artifacts {
			if p := filepath.Join(b.recordDir(back), a.Name); !inside(b.recordDir(back), p) {
				t.Fatalf("artifact %q resolves to %q", a.Name, p)
			}
		}
		if sid != back.SnapshotID && b.verifyRecord(sid, back) == nil {
			t.Fatalf("record of %q verified under %q", back.SnapshotID, sid)
		}
		if testBackend("another secret").verifyRecord(back.SnapshotID, back) == nil {
			t.Fatalf("record verified under another key")
		}
	})
}

// FuzzVerifySession: a session record the fuzzer wrote never verifies; the
// same record signed survives a JSON round trip (the path through KV) and
// verifies; a verified record's machine directory is one entry of
// <state>/sandboxes named after the sandbox or a warm machine.
func FuzzVerifySession(f *testing.F) {
	f.Add([]byte(`{"sandbox_id":"sb1","client_id":"w1","state":"running","started_at":"2020-01-01T00:00:00Z","end_at":"2020-01-01T01:00:00.5+02:00","source":"pool","resources":{"vcpus":1},"public_traffic":false,"network":true,"egress":{"deny":["0.0.0.0/0"]},"generation":"g1","dir":"/state/sandboxes/warm-abc"}`))
	f.Add([]byte(`{"sandbox_id":"sb1","dir":"/etc","mac":"v1:00"}`))
	f.Add([]byte(`{"sandbox_id":"../x","dir":"/state/sandboxes/warm-.."}`))
	f.Add([]byte(`{"metadata":{"a":"\u00e9"},"started_at":"0001-01-01T00:00:00Z"}`))
	b := testBackend("fuzz secret")
	f.Fuzz(func(t *testing.T, data []byte) {
		var rec subjects.Sandbox
		if json.Unmarshal(data, &rec) != nil {
			return
		}
		if err := b.verifySession(rec); !errors.Is(err, errdefs.ErrIntegrity) {
			t.Fatalf("forged session %s: verify = %v, want an integrity error", data, err)
		}
		mac, err := sessionMAC(b.cfg.RecordKey, rec)
		if err != nil {
			return
		}
		rec.MAC = mac
		stored, err := json.Marshal(rec)
		if err != nil {
			t.Fatal(err)
		}
		var back subjects.Sandbox
		if err := json.Unmarshal(stored, &back); err != nil {
			t.Fatalf("signed session %s does not decode: %v", stored, err)
		}
		if err := b.verifySession(back); err != nil {
			t.Fatalf("signed session %s refused after a round trip: %v", stored, err)
		}
		back.ClientID += "x"
		if b.verifySession(back) == nil {
			t.Fatalf("edited session verified")
		}
		dir, err := b.machineDir(rec)
		if err != nil {
			return
		}
		if !inside(filepath.Join("/state", "sandboxes"), dir) {
			t.Fatalf("session %s: machine directory %q is not one entry of the sandboxes dir", stored, dir)
		}
		if base := filepath.Base(dir); base != rec.SandboxID && (!strings.HasPrefix(base, "warm-") || subjects.ValidateSandboxID(base) != nil) {
			t.Fatalf("session %s: machine directory %q", stored, dir)
		}
	})
}

// FuzzLoadTemplates writes one file into a templates directory, as it is
// found after a crash or a tampering: forged records are never loaded,
// and a signed one is loaded only under its own template id, from
// <id>.json, when it is well formed.
func FuzzLoadTemplates(f *testing.F) {
	rec := testRecord()
	rec.SnapshotID, rec.TemplateID, rec.Kind = "tiny", "tiny", subjects.KindTemplate
	good, _ := json.Marshal(rec)
	f.Add("tiny.json", good, true)
	f.Add("tiny.json", good, false)
	f.Add("other.json", good, true)
	f.Add("tiny.json.tmp", good, true)
	f.Add("x.json", []byte(`{"snapshot_id":"x","template_id":"x","generation":"g"`), true)
	f.Add(".json", []byte(`{"snapshot_id":"","template_id":"","generation":"g"}`), true)
	b := testBackend("fuzz secret")
	log := slog.New(slog.DiscardHandler)
	// One directory per fuzz process, emptied for every input (the
	// inputs of one process run one at a time).
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, name string, data []byte, sign bool) {
		if name == "" || name == "." || name == ".." || len(name) > 200 || strings.ContainsAny(name, "/\x00") {
			return
		}
		// want is the template a signed, well-formed record of the
		// file's own id must load as.
		var want string
		if sign {
			var r subjects.SnapshotRecord
			if json.Unmarshal(data, &r) == nil {
				if s, err := b.signRecord(r); err == nil {
					data, _ = json.Marshal(s)
					if id := strings.TrimSuffix(name, ".json"); name == id+".json" && s.TemplateID == id && s.SnapshotID == id && wellFormed(s) {
						want = id
					}
				}
			}
		}
		old, _ := os.ReadDir(dir)
		for _, e := range old {
			if err := os.Remove(filepath.Join(dir, e.Name())); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			return
		}
		tm, err := loadTemplates(dir, b.verifyRecord, log)
		if err != nil {
			t.Fatalf("loadTemplates: %v", err)
		}
		for id, got := range tm.m {
			if name != id+".json" || got.TemplateID != id || got.SnapshotID != id || !wellFormed(got) {
				t.Fatalf("file %q loaded as template %q: %+v", name, id, got)
			}
			if !sign {
				t.Fatalf("unsigned file %q loaded as template %q", name, id)
			}
		}
		if _, ok := tm.m[want]; want != "" && (!ok || len(tm.m) != 1) {
			t.Fatalf("signed record of template %q in %q not loaded: %v", want, name, tm.m)
		}
	})
}
