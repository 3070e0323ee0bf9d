package backend

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/firkin-dev/firkin-worker/artifacts"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// Artifacts moves snapshot artifacts between this worker's disk and the
// cluster's object store (package artifacts), so that any worker restores
// any snapshot. Without it snapshots stay on the worker that saved them.
type Artifacts interface {
	// UploadLater uploads a saved snapshot's artifacts in the background.
	UploadLater(set artifacts.Set, dir string)
	// Fetch downloads a snapshot's artifacts into dst (which it creates
	// atomically), checked against set.
	Fetch(ctx context.Context, set artifacts.Set, dst string) error
	// Delete removes a snapshot's objects.
	Delete(ctx context.Context, set artifacts.Set) error
}

// SnapshotWatcher is a Store that follows the snapshot records: fn sees
// every record, then every change (rec nil: deleted); WatchSnapshots
// returns once the records present at the start were delivered.
type SnapshotWatcher interface {
	WatchSnapshots(ctx context.Context, fn func(key string, rec *subjects.SnapshotRecord)) error
}

// ConfigEntry is one cluster setting (see ConfigStore).
type ConfigEntry struct {
	Key      string
	Value    []byte
	Revision uint64 // later writes have higher revisions
	Deleted  bool
}

// ConfigStore is a Store that keeps cluster-wide settings (the warm pool
// targets), so that workers that join later or restart apply them.
type ConfigStore interface {
	PutConfig(ctx context.Context, key string, value []byte) error
	ListConfig(ctx context.Context, filter string) ([]ConfigEntry, error)
	WatchConfig(ctx context.Context, filter string, fn func(ConfigEntry)) error
}

// artifactSet names an authenticated record's artifacts.
func artifactSet(rec subjects.SnapshotRecord) artifacts.Set {
	return artifacts.Set{SnapshotID: rec.SnapshotID, Generation: rec.Generation, Artifacts: rec.Artifacts}
}

// upload sends a saved snapshot's artifacts to the object store in the
// background (the save's reply does not wait for it).
func (b *Backend) upload(rec subjects.SnapshotRecord) {
	if b.cfg.Artifacts != nil {
		b.cfg.Artifacts.UploadLater(artifactSet(rec), b.recordDir(rec))
	}
}

// ensureLocal makes sure an authenticated record's snapshot directory is on
// this worker's disk, fetching it from the object store when it is not.
func (b *Backend) ensureLocal(ctx context.Context, rec subjects.SnapshotRecord) error {
	dir := b.recordDir(rec)
	if _, err := os.Lstat(dir); err == nil {
		return nil
	}
	if b.cfg.Artifacts == nil {
		if rec.WorkerID != "" && rec.WorkerID != b.cfg.WorkerID {
			return errdefs.Wrap(errdefs.ErrUnsupported, fmt.Errorf("snapshot %s lives on worker %s and this worker has no artifact store", rec.SnapshotID, rec.WorkerID))
		}
		return nil // loadSnapshot says what is missing
	}
	t0 := time.Now()
	fctx, stop := b.awaited.add(ctx, rec.SnapshotID, rec.Generation)
	err := b.cfg.Artifacts.Fetch(fctx, artifactSet(rec), dir)
	replaced := fctx.Err() != nil && ctx.Err() == nil
	stop()
	if err != nil && replaced {
		return errdefs.Wrap(errdefs.ErrFailedPrecondition, fmt.Errorf("snapshot %s was replaced or deleted while its artifacts were awaited: try again", rec.SnapshotID))
	}
	if err != nil {
		return err
	}
	// The fetch checked every sha256 while it streamed: loadSnapshot need
	// not hash the files again (it still checks their sizes).
	for _, a := range rec.Artifacts {
		path := filepath.Join(dir, a.Name)
		if st, err := os.Lstat(path); err == nil && st.Mode().IsRegular() && st.Size() == a.SizeBytes {
			verified.Store(verifiedKey(path, st, a.SHA256), struct{}{})
		}
	}
	b.log.Info("snapshot fetched from the object store", "snapshot", rec.SnapshotID, "saved_by", rec.WorkerID, "bytes", rec.SizeBytes, "took", time.Since(t0).Round(time.Millisecond))
	return nil
}

// deleteObjects removes a snapshot's objects from the object store.
func (b *Backend) deleteObjects(ctx context.Context, rec subjects.SnapshotRecord) {
	if b.cfg.Artifacts == nil {
		return
	}
	if err := b.cfg.Artifacts.Delete(ctx, artifactSet(rec)); err != nil {
		b.log.Warn("delete snapshot objects", "snapshot", rec.SnapshotID, "err", err)
	}
}

// localSnapshotDirs returns this worker's snapshot directories of sid, by
// generation. A directory is <sid>.<generation> and a generation has no dot,
// so the name splits at its last dot.
func (b *Backend) localSnapshotDirs(sid string) map[string]string {
	out := map[string]string{}
	root := filepath.Join(b.cfg.StateDir, "snapshots")
	ents, err := os.ReadDir(root)
	if err != nil {
		return out
	}
	for _, e := range ents {
		i := strings.LastIndexByte(e.Name(), '.')
		if i <= 0 || e.Name()[:i] != sid || !generationPattern.MatchString(e.Name()[i+1:]) {
			continue
		}
		out[e.Name()[i+1:]] = filepath.Join(root, e.Name())
	}
	return out
}

// dropCached removes this worker's copies of a deleted snapshot.
func (b *Backend) dropCached(sid string) {
	if subjects.ValidateSnapshotName(sid) != nil {
		return
	}
	for _, dir := range b.localSnapshotDirs(sid) {
		if err := os.RemoveAll(dir); err != nil {
			b.log.Warn("remove cached snapshot", "snapshot", sid, "err", err)
		}
	}
}

// startCluster keeps this worker in step with the cluster: the template
// registry follows the template records in the snapshots bucket, copies of
// deleted snapshots are dropped, pool targets follow the config bucket, and
// local snapshots whose objects are missing are uploaded again.
func (b *Backend) startCluster(ctx context.Context) error {
	var errs []error
	if w, ok := b.cfg.Store.(SnapshotWatcher); ok {
		var mu sync.Mutex
		seen := map[string]bool{} // the records present at the start
		initial := true
		err := w.WatchSnapshots(b.ctx, func(key string, rec *subjects.SnapshotRecord) {
			mu.Lock()
			if initial && rec != nil {
				seen[key] = true
			}
			mu.Unlock()
			b.snapshotChanged(key, rec)
		})
		mu.Lock()
		initial = false
		mu.Unlock()
		if err != nil {
			errs = append(errs, err)
		} else {
			// The local registry is a cache of the bucket's template records.
			for _, id := range b.templates.ids() {
				if !seen[id] {
					b.log.Warn("template left out: its record is not in the snapshots bucket", "template", id)
					b.templates.remove(id)
				}
			}
		}
	}
	if err := b.watchPoolTargets(); err != nil {
		errs = append(errs, err)
	}
	if b.cfg.Artifacts != nil {
		if err := artifacts.RemoveStale(filepath.Join(b.cfg.StateDir, "snapshots")); err != nil {
			b.log.Warn("remove unfinished fetches", "err", err)
		}
		b.reupload(ctx)
	}
	return errors.Join(errs...)
}

// reupload queues an upload of every snapshot this worker has on disk
// (uploads skip objects already there).
func (b *Backend) reupload(ctx context.Context) {
	snaps, err := b.listSnapshots(ctx)
	if err != nil {
		b.log.Warn("list snapshots to upload", "err", err)
		return
	}
	for _, rec := range snaps {
		if _, err := os.Lstat(b.recordDir(rec)); err == nil {
			b.upload(rec)
		}
	}
}

// snapshotChanged follows one change of the snapshots bucket (rec nil: key
// was deleted). Template records that authenticate enter the registry;
// others are logged and ignored.
func (b *Backend) snapshotChanged(key string, rec *subjects.SnapshotRecord) {
	gen := ""
	if rec != nil {
		gen = rec.Generation
	}
	b.awaited.changed(key, gen)
	if rec == nil {
		if cur, ok := b.templates.get(key); ok && cur.SnapshotID == key {
			b.templates.remove(key)
			b.pool.Drain(key)
		}
		b.dropCached(key)
		return
	}
	if rec.Kind != subjects.KindTemplate || rec.TemplateID != key || rec.Driver != b.cfg.Driver.Name() {
		return
	}
	if subjects.ValidateTemplateID(key) != nil {
		return
	}
	if err := b.verifyRecord(key, *rec); err != nil {
		b.log.Warn("template record ignored", "template", key, "err", err)
		return
	}
	if cur, ok := b.templates.get(key); ok && cur.Generation == rec.Generation {
		return
	}
	old, had, err := b.templates.put(key, *rec)
	if err != nil {
		b.log.Warn("record template", "template", key, "err", err)
		return
	}
	b.log.Info("template record from the cluster", "template", key, "generation", rec.Generation, "saved_by", rec.WorkerID)
	b.pool.Drain(key)
	b.pool.SetTarget(key, b.pool.Target(key)) // a fill that failed for want of it starts again now
	if had && old.Generation != rec.Generation {
		b.retire(old, false) // this worker's copy; the objects are the replacing worker's to delete
	}
}

// baseDigests caches baseDigest by path, size and modification time.
var baseDigests sync.Map // string -> string

// baseDigest identifies the contents of an image's base disk: sha256 over
// its size and each data extent (offset, length, bytes), so a sparse 1 GiB
// disk with a few MiB of data is read in milliseconds. Two workers that
// built their images apart have different base disks even at the same path
// (mkfs makes a random UUID); a snapshot layered on one is corrupt on the
// other. A file system without SEEK_DATA is read whole.
func baseDigest(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("base disk: %w", pathless(err))
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("base disk: %w", pathless(err))
	}
	key := fmt.Sprintf("%s|%d|%d", path, st.Size(), st.ModTime().UnixNano())
	if d, ok := baseDigests.Load(key); ok {
		return d.(string), nil
	}
	h := sha256.New()
	fmt.Fprintf(h, "size %d\n", st.Size())
	var pos int64
	for pos < st.Size() {
		start, err := f.Seek(pos, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole is left
		}
		if err != nil {
			start = pos // no SEEK_DATA here: the rest is data
		}
		end, err := f.Seek(start, unix.SEEK_HOLE)
		if err != nil || end <= start {
			end = st.Size()
		}
		fmt.Fprintf(h, "extent %d %d\n", start, end-start)
		if _, err := f.Seek(start, io.SeekStart); err != nil {
			return "", fmt.Errorf("base disk: %w", pathless(err))
		}
		if _, err := io.CopyN(h, f, end-start); err != nil {
			return "", fmt.Errorf("base disk: %w", pathless(err))
		}
		pos = end
	}
	d := "v1:" + hex.EncodeToString(h.Sum(nil))
	baseDigests.Store(key, d)
	return d, nil
}

// baseImage is the image a snapshot's disk layers go on: its own for a
// snapshot of this worker; for one saved by another worker, this worker's
// image whose base disk has the same name (root disks are named after their
// inputs and built reproducibly, so workers that built their images apart
// have the same disk under their own state directories) and the same
// contents (baseDigest). A snapshot on a base disk this worker does not have
// is unsupported.
func (b *Backend) baseImage(rec subjects.SnapshotRecord, meta snapshotMeta) (vmpool.Image, error) {
	if rec.WorkerID == "" || rec.WorkerID == b.cfg.WorkerID || meta.Image.RootDisk == "" {
		return meta.Image, nil
	}
	for _, img := range b.cfg.Images {
		if img.Arch != meta.Image.Arch || filepath.Base(img.RootDisk) != filepath.Base(meta.Image.RootDisk) {
			continue
		}
		if meta.BaseDisk == "" {
			if img.RootDisk == meta.Image.RootDisk {
				return img, nil // saved before base disks were identified
			}
			continue
		}
		d, err := baseDigest(img.RootDisk)
		if err != nil {
			return vmpool.Image{}, err
		}
		if d == meta.BaseDisk {
			return img, nil
		}
		return vmpool.Image{}, errdefs.Wrap(errdefs.ErrUnsupported, fmt.Errorf("snapshot %s is layered on another build of the base disk %s than this worker's (its guest image was built from other inputs or by an older builder)", rec.SnapshotID, filepath.Base(img.RootDisk)))
	}
	return vmpool.Image{}, errdefs.Wrap(errdefs.ErrUnsupported, fmt.Errorf("snapshot %s is layered on base disk %s, which this worker does not have (workers that share snapshots need guest images built from the same inputs)", rec.SnapshotID, filepath.Base(meta.Image.RootDisk)))
}

// awaitedRecords are the fetches in progress per snapshot id, each for one
// generation: a fetch waiting for an upload that a replaced or deleted
// record's worker will never finish gives up at once instead of after the
// artifact store's wait.
type awaitedRecords struct {
	mu sync.Mutex
	m  map[string]map[*awaited]struct{}
}

type awaited struct {
	generation string
	cancel     context.CancelFunc
}

// add returns a context that ends when ctx does or when the record of sid
// stops being generation; call stop when the fetch is done.
func (a *awaitedRecords) add(ctx context.Context, sid, generation string) (context.Context, func()) {
	ctx, cancel := context.WithCancel(ctx)
	w := &awaited{generation: generation, cancel: cancel}
	a.mu.Lock()
	if a.m == nil {
		a.m = map[string]map[*awaited]struct{}{}
	}
	if a.m[sid] == nil {
		a.m[sid] = map[*awaited]struct{}{}
	}
	a.m[sid][w] = struct{}{}
	a.mu.Unlock()
	return ctx, func() {
		a.mu.Lock()
		delete(a.m[sid], w)
		if len(a.m[sid]) == 0 {
			delete(a.m, sid)
		}
		a.mu.Unlock()
		cancel()
	}
}

// changed ends the fetches of sid for another generation than generation
// ("" : the record was deleted).
func (a *awaitedRecords) changed(sid, generation string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for w := range a.m[sid] {
		if w.generation != generation {
			w.cancel()
		}
	}
}
