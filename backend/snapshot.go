package backend

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// snapshotMetaFile is the driver's description of a snapshot, kept beside its
// artifacts (and covered by the record's integrity data).
const snapshotMetaFile = "snapshot.json"

// snapshotMeta is snapshotMetaFile: the driver's description and the
// identity of the base disk the snapshot's disk is layered on (baseDigest),
// which a restore on another worker checks.
type snapshotMeta struct {
	vmpool.Snapshot
	BaseDisk string `json:"base_disk,omitempty"`
}

// Snapshot saves a sandbox as a continuation or template snapshot. The disk
// is frozen at the moment of the save; the sandbox goes on running (on a new
// overlay) unless the request says to stop it.
func (b *Backend) Snapshot(ctx context.Context, id string, req subjects.SnapshotRequest) (subjects.SnapshotRecord, error) {
	kind := req.Kind
	switch kind {
	case "":
		kind = subjects.KindContinuation
	case subjects.KindContinuation, subjects.KindTemplate:
	default:
		return subjects.SnapshotRecord{}, invalid("kind %q: want continuation or template", req.Kind)
	}
	sid := req.Name
	if sid == "" {
		sid = id + "-" + NewID(6)
	}
	if err := subjects.ValidateSnapshotName(sid); err != nil {
		return subjects.SnapshotRecord{}, err
	}
	if probe := (subjects.SnapshotRecord{SnapshotID: sid, SourceSandboxID: id, Kind: subjects.KindContinuation}); isForkSnapshot(probe) || strings.HasPrefix(sid, pauseSnapshotPrefix(id)) {
		// Names the worker gives its intermediate snapshots, which it
		// deletes once unused.
		return subjects.SnapshotRecord{}, invalid("snapshot name %q: %s-pause-…, -fork-… and -forkmem-… are the worker's own", sid, id)
	}
	if kind == subjects.KindTemplate {
		if err := subjects.ValidateTemplateID(sid); err != nil {
			return subjects.SnapshotRecord{}, fmt.Errorf("a template snapshot's name is its template id: %w", err)
		}
	}
	s, err := b.lookup(id)
	if err != nil {
		return subjects.SnapshotRecord{}, err
	}
	if _, err := b.cfg.Store.GetSnapshot(ctx, sid); err == nil {
		return subjects.SnapshotRecord{}, errdefs.Wrap(errdefs.ErrConflict, fmt.Errorf("snapshot %s already exists", sid))
	}
	meta := subjects.TemplateMetadata{Envs: map[string]string{}}
	if req.TemplateMetadata != nil {
		meta = *req.TemplateMetadata
		if meta.Envs == nil {
			meta.Envs = map[string]string{}
		}
	}
	src := s.record()
	t0 := time.Now()
	rec, err := b.save(ctx, s, sid, vmpool.SaveOptions{Kind: vmpool.SnapshotKind(kind), Stop: req.Stop}, meta)
	if err != nil {
		return rec, err
	}
	tSaved := time.Now()
	if kind == subjects.KindTemplate {
		rec.TemplateID = sid
	}
	if rec, err = b.signRecord(rec); err != nil {
		_ = os.RemoveAll(b.recordDir(rec))
		return subjects.SnapshotRecord{}, err
	}
	if err := b.cfg.Store.CreateSnapshot(ctx, rec); err != nil {
		if req.Stop && !errors.Is(err, errdefs.ErrConflict) {
			// The machine is stopped: its state is in these files alone.
			// Keep them, with the record, for the next start.
			if perr := b.keepPending(rec); perr == nil {
				if eerr := b.end(ctx, id, subjects.EventKilled, "stopped after snapshot "+sid+" (record pending)"); eerr != nil && !errors.Is(eerr, errdefs.ErrNotFound) {
					b.log.Warn("stop sandbox after snapshot", "sandbox", id, "err", eerr)
				}
				return subjects.SnapshotRecord{}, fmt.Errorf("snapshot %s was saved and its machine stopped, but its record could not be stored; the snapshot's files and record are kept on worker %s and stored when it next starts: %w", sid, b.cfg.WorkerID, err)
			}
		}
		_ = os.RemoveAll(b.recordDir(rec))
		return subjects.SnapshotRecord{}, err
	}
	b.upload(rec)
	if kind == subjects.KindTemplate {
		if _, _, err := b.templates.put(sid, rec); err != nil {
			b.log.Warn("record template", "template", sid, "err", err)
		}
		b.pool.Drain(sid)
	}
	b.systemLog(ctx, id, fmt.Sprintf("%s snapshot %s saved (%d bytes)", kind, sid, rec.SizeBytes))
	b.event(ctx, subjects.EventSnapshotted, id, sid)
	if req.Stop {
		if err := b.end(ctx, id, subjects.EventKilled, "stopped after snapshot "+sid); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			b.log.Warn("stop sandbox after snapshot", "sandbox", id, "err", err)
		}
	} else {
		s.mu.Lock()
		s.rec.DiskParent, s.rec.DiskParentLocation = sid, b.recordDir(rec)
		updated := s.rec
		s.mu.Unlock()
		if err := b.putSession(ctx, updated); err != nil {
			b.log.Warn("update session after snapshot", "sandbox", id, "err", err)
		}
	}
	b.log.Info("snapshot saved", "sandbox", id, "snapshot", sid, "kind", kind, "source_disk_parent", src.DiskParent,
		"save", tSaved.Sub(t0).Round(time.Microsecond), "total", time.Since(t0).Round(time.Microsecond))
	return rec, nil
}

// save runs the driver's Save into a new snapshot directory and describes
// the result as a record (not yet stored).
func (b *Backend) save(ctx context.Context, s *session, sid string, opts vmpool.SaveOptions, meta subjects.TemplateMetadata) (subjects.SnapshotRecord, error) {
	saver, ok := b.cfg.Driver.(vmpool.Saver)
	if !ok {
		return subjects.SnapshotRecord{}, errdefs.Wrap(errdefs.ErrUnsupported, fmt.Errorf("driver %s cannot save snapshots", b.cfg.Driver.Name()))
	}
	if err := b.checkDisk(); err != nil {
		return subjects.SnapshotRecord{}, err
	}
	gen := NewID(6)
	dir := b.snapshotDir(sid, gen)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return subjects.SnapshotRecord{}, fmt.Errorf("snapshot dir: %w", err)
	}
	src := s.record()
	tStart := time.Now()
	snap, err := saver.Save(ctx, s.mach(), dir, opts)
	if err != nil {
		err = b.diskError(dir, err) // measured before the partial files go
		_ = os.RemoveAll(dir)
		return subjects.SnapshotRecord{}, fmt.Errorf("save sandbox %s: %w", src.SandboxID, err)
	}
	snap.Dir = dir
	tDriver := time.Now()
	rec, err := b.describe(snap, sid, gen, src, opts.Kind, meta)
	b.log.Debug("snapshot described", "snapshot", sid, "driver", tDriver.Sub(tStart).Round(time.Microsecond), "describe", time.Since(tDriver).Round(time.Microsecond))
	if err != nil {
		err = b.diskError(dir, err)
		_ = os.RemoveAll(dir)
		return subjects.SnapshotRecord{}, err
	}
	return rec, nil
}

// describe writes the snapshot's metadata file and builds its record with
// the size and sha256 of every artifact.
func (b *Backend) describe(snap vmpool.Snapshot, sid, gen string, src subjects.Sandbox, kind vmpool.SnapshotKind, meta subjects.TemplateMetadata) (subjects.SnapshotRecord, error) {
	desc := snapshotMeta{Snapshot: snap}
	if snap.Image.RootDisk != "" {
		d, err := baseDigest(snap.Image.RootDisk)
		if err != nil {
			return subjects.SnapshotRecord{}, err
		}
		desc.BaseDisk = d
	}
	data, err := json.MarshalIndent(desc, "", "  ")
	if err != nil {
		return subjects.SnapshotRecord{}, fmt.Errorf("encode snapshot metadata: %w", err)
	}
	if err := os.WriteFile(filepath.Join(snap.Dir, snapshotMetaFile), data, 0o600); err != nil {
		return subjects.SnapshotRecord{}, fmt.Errorf("write snapshot metadata: %w", err)
	}
	names := append(append([]string(nil), snap.Artifacts...), snapshotMetaFile)
	for _, n := range names {
		if !plainFileName(n) {
			return subjects.SnapshotRecord{}, fmt.Errorf("driver named snapshot artifact %q: not a file name", n)
		}
	}
	arts, total, sum, err := hashArtifacts(snap.Dir, names, snap.Digests)
	if err != nil {
		return subjects.SnapshotRecord{}, err
	}
	if err := syncArtifacts(snap.Dir, names); err != nil {
		return subjects.SnapshotRecord{}, fmt.Errorf("snapshot %s: %w", sid, err)
	}
	return subjects.SnapshotRecord{
		SnapshotID:        sid,
		SourceSandboxID:   src.SandboxID,
		Names:             []string{sid},
		Location:          snap.Dir,
		StagingDir:        src.Dir,
		MachineIdentifier: snap.MachineIdentifier,
		NetworkMACs:       snap.NetworkMACs,
		TemplateMetadata:  meta,
		Kind:              string(kind),
		CreatedAt:         time.Now().UTC(),
		SizeBytes:         total,
		SHA256:            sum,
		WorkerID:          b.cfg.WorkerID,
		Driver:            b.cfg.Driver.Name(),
		TemplateID:        src.TemplateID,
		Parent:            src.DiskParent,
		ParentLocation:    src.DiskParentLocation,
		Format:            snap.Format,
		Resources:         subjects.Resources{VCPUs: snap.Resources.VCPUs, MemoryMB: snap.Resources.MemoryMB},
		Artifacts:         arts,
		Generation:        gen,
	}, nil
}

// hashArtifacts returns each file's size and sha256, their total size, and
// one sha256 over the list (name, size, digest) that stands for the snapshot.
// known holds digests the driver computed while writing (not read again);
// files hashed before (hard links of kernels and disk layers) come from
// digestCache. Every artifact is then marked verified, so a restore on this
// worker does not read it again either.
func hashArtifacts(dir string, names []string, known map[string]vmpool.Digest) ([]subjects.Artifact, int64, string, error) {
	arts := make([]subjects.Artifact, len(names))
	errs := make([]error, len(names))
	var wg sync.WaitGroup
	for i, name := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			path := filepath.Join(dir, name)
			st, sum, err := digestOf(path, known[name])
			if err != nil {
				errs[i] = err
				return
			}
			arts[i] = subjects.Artifact{Name: name, SizeBytes: st.Size(), SHA256: sum}
			verified.Store(verifiedKey(path, st, sum), struct{}{})
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, 0, "", fmt.Errorf("hash snapshot artifacts: %w", err)
	}
	var total int64
	all := sha256.New()
	for _, a := range arts {
		total += a.SizeBytes
		fmt.Fprintf(all, "%s %d %s\n", a.Name, a.SizeBytes, a.SHA256)
	}
	return arts, total, hex.EncodeToString(all.Sum(nil)), nil
}

// digestOf returns the file's stat and sha256: known when the caller has
// it (and the file is still the size it was hashed at), else from
// digestCache, else read and hashed (and cached).
func digestOf(path string, known vmpool.Digest) (fs.FileInfo, string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, "", fmt.Errorf("open %s: %w", filepath.Base(path), pathless(err))
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, "", fmt.Errorf("stat %s: %w", filepath.Base(path), pathless(err))
	}
	key, keyed := inodeKeyOf(st)
	if known.SHA256 != "" && known.Size == st.Size() {
		if keyed {
			cacheDigest(key, known.SHA256)
		}
		return st, known.SHA256, nil
	}
	if keyed {
		if sum, ok := digestCache.Load(key); ok {
			return st, sum.(string), nil
		}
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return nil, "", fmt.Errorf("read %s: %w", filepath.Base(path), pathless(err))
	}
	sum := hex.EncodeToString(h.Sum(nil))
	if keyed {
		cacheDigest(key, sum)
	}
	return st, sum, nil
}

// inodeKey names a file's contents as long as nobody rewrote it: a rewrite
// changes its size or modification time. Hard links share it.
type inodeKey struct {
	dev, ino    uint64
	size, mtime int64
}

func inodeKeyOf(st fs.FileInfo) (inodeKey, bool) {
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return inodeKey{}, false
	}
	return inodeKey{dev: uint64(sys.Dev), ino: uint64(sys.Ino), size: st.Size(), mtime: st.ModTime().UnixNano()}, true
}

// digestCache holds sha256s of snapshot files by inodeKey (at most
// maxCachedDigests; emptied when full).
var (
	digestCache   sync.Map // inodeKey -> string
	cachedDigests atomic.Int64
)

const maxCachedDigests = 4096

func cacheDigest(key inodeKey, sum string) {
	if _, loaded := digestCache.LoadOrStore(key, sum); loaded {
		return
	}
	if cachedDigests.Add(1) > maxCachedDigests {
		digestCache.Clear()
		cachedDigests.Store(0)
	}
}

// verified remembers artifacts whose sha256 matched, by path, size and
// modification time, so a snapshot is hashed once per process rather than on
// every restore. Sizes are checked on every restore.
var verified sync.Map // string -> struct{}

// verifiedKey is the key of a file in verified.
func verifiedKey(path string, st fs.FileInfo, sum string) string {
	return fmt.Sprintf("%s|%d|%d|%s", path, st.Size(), st.ModTime().UnixNano(), sum)
}

// pathless drops the path of an *fs.PathError, keeping its cause.
func pathless(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// loadSnapshot checks an authenticated record's artifacts, in the
// snapshot's derived directory, against their sizes and digests and returns
// the driver's description of the snapshot. Its errors name artifacts by
// name only: no path, no digest.
func (b *Backend) loadSnapshot(rec subjects.SnapshotRecord) (vmpool.Snapshot, error) {
	if err := b.verifyRecord(rec.SnapshotID, rec); err != nil {
		return vmpool.Snapshot{}, err
	}
	if len(rec.Artifacts) == 0 {
		return vmpool.Snapshot{}, errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("snapshot %s has no artifacts in its record", rec.SnapshotID))
	}
	dir := b.recordDir(rec)
	for _, a := range rec.Artifacts {
		path := filepath.Join(dir, a.Name)
		st, err := os.Lstat(path)
		if err != nil {
			return vmpool.Snapshot{}, errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("snapshot %s: artifact %s: %w", rec.SnapshotID, a.Name, pathless(err)))
		}
		if !st.Mode().IsRegular() {
			return vmpool.Snapshot{}, errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("snapshot %s: artifact %s is not a regular file: refusing to restore", rec.SnapshotID, a.Name))
		}
		if st.Size() != a.SizeBytes {
			return vmpool.Snapshot{}, errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("snapshot %s: artifact %s is %d bytes, its record says %d: refusing to restore", rec.SnapshotID, a.Name, st.Size(), a.SizeBytes))
		}
		key := verifiedKey(path, st, a.SHA256)
		if _, ok := verified.Load(key); ok {
			continue
		}
		_, sum, err := digestOf(path, vmpool.Digest{})
		if err != nil {
			return vmpool.Snapshot{}, errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("snapshot %s: %w", rec.SnapshotID, err))
		}
		if sum != a.SHA256 {
			return vmpool.Snapshot{}, errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("snapshot %s: artifact %s does not match the sha256 in its record: refusing to restore", rec.SnapshotID, a.Name))
		}
		verified.Store(key, struct{}{})
	}
	data, err := os.ReadFile(filepath.Join(dir, snapshotMetaFile))
	if err != nil {
		return vmpool.Snapshot{}, errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("snapshot %s: %s: %w", rec.SnapshotID, snapshotMetaFile, pathless(err)))
	}
	var desc snapshotMeta
	if err := json.Unmarshal(data, &desc); err != nil {
		return vmpool.Snapshot{}, errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("snapshot %s: metadata: %w", rec.SnapshotID, err))
	}
	img, err := b.baseImage(rec, desc)
	if err != nil {
		return vmpool.Snapshot{}, err
	}
	snap := desc.Snapshot
	snap.Image.RootDisk = img.RootDisk
	snap.Dir = dir
	return snap, nil
}

// backgroundKey marks a context whose restore is a warm pool fill.
type backgroundKey struct{}

// inBackground marks ctx: machines restored with it start with a small
// CPU share (vmpool.RestoreSpec.Background).
func inBackground(ctx context.Context) context.Context {
	return context.WithValue(ctx, backgroundKey{}, true)
}

func isBackground(ctx context.Context) bool {
	bg, _ := ctx.Value(backgroundKey{}).(bool)
	return bg
}

// restore starts a machine from a snapshot record.
func (b *Backend) restore(ctx context.Context, id, dir string, rec subjects.SnapshotRecord, network, snapshotReady bool) (vmpool.Machine, error) {
	r, ok := b.cfg.Driver.(vmpool.Restorer)
	if !ok {
		return nil, errdefs.Wrap(errdefs.ErrUnsupported, fmt.Errorf("driver %s cannot restore snapshots", b.cfg.Driver.Name()))
	}
	if err := b.verifyRecord(rec.SnapshotID, rec); err != nil {
		return nil, err
	}
	if err := b.ensureLocal(ctx, rec); err != nil {
		return nil, err
	}
	snap, err := b.loadSnapshot(rec)
	if err != nil {
		return nil, err
	}
	m, err := r.Restore(ctx, vmpool.RestoreSpec{ID: id, Dir: dir, Snapshot: snap, Network: network, SnapshotReady: snapshotReady,
		Background: isBackground(ctx)})
	if err != nil {
		// The driver removed the machine's directory: measure its parent.
		return nil, b.diskError(filepath.Dir(dir), err)
	}
	return m, nil
}

// diskError classes err, a failed save or restore that wrote under dir, as
// disk_pressure when the file system ran out of space: ENOSPC, or less
// free space under dir than the floor (MinFreeDiskBytes) at the moment of
// the failure (a QEMU migration's error carries no errno). The cause's
// text is kept but not its class: a full disk is what the caller must
// hear, whatever step it broke.
func (b *Backend) diskError(dir string, err error) error {
	if errors.Is(err, context.Canceled) {
		return err
	}
	// The driver may have seen ENOSPC itself (and classed it, but as a
	// step's failure a class that CodeOf would name first).
	full := errors.Is(err, errdefs.ErrDiskPressure) || errors.Is(err, unix.ENOSPC)
	var st unix.Statfs_t
	if !full && unix.Statfs(dir, &st) == nil {
		full = st.Bavail*uint64(st.Bsize) < b.cfg.MinFreeDiskBytes
	}
	if !full {
		return err
	}
	b.log.Warn("save or restore failed on a full disk", "dir", filepath.Base(dir), "err", err)
	return errdefs.Wrap(errdefs.ErrDiskPressure, fmt.Errorf("the file system under the state directory is full: %v", err))
}

// GetSnapshot returns a snapshot record once it is authenticated.
func (b *Backend) GetSnapshot(ctx context.Context, sid string) (subjects.SnapshotRecord, error) {
	return b.getSnapshot(ctx, sid)
}

// ListSnapshots returns every authenticated snapshot record.
func (b *Backend) ListSnapshots(ctx context.Context) ([]subjects.SnapshotRecord, error) {
	return b.listSnapshots(ctx)
}

// DeleteSnapshot deletes a snapshot and its artifacts (this worker's copy
// and the objects in the artifact store). A snapshot that others depend on
// anywhere in the cluster — a warm pool target (cluster-wide or of any
// worker), a sandbox whose disk sits on it, another snapshot whose frozen
// disk is layered on it — is refused with conflict. A
// record that fails authentication is refused; one written before records
// were authenticated (no mac) is removed from the bucket, and no file is
// touched.
func (b *Backend) DeleteSnapshot(ctx context.Context, sid string) (subjects.DeleteSnapshotReply, error) {
	rec, err := b.getSnapshot(ctx, sid)
	unsigned := errors.Is(err, errUnsigned)
	if err != nil && !unsigned {
		return subjects.DeleteSnapshotReply{}, err
	}
	if users, err := b.snapshotUsers(ctx, sid); err != nil {
		return subjects.DeleteSnapshotReply{}, err
	} else if len(users) > 0 {
		return subjects.DeleteSnapshotReply{}, errdefs.Wrap(errdefs.ErrConflict, fmt.Errorf("snapshot %s is in use by %v", sid, users))
	}
	if err := b.cfg.Store.DeleteSnapshot(ctx, sid); err != nil {
		return subjects.DeleteSnapshotReply{}, err
	}
	if unsigned {
		b.log.Warn("unsigned snapshot record deleted; its files, if any, are left in place", "snapshot", sid)
		return subjects.DeleteSnapshotReply{SnapshotID: sid, Deleted: true}, nil
	}
	if cur, ok := b.templates.get(sid); ok && cur.Generation == rec.Generation {
		b.templates.remove(sid)
	}
	// This worker's copy (its own, or one it fetched); the other workers
	// drop theirs when they see the record deleted.
	if err := os.RemoveAll(b.recordDir(rec)); err != nil {
		b.log.Warn("remove snapshot artifacts", "snapshot", sid, "err", err)
	}
	b.deleteObjects(ctx, rec)
	return subjects.DeleteSnapshotReply{SnapshotID: sid, Deleted: true}, nil
}

// snapshotUsers lists what depends on snapshot sid.
func (b *Backend) snapshotUsers(ctx context.Context, sid string) ([]string, error) {
	var users []string
	if b.pool.Target(sid) > 0 {
		users = append(users, "warm pool of worker "+b.cfg.WorkerID)
	}
	pools, err := b.poolTargetUsers(ctx, sid)
	if err != nil {
		return nil, err
	}
	users = append(users, pools...)
	sessions, err := b.cfg.Store.ListSessions(ctx)
	if err != nil {
		return nil, err
	}
	for _, s := range sessions {
		if s.DiskParent == sid || s.SnapshotID == sid {
			users = append(users, "sandbox "+s.SandboxID)
		}
	}
	snaps, err := b.listSnapshots(ctx)
	if err != nil {
		return nil, err
	}
	for _, r := range snaps {
		if r.Parent == sid && r.SnapshotID != sid {
			users = append(users, "snapshot "+r.SnapshotID)
		}
	}
	return users, nil
}
