package backend

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/internal/atomicfile"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// Snapshots are durable before their records: every artifact, the
// snapshot's directory and the snapshots directory are synced before the
// record that names them is stored. A record the store refuses after a save
// that stopped its machine is kept beside the artifacts (pendingRecordFile)
// and stored at the next start; every other directory under snapshots/
// without a record (a crashed save, a fetch given up) is removed at start.

// pendingRecordFile holds a signed record that waits to be stored; at
// most maxPendingRecord bytes of it are read.
const (
	pendingRecordFile = "record.pending.json"
	maxPendingRecord  = 1 << 20
)

// syncArtifacts fsyncs the files names of dir (in parallel), then dir and
// its parent.
func syncArtifacts(dir string, names []string) error {
	errs := make([]error, len(names))
	var wg sync.WaitGroup
	for i, n := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f, err := os.Open(filepath.Join(dir, n))
			if err != nil {
				errs[i] = fmt.Errorf("sync %s: %w", n, pathless(err))
				return
			}
			defer f.Close()
			if err := f.Sync(); err != nil {
				errs[i] = fmt.Errorf("sync %s: %w", n, pathless(err))
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if err := atomicfile.SyncDir(dir); err != nil {
		return err
	}
	return atomicfile.SyncDir(filepath.Dir(dir))
}

// keepPending writes a signed record into its snapshot's directory, to be
// stored at the next start.
func (b *Backend) keepPending(rec subjects.SnapshotRecord) error {
	data, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(b.recordDir(rec), pendingRecordFile), data, 0o600)
}

// sweepSnapshots runs at start: a snapshot directory whose record is in the
// store stays; one with a pending record (authenticated, naming this very
// directory) has it stored; anything else is what a crash left half-written
// and is removed.
func (b *Backend) sweepSnapshots(ctx context.Context) error {
	recs, err := b.cfg.Store.ListSnapshots(ctx)
	if err != nil {
		return fmt.Errorf("sweep snapshots: %w", err)
	}
	known := map[string]bool{}
	for _, r := range recs {
		// Only compared with directory names: a forged record can at most
		// keep a directory from being removed.
		known[r.SnapshotID+"."+r.Generation] = true
	}
	root := filepath.Join(b.cfg.StateDir, "snapshots")
	entries, err := os.ReadDir(root)
	if err != nil {
		return fmt.Errorf("sweep snapshots: %w", err)
	}
	var errs []error
	for _, e := range entries {
		if known[e.Name()] {
			continue
		}
		dir := filepath.Join(root, e.Name())
		if strings.HasPrefix(e.Name(), ".fetch-") {
			if info, err := e.Info(); err != nil || time.Since(info.ModTime()) < fetchTempAge {
				continue
			}
		} else if b.recordedNow(ctx, e.Name()) || (e.IsDir() && b.storePending(ctx, dir)) {
			continue
		}
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, err)
			continue
		}
		b.log.Info("removed a snapshot directory without a record (a save or fetch that did not finish)", "dir", e.Name())
	}
	return errors.Join(errs...)
}

// storePending stores the pending record of dir, if it has one that is
// authentic and names dir, and reports whether dir is now a recorded
// snapshot (or must be kept because the store still refuses).
func (b *Backend) storePending(ctx context.Context, dir string) bool {
	f, err := os.Open(filepath.Join(dir, pendingRecordFile))
	if err != nil {
		return false
	}
	data, err := io.ReadAll(io.LimitReader(f, maxPendingRecord+1))
	f.Close()
	var rec subjects.SnapshotRecord
	if err != nil || len(data) > maxPendingRecord || json.Unmarshal(data, &rec) != nil || b.verifyRecord(rec.SnapshotID, rec) != nil || b.recordDir(rec) != dir {
		b.log.Warn("pending snapshot record refused (damaged, forged or not this directory's)", "dir", filepath.Base(dir))
		return false
	}
	err = b.cfg.Store.CreateSnapshot(ctx, rec)
	switch {
	case err == nil:
		_ = os.Remove(filepath.Join(dir, pendingRecordFile))
		b.log.Info("pending snapshot record stored", "snapshot", rec.SnapshotID)
		b.upload(rec)
		return true
	case errors.Is(err, errdefs.ErrConflict):
		b.log.Warn("pending snapshot record not stored: its id was taken meanwhile; the snapshot's files are removed", "snapshot", rec.SnapshotID)
		return false
	default:
		b.log.Warn("pending snapshot record not stored yet; kept for the next start", "snapshot", rec.SnapshotID, "err", err)
		return true
	}
}

// recordedNow reports whether the store holds, at this moment, a record for
// the snapshot directory named name (<sid>.<generation>): one may have been
// stored since the sweep listed them.
func (b *Backend) recordedNow(ctx context.Context, name string) bool {
	i := strings.LastIndexByte(name, '.')
	if i <= 0 {
		return false
	}
	rec, err := b.cfg.Store.GetSnapshot(ctx, name[:i])
	return err == nil && rec.Generation == name[i+1:]
}

// fetchTempAge is how old a fetch's temporary directory must be before the
// sweep removes it (a fetch may run while the worker starts).
const fetchTempAge = time.Hour
