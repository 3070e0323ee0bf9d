package backend

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// Snapshot records are authenticated: anyone who can write the KV bucket (or
// the templates directory) could otherwise name any host directory as a
// snapshot's location. A record's mac is
//
//	"v1:" + hex(HMAC-SHA256(RecordKey(secret), recordMACLabel + "\n" + canonical))
//
// where canonical is the record encoded by encoding/json with mac empty (the
// struct's field order, maps sorted by key; fields this build does not know
// are dropped on decode and so not covered). A field added to
// subjects.SnapshotRecord must be omitempty, or change recordMACLabel.
//
// Nothing in a record is used as a host path: the snapshot's directory is
// derived from the state directory, the validated snapshot id and the
// record's generation (snapshotDir); location stays in the record for people
// to read.
const (
	recordKeyLabel = "firkin snapshot records v1"
	recordMACLabel = "firkin snapshot record v1"
	recordMACV1    = "v1:"
)

// RecordKey derives the key that authenticates snapshot records from the
// worker secret: HMAC-SHA256(secret, "firkin snapshot records v1"). Workers
// that share snapshot records (a cluster) must share the secret.
func RecordKey(secret []byte) []byte {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(recordKeyLabel))
	return m.Sum(nil)
}

// generationPattern is a snapshot directory's generation: the suffix that
// tells versions of one snapshot id (a rebuilt template) apart.
var generationPattern = regexp.MustCompile(`^[a-z0-9]{1,32}$`)

// maxArtifacts bounds the artifacts of one record.
const maxArtifacts = 256

// macOf returns "v1:" + hex(HMAC-SHA256(key, label + "\n" + json(v))); what
// names the record in an encoding error.
func macOf(key []byte, label, what string, v any) (string, error) {
	data, err := json.Marshal(v)
	if err != nil {
		return "", fmt.Errorf("encode %s: %w", what, err)
	}
	m := hmac.New(sha256.New, key)
	m.Write([]byte(label + "\n"))
	m.Write(data)
	return recordMACV1 + hex.EncodeToString(m.Sum(nil)), nil
}

// recordMAC returns the mac of rec (its own mac ignored).
func recordMAC(key []byte, rec subjects.SnapshotRecord) (string, error) {
	rec.MAC = ""
	return macOf(key, recordMACLabel, "snapshot record "+rec.SnapshotID, rec)
}

// signRecord returns rec with its mac set.
func (b *Backend) signRecord(rec subjects.SnapshotRecord) (subjects.SnapshotRecord, error) {
	mac, err := recordMAC(b.cfg.RecordKey, rec)
	if err != nil {
		return rec, err
	}
	rec.MAC = mac
	return rec, nil
}

// errUnsigned marks a record written before records were authenticated.
var errUnsigned = errors.New("no mac")

// verifyRecord checks that rec, stored under sid, was written by a worker
// holding the record key and is well formed. Its errors are of class
// errdefs.ErrIntegrity and carry no path or digest.
func (b *Backend) verifyRecord(sid string, rec subjects.SnapshotRecord) error {
	fail := func(why string) error {
		return errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("snapshot record %s failed authentication (%s): refusing to use it", sid, why))
	}
	if rec.MAC == "" {
		return errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("snapshot record %s is unsigned (%w): it was written before snapshot records were authenticated, or forged; delete it and make the snapshot again (built-in templates are rebuilt at start)", sid, errUnsigned))
	}
	want, err := recordMAC(b.cfg.RecordKey, rec)
	if err != nil {
		return fail("cannot encode it")
	}
	if !hmac.Equal([]byte(rec.MAC), []byte(want)) {
		why := "mac does not match"
		if rec.WorkerID != "" && rec.WorkerID != b.cfg.WorkerID {
			why += "; workers that share snapshot records must share the worker secret"
		}
		return fail(why)
	}
	switch {
	case rec.SnapshotID != sid:
		return fail("stored under another id")
	case subjects.ValidateSnapshotName(rec.SnapshotID) != nil:
		return fail("bad snapshot id")
	case !generationPattern.MatchString(rec.Generation):
		return fail("bad generation")
	case len(rec.Artifacts) > maxArtifacts:
		return fail("too many artifacts")
	}
	for _, a := range rec.Artifacts {
		if !plainFileName(a.Name) || a.SizeBytes < 0 {
			return fail("bad artifact name or size")
		}
	}
	return nil
}

// plainFileName reports whether name is one file name: no separator, not
// "." or "..", not empty.
func plainFileName(name string) bool {
	return name != "" && name != "." && name != ".." && !strings.ContainsAny(name, `/\`) && len(name) <= 255
}

// snapshotDir is where the snapshot sid of generation gen keeps its files:
// <state dir>/snapshots/<sid>.<gen>. Both must be valid (verifyRecord).
func (b *Backend) snapshotDir(sid, gen string) string {
	return filepath.Join(b.cfg.StateDir, "snapshots", sid+"."+gen)
}

// recordDir is the directory of an authenticated record's snapshot.
func (b *Backend) recordDir(rec subjects.SnapshotRecord) string {
	return b.snapshotDir(rec.SnapshotID, rec.Generation)
}

// getSnapshot reads snapshot sid's record and authenticates it.
func (b *Backend) getSnapshot(ctx context.Context, sid string) (subjects.SnapshotRecord, error) {
	if err := subjects.ValidateSnapshotName(sid); err != nil {
		return subjects.SnapshotRecord{}, err
	}
	rec, err := b.cfg.Store.GetSnapshot(ctx, sid)
	if err != nil {
		return subjects.SnapshotRecord{}, err
	}
	if err := b.verifyRecord(sid, rec); err != nil {
		return subjects.SnapshotRecord{}, err
	}
	return rec, nil
}

// listSnapshots returns the authenticated snapshot records; the others are
// logged and left out.
func (b *Backend) listSnapshots(ctx context.Context) ([]subjects.SnapshotRecord, error) {
	all, err := b.cfg.Store.ListSnapshots(ctx)
	if err != nil {
		return nil, err
	}
	out := all[:0]
	seen := map[string]bool{}
	for _, rec := range all {
		// A signed record copied under another key names its own id: it is
		// listed once, as the record of that id.
		if seen[rec.SnapshotID] {
			continue
		}
		if err := b.verifyRecord(rec.SnapshotID, rec); err != nil {
			b.log.Warn("snapshot record left out", "snapshot", rec.SnapshotID, "err", err)
			continue
		}
		seen[rec.SnapshotID] = true
		out = append(out, rec)
	}
	return out, nil
}

// Session records (firkin_sessions) are authenticated the same way, under
// their own label: a restarted worker adopts machines and re-applies network
// policies from them, so a forged one must not be believed.
const sessionMACLabel = "firkin session record v1"

// sessionMAC returns the mac of rec (its own mac ignored).
func sessionMAC(key []byte, rec subjects.Sandbox) (string, error) {
	rec.MAC = ""
	return macOf(key, sessionMACLabel, "session record "+rec.SandboxID, rec)
}

// putSession signs rec and stores it.
func (b *Backend) putSession(ctx context.Context, rec subjects.Sandbox) error {
	mac, err := sessionMAC(b.cfg.RecordKey, rec)
	if err != nil {
		return err
	}
	rec.MAC = mac
	return b.cfg.Store.PutSession(ctx, rec)
}

// verifySession checks that a session record was written by a worker holding
// the record key. Its errors carry no path.
func (b *Backend) verifySession(rec subjects.Sandbox) error {
	if rec.MAC == "" {
		return errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("session record %s is unsigned (%w)", rec.SandboxID, errUnsigned))
	}
	want, err := sessionMAC(b.cfg.RecordKey, rec)
	if err != nil || !hmac.Equal([]byte(rec.MAC), []byte(want)) {
		return errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("session record %s failed authentication", rec.SandboxID))
	}
	return nil
}

// sessionBindingFile, in a sandbox's machine directory, holds the generation
// of the create that made the sandbox. A session record authenticates who
// wrote it, not when: an old signed record of an earlier sandbox with the
// same id, put back into KV, is refused at recovery because the machine
// running now was made by another create.
const sessionBindingFile = "firkin-generation"

// bindSession records generation in the machine directory dir (root's, 0600).
func bindSession(dir, generation string) error {
	if !generationPattern.MatchString(generation) {
		return fmt.Errorf("bind session: bad generation")
	}
	if err := os.WriteFile(filepath.Join(dir, sessionBindingFile), []byte(generation+"\n"), 0o600); err != nil {
		return fmt.Errorf("bind session: %w", err)
	}
	return nil
}

// checkSessionBinding refuses a session record whose generation is not the
// one the machine in dir was made for.
func checkSessionBinding(dir, generation string) error {
	f, err := os.Open(filepath.Join(dir, sessionBindingFile))
	if err != nil {
		return errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("session record: the machine has no creation record (%v)", errors.Unwrap(err)))
	}
	defer f.Close()
	buf := make([]byte, 64)
	n, _ := io.ReadFull(f, buf)
	if got := strings.TrimSpace(string(buf[:n])); got == "" || !hmac.Equal([]byte(got), []byte(generation)) {
		return errdefs.Wrap(errdefs.ErrIntegrity, errors.New("session record: made for another instance of this sandbox id"))
	}
	return nil
}
