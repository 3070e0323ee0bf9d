package worker_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	js "github.com/nats-io/nats.go/jetstream"

	"github.com/firkin-dev/firkin-worker/jetstream"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/worker"
)

// TestTemplateBuildReplace: template.build creates its record with a
// compare-and-set; an existing template is replaced only when asked, and a
// continuation snapshot of the same name never.
func TestTemplateBuildReplace(t *testing.T) {
	e := startWorker(t)
	build := func(replace bool) (subjects.SnapshotRecord, error) {
		return e.c.BuildTemplate(e.ctx(5*time.Minute), subjects.BuildTemplateRequest{TemplateID: "web", From: "tiny", Steps: []string{"echo v > /etc/web"}, Replace: replace})
	}
	first, err := build(false)
	if err != nil {
		t.Fatal(err)
	}
	_, err = build(false)
	wantCode(t, "a second build of one template id", err, subjects.CodeConflict)
	second, err := build(true)
	if err != nil || second.Generation == first.Generation {
		t.Fatalf("rebuild with replace: %+v %v", second, err)
	}

	sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
	if _, err := e.c.Snapshot(e.ctx(time.Minute), sb.SandboxID, subjects.SnapshotRequest{Name: "cont1"}); err != nil {
		t.Fatal(err)
	}
	_, err = e.c.BuildTemplate(e.ctx(time.Minute), subjects.BuildTemplateRequest{TemplateID: "cont1", Replace: true})
	wantCode(t, "template.build onto a continuation snapshot", err, subjects.CodeConflict)
	if rec, err := e.c.GetSnapshot(e.ctx(10*time.Second), "cont1"); err != nil || rec.Kind != subjects.KindContinuation {
		t.Fatalf("the continuation snapshot after the refused build: %+v %v", rec, err)
	}
}

// TestSnapshotStopKeepsStateWhenRecordFails: a save with "stop": true
// whose record cannot be stored keeps the snapshot's files and record; the
// next start stores the record and the snapshot restores with the file the
// sandbox wrote. And a snapshot directory without a record (a save killed
// half-way) is gone after the next start.
func TestSnapshotStopKeepsStateWhenRecordFails(t *testing.T) {
	e := startWorker(t)
	sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
	e.exec(sb.SandboxID, "echo kept > /root/state && sync")

	// The snapshot bucket goes away: the save succeeds, its record cannot
	// be stored.
	j, err := js.New(e.workerConn())
	if err != nil {
		t.Fatal(err)
	}
	if err := j.DeleteKeyValue(e.ctx(10*time.Second), jetstream.SnapshotsBucket); err != nil {
		t.Fatal(err)
	}
	_, err = e.c.Snapshot(e.ctx(2*time.Minute), sb.SandboxID, subjects.SnapshotRequest{Name: "saved-then-stopped", Stop: true})
	if err == nil || !strings.Contains(err.Error(), "kept") {
		t.Fatalf("snapshot with its record refused: %v, want an error saying the files are kept", err)
	}
	dirs, _ := filepath.Glob(filepath.Join(e.state, "snapshots", "saved-then-stopped.*", "record.pending.json"))
	if len(dirs) != 1 {
		t.Fatalf("pending records: %v", dirs)
	}
	// A half-written snapshot directory, as a save killed with SIGKILL
	// leaves it.
	half := filepath.Join(e.state, "snapshots", "half-written.abc123")
	if err := os.MkdirAll(half, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(half, "memory"), make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}

	if err := e.stop(); err != nil {
		t.Fatal(err)
	}
	e2 := startWorker(t, func(c *worker.Config) { c.StateDir = e.state })
	rec, err := e2.c.GetSnapshot(e2.ctx(10*time.Second), "saved-then-stopped")
	if err != nil {
		t.Fatalf("the pending record after the restart: %v", err)
	}
	if _, err := os.Stat(half); !os.IsNotExist(err) {
		t.Errorf("half-written snapshot directory after the restart: %v", err)
	}
	restored := e2.create(subjects.CreateSandboxRequest{SnapshotID: rec.SnapshotID})
	if out := e2.exec(restored.SandboxID, "cat /root/state"); out.Stdout != "kept\n" {
		t.Errorf("restored state: %+v", out)
	}
}
