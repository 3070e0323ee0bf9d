// Package artifacts moves snapshot artifacts between a worker's disk and the
// JetStream object store bucket firkin_artifacts, so that any worker of a
// cluster can restore a snapshot another one saved.
//
// Objects are named <snapshot id>/<generation>/<artifact name>, each part
// validated (a snapshot name, a generation of [a-z0-9]{1,32}, a plain file
// name). The object store chunks an object and keeps its own digest; a fetch
// does not rely on it: it checks every artifact's size and sha256 against
// the list it is given (the artifacts of a signed snapshot record) while it
// streams, writes into a temporary directory beside the destination, syncs,
// and renames the directory into place only when every artifact matched.
// Concurrent fetches of one snapshot share one download; an object not yet
// uploaded (the saving worker uploads in the background) is waited for with
// bounded backoff.
package artifacts

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/klauspost/compress/s2"
	"github.com/nats-io/nats.go"
	js "github.com/nats-io/nats.go/jetstream"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/internal/lowprio"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// Bucket is the object store bucket of snapshot artifacts (stream
// OBJ_firkin_artifacts). Only workers use it.
const Bucket = "firkin_artifacts"

// chunkSize is the size of an object's chunks: fewer messages than the
// default 128 KiB for guest memory and disks, within a server's default
// 1 MiB max payload.
const chunkSize = 512 << 10

// maxArtifacts bounds the artifacts of one set (as snapshot records do).
const maxArtifacts = 256

// generationPattern is a snapshot generation (see backend).
var generationPattern = regexp.MustCompile(`^[a-z0-9]{1,32}$`)

// Config configures a Store.
type Config struct {
	// Replicas of the bucket in a cluster (default 1).
	Replicas int
	// UploadConcurrency bounds background uploads (default 1: an upload
	// costs CPU on the worker's host, where its machines run).
	UploadConcurrency int
	// WaitMax is how long a fetch waits for an object that is not uploaded
	// yet before it gives up (default 2 minutes).
	WaitMax time.Duration
	// StallAfter gives up waiting for an object early when nothing at all
	// was written to the bucket for this long (default 20 s): no upload is
	// running, so the worker that saved the snapshot is gone or its upload
	// failed.
	StallAfter time.Duration
	// GetTimeout bounds the download of one artifact (default 10 minutes).
	GetTimeout time.Duration
	Logger     *slog.Logger
}

// Set names the artifacts of one snapshot: its id, its generation and the
// artifacts (name, size, sha256) of its authenticated record.
type Set struct {
	SnapshotID string
	Generation string
	Artifacts  []subjects.Artifact
}

// Store is a worker's handle on the artifacts bucket. It is safe for
// concurrent use.
type Store struct {
	cfg Config
	obs js.ObjectStore
	log *slog.Logger

	ctx    context.Context // background uploads and shared downloads
	cancel context.CancelFunc
	wg     sync.WaitGroup
	sem    chan struct{}

	mu        sync.Mutex
	fetches   map[string]*call // by destination directory
	uploading map[string]bool  // by snapshot id/generation

	// downloaded is called once per artifact a fetch downloads (tests).
	downloaded func(name string)
}

type call struct {
	done chan struct{}
	err  error
}

// Open creates or updates the bucket and returns a Store.
func Open(ctx context.Context, j js.JetStream, cfg Config) (*Store, error) {
	if cfg.Replicas == 0 {
		cfg.Replicas = 1
	}
	if cfg.UploadConcurrency <= 0 {
		cfg.UploadConcurrency = 1
	}
	if cfg.WaitMax <= 0 {
		cfg.WaitMax = 2 * time.Minute
	}
	if cfg.StallAfter <= 0 {
		cfg.StallAfter = 20 * time.Second
	}
	if cfg.GetTimeout <= 0 {
		cfg.GetTimeout = 10 * time.Minute
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	obs, err := j.CreateOrUpdateObjectStore(ctx, js.ObjectStoreConfig{
		Bucket:      Bucket,
		Description: "firkin snapshot artifacts (workers only)",
		Replicas:    cfg.Replicas,
		// Guest memory files are mostly zero pages.
		Compression: true,
	})
	if err != nil {
		return nil, fmt.Errorf("artifacts: bucket %s: %w", Bucket, err)
	}
	bctx, cancel := context.WithCancel(context.Background())
	return &Store{cfg: cfg, obs: obs, log: cfg.Logger, ctx: bctx, cancel: cancel,
		sem: make(chan struct{}, cfg.UploadConcurrency), fetches: map[string]*call{}, uploading: map[string]bool{}}, nil
}

// Close stops background uploads and waits for them.
func (s *Store) Close() {
	s.cancel()
	s.wg.Wait()
}

// ObjectName is the object of one artifact: <snapshot id>/<generation>/<name>.
func ObjectName(snapshotID, generation, name string) (string, error) {
	if err := subjects.ValidateSnapshotName(snapshotID); err != nil {
		return "", err
	}
	if !generationPattern.MatchString(generation) {
		return "", errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("snapshot %s: bad generation", snapshotID))
	}
	if !plainFileName(name) {
		return "", errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("snapshot %s: artifact name %q is not a file name", snapshotID, name))
	}
	return snapshotID + "/" + generation + "/" + name, nil
}

// plainFileName reports whether name is one file name.
func plainFileName(name string) bool {
	return name != "" && name != "." && name != ".." && !strings.ContainsAny(name, `/\`) && len(name) <= 255
}

// validate checks a set and returns its object names, in artifact order.
func (set Set) validate() ([]string, error) {
	if len(set.Artifacts) == 0 || len(set.Artifacts) > maxArtifacts {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("snapshot %s: %d artifacts: want 1..%d", set.SnapshotID, len(set.Artifacts), maxArtifacts))
	}
	names := make([]string, len(set.Artifacts))
	seen := map[string]bool{}
	for i, a := range set.Artifacts {
		n, err := ObjectName(set.SnapshotID, set.Generation, a.Name)
		if err != nil {
			return nil, err
		}
		if seen[a.Name] {
			return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("snapshot %s: artifact %s listed twice", set.SnapshotID, a.Name))
		}
		if a.SizeBytes < 0 || len(a.SHA256) != sha256.Size*2 {
			return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("snapshot %s: artifact %s: bad size or digest", set.SnapshotID, a.Name))
		}
		seen[a.Name] = true
		names[i] = n
	}
	return names, nil
}

// objectDigest is the object store's digest of a hex sha256.
func objectDigest(hexSum string) string {
	sum, err := hex.DecodeString(hexSum)
	if err != nil {
		return ""
	}
	return "SHA-256=" + base64.URLEncoding.EncodeToString(sum)
}

// Upload puts the artifacts of set, read from dir, into the bucket. An
// object already there with the artifact's size and digest is left alone. A
// local file whose size or sha256 no longer matches the set is not uploaded
// (ErrIntegrity).
func (s *Store) Upload(ctx context.Context, set Set, dir string) error {
	names, err := set.validate()
	if err != nil {
		return err
	}
	for i, a := range set.Artifacts {
		if info, err := s.obs.GetInfo(ctx, names[i]); err == nil && holds(info, a) {
			continue
		}
		if err := s.put(ctx, names[i], filepath.Join(dir, a.Name), a); err != nil {
			return fmt.Errorf("upload snapshot %s: %w", set.SnapshotID, err)
		}
	}
	return nil
}

// Objects are s2-compressed (github.com/klauspost/compress/s2, the
// compression nats-server itself uses): guest memory files are mostly zero
// pages, so a 256 MiB template uploads as a few MiB. The headers say so and
// name the uncompressed file's size and sha256; the object store's own
// digest covers the compressed bytes, and a fetch checks the uncompressed
// ones against the signed record. Objects without the header (stored before
// compression) are read as they are.
const (
	encodingHeader = "Firkin-Encoding"
	encodingS2     = "s2"
	sizeHeader     = "Firkin-Size"
	sha256Header   = "Firkin-Sha256"
)

// holds reports whether an object already holds artifact a.
func holds(info *js.ObjectInfo, a subjects.Artifact) bool {
	if info.Headers.Get(encodingHeader) == encodingS2 {
		return info.Headers.Get(sizeHeader) == strconv.FormatInt(a.SizeBytes, 10) && info.Headers.Get(sha256Header) == a.SHA256
	}
	return info.Size == uint64(a.SizeBytes) && info.Digest == objectDigest(a.SHA256)
}

// put uploads one file, compressed, checking it against a while it is read.
func (s *Store) put(ctx context.Context, name, path string, a subjects.Artifact) error {
	// With a deadline, the object store waits for its chunks' acks until
	// then; without one it gives each ack the JetStream default of 5 s,
	// which a replicated stream on a loaded cluster misses, and then
	// retries chunks (nats.go v1.55.0 races its reused chunk buffer there).
	ctx, cancel := context.WithTimeout(ctx, s.cfg.GetTimeout)
	defer cancel()
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("artifact %s: %w", a.Name, pathless(err))
	}
	defer f.Close()
	h := sha256.New()
	cr := &checkedReader{r: io.TeeReader(io.LimitReader(f, a.SizeBytes+1), h), h: h, want: a}
	pr, pw := io.Pipe()
	go func() {
		// Reading, hashing and compressing a snapshot yields to the work
		// requests wait for (the next save's migration, guests).
		defer lowprio.Thread()()
		zw := s2.NewWriter(pw, s2.WriterConcurrency(1))
		_, err := io.Copy(zw, cr)
		if cerr := zw.Close(); err == nil {
			err = cerr
		}
		pw.CloseWithError(err)
	}()
	defer pr.Close()
	meta := js.ObjectMeta{Name: name, Opts: &js.ObjectMetaOptions{ChunkSize: chunkSize}, Headers: nats.Header{
		encodingHeader: {encodingS2}, sizeHeader: {strconv.FormatInt(a.SizeBytes, 10)}, sha256Header: {a.SHA256},
	}}
	if _, err := s.obs.Put(ctx, meta, pr); err != nil {
		if cr.err != nil {
			_ = s.obs.Delete(context.WithoutCancel(ctx), name)
			return cr.err
		}
		return fmt.Errorf("artifact %s: %w", a.Name, err)
	}
	if cr.err != nil {
		_ = s.obs.Delete(context.WithoutCancel(ctx), name)
		return cr.err
	}
	return nil
}

// checkedReader fails at EOF when what was read is not the artifact.
type checkedReader struct {
	r    io.Reader
	h    interface{ Sum([]byte) []byte }
	n    int64
	want subjects.Artifact
	err  error
}

func (c *checkedReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	if c.n > c.want.SizeBytes {
		c.err = errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("artifact %s is larger than its record says: not uploaded", c.want.Name))
		return n, c.err
	}
	if err == io.EOF {
		if c.n != c.want.SizeBytes {
			c.err = errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("artifact %s is %d bytes, its record says %d: not uploaded", c.want.Name, c.n, c.want.SizeBytes))
			return n, c.err
		}
		if hex.EncodeToString(c.h.Sum(nil)) != c.want.SHA256 {
			c.err = errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("artifact %s does not match the sha256 in its record: not uploaded", c.want.Name))
			return n, c.err
		}
	}
	return n, err
}

// UploadLater uploads set from dir in the background, at most
// UploadConcurrency at once; a failure is logged. A set already being
// uploaded is not queued twice.
func (s *Store) UploadLater(set Set, dir string) {
	key := set.SnapshotID + "/" + set.Generation
	s.mu.Lock()
	if s.uploading[key] || s.ctx.Err() != nil {
		s.mu.Unlock()
		return
	}
	s.uploading[key] = true
	s.wg.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.wg.Done()
		defer func() {
			s.mu.Lock()
			delete(s.uploading, key)
			s.mu.Unlock()
		}()
		select {
		case s.sem <- struct{}{}:
		case <-s.ctx.Done():
			return
		}
		defer func() { <-s.sem }()
		t0 := time.Now()
		// A loaded cluster may time out an upload (acks of a replicated
		// stream): retry a few times before giving up until the next start.
		bo := backoff.WithContext(backoff.WithMaxRetries(backoff.NewExponentialBackOff(
			backoff.WithInitialInterval(2*time.Second), backoff.WithMaxInterval(30*time.Second)), 4), s.ctx)
		err := backoff.Retry(func() error {
			err := s.Upload(s.ctx, set, dir)
			if errors.Is(err, errdefs.ErrIntegrity) || errors.Is(err, errdefs.ErrInvalidArgument) || errors.Is(err, fs.ErrNotExist) {
				return backoff.Permanent(err)
			}
			if err != nil && s.ctx.Err() == nil {
				s.log.Info("snapshot upload failed; retrying", "snapshot", set.SnapshotID, "err", err)
			}
			return err
		}, bo)
		if errors.Is(err, fs.ErrNotExist) {
			// Deleted before its turn came (a pause snapshot once its
			// sandbox resumed, say): nothing to upload.
			s.log.Debug("snapshot gone before its upload", "snapshot", set.SnapshotID, "err", err)
			return
		}
		if err != nil {
			if s.ctx.Err() == nil {
				s.log.Warn("snapshot artifacts not uploaded; other workers cannot restore it until they are", "snapshot", set.SnapshotID, "err", err)
			}
			return
		}
		s.log.Info("snapshot artifacts uploaded", "snapshot", set.SnapshotID, "generation", set.Generation, "took", time.Since(t0).Round(time.Millisecond))
	}()
}

// Delete removes the objects of set (those absent are no error).
func (s *Store) Delete(ctx context.Context, set Set) error {
	names, err := set.validate()
	if err != nil {
		return err
	}
	var errs []error
	for _, n := range names {
		if err := s.obs.Delete(ctx, n); err != nil && !errors.Is(err, js.ErrObjectNotFound) {
			errs = append(errs, fmt.Errorf("delete object %s: %w", n, err))
		}
	}
	return errors.Join(errs...)
}

// Fetch downloads the artifacts of set into the directory dst, which must
// not exist yet (an existing dst is taken as already fetched). Each
// artifact's size and sha256 are checked against set while it streams; the
// files go into a temporary directory beside dst (0700, files 0600) that is
// synced and renamed to dst only once all of them matched. Concurrent
// fetches of one dst share one download; ctx bounds only this caller's wait.
// An object not uploaded yet is waited for up to WaitMax, then the fetch
// fails with errdefs.ErrTimeout; a mismatch fails with errdefs.ErrIntegrity.
func (s *Store) Fetch(ctx context.Context, set Set, dst string) error {
	if _, err := set.validate(); err != nil {
		return err
	}
	if !filepath.IsAbs(dst) {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("fetch snapshot %s: destination is not absolute", set.SnapshotID))
	}
	s.mu.Lock()
	c, ok := s.fetches[dst]
	if !ok {
		c = &call{done: make(chan struct{})}
		s.fetches[dst] = c
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			c.err = s.fetch(s.ctx, set, dst)
			s.mu.Lock()
			delete(s.fetches, dst)
			s.mu.Unlock()
			close(c.done)
		}()
	}
	s.mu.Unlock()
	select {
	case <-c.done:
		return c.err
	case <-ctx.Done():
		return errdefs.Wrap(errdefs.ErrTimeout, fmt.Errorf("fetch snapshot %s: %w", set.SnapshotID, ctx.Err()))
	}
}

func (s *Store) fetch(ctx context.Context, set Set, dst string) (err error) {
	if _, err := os.Lstat(dst); err == nil {
		return nil
	}
	names, err := set.validate()
	if err != nil {
		return err
	}
	t0 := time.Now()
	tmp, err := os.MkdirTemp(filepath.Dir(dst), ".fetch-"+filepath.Base(dst)+"-")
	if err != nil {
		return fmt.Errorf("fetch snapshot %s: %w", set.SnapshotID, err)
	}
	defer func() {
		if err != nil {
			_ = os.RemoveAll(tmp)
		}
	}()
	deadline := time.Now().Add(s.cfg.WaitMax)
	var total int64
	for i, a := range set.Artifacts {
		if err := s.waitObject(ctx, set.SnapshotID, names[i], a.Name, deadline); err != nil {
			return err
		}
		// A download that stalls (the object was replaced by a retried
		// upload, whose new chunks these are not) starts over, twice.
		var gerr error
		for attempt := 0; attempt < 3; attempt++ {
			_ = os.Remove(filepath.Join(tmp, a.Name))
			if gerr = s.get(ctx, names[i], filepath.Join(tmp, a.Name), a); !errors.Is(gerr, errStalled) {
				break
			}
			s.log.Info("snapshot download stalled; starting it again", "snapshot", set.SnapshotID, "artifact", a.Name)
		}
		if gerr != nil {
			return fmt.Errorf("fetch snapshot %s: %w", set.SnapshotID, gerr)
		}
		total += a.SizeBytes
		if s.downloaded != nil {
			s.downloaded(a.Name)
		}
	}
	if err := syncDir(tmp); err != nil {
		return fmt.Errorf("fetch snapshot %s: %w", set.SnapshotID, err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		if _, serr := os.Lstat(dst); serr == nil {
			_ = os.RemoveAll(tmp)
			return nil // made meanwhile (by a save or another process)
		}
		return fmt.Errorf("fetch snapshot %s: %w", set.SnapshotID, pathless(err))
	}
	if err := syncDir(filepath.Dir(dst)); err != nil {
		s.log.Warn("sync snapshots dir", "err", err)
	}
	s.log.Info("snapshot artifacts fetched", "snapshot", set.SnapshotID, "generation", set.Generation, "bytes", total, "took", time.Since(t0).Round(time.Millisecond))
	return nil
}

// waitObject waits, with backoff, until object name exists or deadline.
func (s *Store) waitObject(ctx context.Context, sid, name, artifact string, deadline time.Time) error {
	bo := backoff.NewExponentialBackOff(backoff.WithInitialInterval(100*time.Millisecond), backoff.WithMaxInterval(5*time.Second), backoff.WithMaxElapsedTime(0))
	logged := false
	start := time.Now()
	for {
		_, err := s.obs.GetInfo(ctx, name)
		if err == nil {
			return nil
		}
		if !errors.Is(err, js.ErrObjectNotFound) {
			s.log.Debug("object info", "object", name, "err", err)
		}
		if time.Since(start) >= s.cfg.StallAfter && s.idleFor(ctx) >= s.cfg.StallAfter {
			return errdefs.Wrap(errdefs.ErrTimeout, fmt.Errorf("snapshot %s: artifact %s is not in the object store and no upload is running (nothing written for %s: the worker that saved it is gone or its upload failed)", sid, artifact, s.cfg.StallAfter))
		}
		wait := bo.NextBackOff()
		if time.Until(deadline) < wait {
			return errdefs.Wrap(errdefs.ErrTimeout, fmt.Errorf("snapshot %s: artifact %s is not in the object store (waited %s; the worker that saved it may not have uploaded it yet, or is gone)", sid, artifact, s.cfg.WaitMax))
		}
		if !logged {
			s.log.Info("waiting for a snapshot artifact to be uploaded", "snapshot", sid, "artifact", artifact)
			logged = true
		}
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// idleFor is how long ago anything was last written to the bucket (0 when
// that cannot be told).
func (s *Store) idleFor(ctx context.Context) time.Duration {
	st, err := s.obs.Status(ctx)
	if err != nil {
		return 0
	}
	bs, ok := st.(*js.ObjectBucketStatus)
	if !ok || bs.StreamInfo() == nil {
		return 0
	}
	last := bs.StreamInfo().State.LastTime
	if last.IsZero() {
		return time.Since(time.Time{})
	}
	return time.Since(last)
}

// errStalled ends a download that received nothing for StallAfter.
var errStalled = errors.New("download stalled")

// get streams object name into a new file at path, checking its size and
// sha256 against a. Runs of zero bytes become holes (guest memory files are
// mostly zero).
func (s *Store) get(ctx context.Context, name, path string, a subjects.Artifact) (err error) {
	// Without a deadline of its own a Get ends after the client's default
	// JetStream timeout (5 s), whatever the object's size.
	ctx, cancel := context.WithTimeout(ctx, s.cfg.GetTimeout)
	defer cancel()
	// A download that receives nothing for StallAfter is given up
	// (errStalled) rather than waited on until GetTimeout.
	ctx, stall := context.WithCancelCause(ctx)
	defer stall(nil)
	progress := make(chan struct{}, 1)
	go func() {
		for {
			select {
			case <-progress:
			case <-time.After(s.cfg.StallAfter):
				stall(errStalled)
				return
			case <-ctx.Done():
				return
			}
		}
	}()
	defer func() {
		if context.Cause(ctx) == errStalled {
			err = errdefs.Wrap(errdefs.ErrTimeout, fmt.Errorf("artifact %s: %w", a.Name, errStalled))
		}
	}()
	res, err := s.obs.Get(ctx, name)
	if err != nil {
		return fmt.Errorf("artifact %s: %w", a.Name, err)
	}
	defer res.Close()
	var src io.Reader = res
	if info, err := res.Info(); err == nil && info.Headers.Get(encodingHeader) == encodingS2 {
		src = s2.NewReader(res, s2.ReaderMaxBlockSize(4<<20))
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("artifact %s: %w", a.Name, pathless(err))
	}
	defer func() {
		if cerr := f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("artifact %s: %w", a.Name, pathless(cerr))
		}
	}()
	h := sha256.New()
	buf := make([]byte, 256<<10)
	var n int64
	for {
		k, rerr := src.Read(buf)
		select {
		case progress <- struct{}{}:
		default:
		}
		if k > 0 {
			n += int64(k)
			if n > a.SizeBytes {
				return errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("artifact %s in the object store is larger than its record says: refusing it", a.Name))
			}
			h.Write(buf[:k])
			if isZero(buf[:k]) {
				_, err = f.Seek(int64(k), io.SeekCurrent)
			} else {
				_, err = f.Write(buf[:k])
			}
			if err != nil {
				return fmt.Errorf("artifact %s: %w", a.Name, pathless(err))
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			if errors.Is(rerr, js.ErrDigestMismatch) || errors.Is(rerr, s2.ErrCorrupt) || errors.Is(rerr, s2.ErrUnsupported) || errors.Is(rerr, s2.ErrTooLarge) {
				return errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("artifact %s in the object store is corrupt: refusing it", a.Name))
			}
			return fmt.Errorf("artifact %s: %w", a.Name, rerr)
		}
	}
	if n != a.SizeBytes {
		return errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("artifact %s in the object store is %d bytes, its record says %d: refusing it", a.Name, n, a.SizeBytes))
	}
	if hex.EncodeToString(h.Sum(nil)) != a.SHA256 {
		return errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("artifact %s in the object store does not match the sha256 in its record: refusing it", a.Name))
	}
	if err := f.Truncate(n); err != nil {
		return fmt.Errorf("artifact %s: %w", a.Name, pathless(err))
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("artifact %s: %w", a.Name, pathless(err))
	}
	return nil
}

var zeroPage = make([]byte, 4096)

// isZero reports whether b holds only zero bytes.
func isZero(b []byte) bool {
	for len(b) > 0 {
		k := min(len(b), len(zeroPage))
		if !bytes.Equal(b[:k], zeroPage[:k]) {
			return false
		}
		b = b[k:]
	}
	return true
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return pathless(err)
	}
	defer d.Close()
	return pathless(d.Sync())
}

// pathless drops the path of an *os.PathError, keeping its cause.
func pathless(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// RemoveStale removes leftovers of fetches that did not finish (a crash)
// from dir, the directory fetches write into.
func RemoveStale(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".fetch-") {
			errs = append(errs, os.RemoveAll(filepath.Join(dir, e.Name())))
		}
	}
	return errors.Join(errs...)
}
