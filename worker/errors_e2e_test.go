package worker_test

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/backend"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/worker"
)

// TestErrorCodes provokes the runtime's failure codes through NATS against
// the real runtime: a full worker, a machine that dies under an exec, a
// snapshot the disk cannot take, and a disk below its floor. Each failure
// is an error reply with its code, and none loses what it should not.
func TestErrorCodes(t *testing.T) {
	e := startWorker(t, func(c *worker.Config) { c.Limits = backend.Limits{MaxSessions: 2} })

	t.Run("capacity_rejected", func(t *testing.T) {
		a := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
		b := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
		_, err := e.c.Create(e.ctx(time.Minute), subjects.CreateSandboxRequest{TemplateID: "tiny"})
		wantCode(t, "third create on a worker of two", err, subjects.CodeCapacityRejected)
		for _, id := range []string{a.SandboxID, b.SandboxID} {
			if out := e.exec(id, "echo alive"); out.Stdout != "alive\n" {
				t.Errorf("%s after the refusal: %+v", id, out)
			}
			if err := e.c.Kill(e.ctx(time.Minute), id); err != nil {
				t.Fatal(err)
			}
		}
	})

	t.Run("runtime_failed", func(t *testing.T) {
		sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
		// The snapshot directory is not a directory any more: saving fails
		// on the host, and the sandbox goes on running.
		snaps := filepath.Join(e.state, "snapshots")
		moved := snaps + ".moved"
		if err := os.Rename(snaps, moved); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(snaps, []byte("not a directory"), 0o600); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = os.Remove(snaps); _ = os.Rename(moved, snaps) })
		_, err := e.c.Snapshot(e.ctx(time.Minute), sb.SandboxID, subjects.SnapshotRequest{Name: "cannot-save"})
		wantCode(t, "snapshot into a broken state dir", err, subjects.CodeRuntimeFailed)
		if out := e.exec(sb.SandboxID, "echo alive"); out.Stdout != "alive\n" {
			t.Errorf("sandbox after the failed snapshot: %+v", out)
		}
	})

	t.Run("protocol_failure", func(t *testing.T) {
		sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
		procs := qemuProcesses(filepath.Join(e.state, "sandboxes", sb.SandboxID))
		if len(procs) != 1 {
			t.Fatalf("QEMU processes of %s: %q", sb.SandboxID, procs)
		}
		pid, err := strconv.Atoi(strings.TrimSuffix(strings.Fields(procs[0])[0], ":"))
		if err != nil {
			t.Fatal(err)
		}
		errc := make(chan error, 1)
		go func() {
			_, err := e.c.Exec(e.ctx(time.Minute), sb.SandboxID, subjects.ExecRequest{Command: "sleep 30"})
			errc <- err
		}()
		time.Sleep(500 * time.Millisecond) // the command is running
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-errc:
			wantCode(t, "exec whose machine died", err, subjects.CodeProtocolFailure)
		case <-time.After(30 * time.Second):
			t.Fatal("exec not answered 30 s after its machine died")
		}
		eventually(t, 30*time.Second, "the dead sandbox is gone", func() error {
			_, err := e.c.Get(e.ctx(10*time.Second), sb.SandboxID)
			if subjects.CodeOf(err) != subjects.CodeSandboxNotFound {
				return err
			}
			return nil
		})
	})

	t.Run("disk_pressure", func(t *testing.T) {
		full := startWorker(t, func(c *worker.Config) { c.MinFreeDiskBytes = 1 << 60 })
		_, err := full.c.Create(full.ctx(time.Minute), subjects.CreateSandboxRequest{TemplateID: "tiny"})
		wantCode(t, "create below the disk floor", err, subjects.CodeDiskPressure)
	})
}
