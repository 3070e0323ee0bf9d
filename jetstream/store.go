// Package jetstream keeps the worker's durable state in NATS JetStream: the
// FIRKIN_LOGS stream of log events, the FIRKIN_EVENTS stream of lifecycle
// events, and the firkin_sessions and firkin_snapshots KV buckets. Set-up is
// idempotent, so every worker of a cluster runs it at start.
package jetstream

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	js "github.com/nats-io/nats.go/jetstream"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/jobs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// Stream and bucket names.
const (
	LogStream       = "FIRKIN_LOGS"
	EventStream     = "FIRKIN_EVENTS"
	SessionsBucket  = "firkin_sessions"
	SnapshotsBucket = "firkin_snapshots"
	// ConfigBucket holds cluster-wide settings, such as warm pool targets
	// (keys pool.<template id> and pool.<template id>.<worker id>).
	ConfigBucket = "firkin_config"
)

// ReadableStreams are the streams clients may read (the embedded server's
// client permissions): the log and event streams, the streams behind the
// KV buckets (job results included: package jobs' firkin_results) and the
// dead-lettered jobs (FIRKIN_JOBS_DEAD), and the cluster settings
// (firkin_config). Never the work queue FIRKIN_JOBS, nor the snapshot
// artifacts' object store (workers only).
func ReadableStreams() []string {
	return []string{LogStream, EventStream, "KV_" + SessionsBucket, "KV_" + SnapshotsBucket, "KV_" + jobs.ResultsBucket, jobs.DeadStream, "KV_" + ConfigBucket, MetricsStream}
}

// Config bounds the retention of the streams.
type Config struct {
	Subjects subjects.Subjects
	// LogMaxAge drops log events older than this (default 24h).
	LogMaxAge time.Duration
	// LogMaxBytes bounds the log stream (default 1 GiB).
	LogMaxBytes int64
	// LogMaxMsgsPerSubject bounds the events kept per sandbox (default 100000).
	LogMaxMsgsPerSubject int64
	// Replicas for streams and buckets in a cluster (default 1).
	Replicas int
}

// Store is the worker's handle on its streams and buckets.
type Store struct {
	subj      subjects.Subjects
	js        js.JetStream
	nc        *nats.Conn
	sessions  js.KeyValue
	snapshots js.KeyValue
	config    js.KeyValue
}

// Open creates or updates the streams and buckets and returns a Store.
func Open(ctx context.Context, nc *nats.Conn, cfg Config) (*Store, error) {
	if cfg.Subjects.Prefix == "" {
		cfg.Subjects = subjects.Default
	}
	if cfg.LogMaxAge == 0 {
		cfg.LogMaxAge = 24 * time.Hour
	}
	if cfg.LogMaxBytes == 0 {
		cfg.LogMaxBytes = 1 << 30
	}
	if cfg.LogMaxMsgsPerSubject == 0 {
		cfg.LogMaxMsgsPerSubject = 100_000
	}
	if cfg.Replicas == 0 {
		cfg.Replicas = 1
	}
	j, err := js.New(nc)
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	if _, err := j.CreateOrUpdateStream(ctx, js.StreamConfig{
		Name:              LogStream,
		Description:       "firkin sandbox and build log events",
		Subjects:          []string{cfg.Subjects.LogsAll()},
		MaxAge:            cfg.LogMaxAge,
		MaxBytes:          cfg.LogMaxBytes,
		MaxMsgsPerSubject: cfg.LogMaxMsgsPerSubject,
		MaxMsgSize:        1 << 20,
		Discard:           js.DiscardOld,
		Replicas:          cfg.Replicas,
	}); err != nil {
		return nil, fmt.Errorf("jetstream: stream %s: %w", LogStream, err)
	}
	if _, err := j.CreateOrUpdateStream(ctx, js.StreamConfig{
		Name:        EventStream,
		Description: "firkin sandbox lifecycle events",
		Subjects:    []string{cfg.Subjects.EventsAll()},
		MaxAge:      cfg.LogMaxAge,
		MaxMsgs:     100_000,
		Discard:     js.DiscardOld,
		Replicas:    cfg.Replicas,
	}); err != nil {
		return nil, fmt.Errorf("jetstream: stream %s: %w", EventStream, err)
	}
	if err := openMetricsStream(ctx, j, cfg); err != nil {
		return nil, err
	}
	s := &Store{subj: cfg.Subjects, js: j, nc: nc}
	if s.sessions, err = j.CreateOrUpdateKeyValue(ctx, js.KeyValueConfig{Bucket: SessionsBucket, Description: "active firkin sandboxes", Replicas: cfg.Replicas}); err != nil {
		return nil, fmt.Errorf("jetstream: bucket %s: %w", SessionsBucket, err)
	}
	if s.snapshots, err = j.CreateOrUpdateKeyValue(ctx, js.KeyValueConfig{Bucket: SnapshotsBucket, Description: "firkin snapshot records", Replicas: cfg.Replicas}); err != nil {
		return nil, fmt.Errorf("jetstream: bucket %s: %w", SnapshotsBucket, err)
	}
	if s.config, err = j.CreateOrUpdateKeyValue(ctx, js.KeyValueConfig{Bucket: ConfigBucket, Description: "firkin cluster settings", Replicas: cfg.Replicas}); err != nil {
		return nil, fmt.Errorf("jetstream: bucket %s: %w", ConfigBucket, err)
	}
	return s, nil
}

// PutSession stores a sandbox's session record.
func (s *Store) PutSession(ctx context.Context, sb subjects.Sandbox) error {
	return putJSON(ctx, s.sessions, sb.SandboxID, sb)
}

// DeleteSession removes a sandbox's session record (no error when absent).
func (s *Store) DeleteSession(ctx context.Context, id string) error {
	if err := s.sessions.Delete(ctx, id); err != nil && !errors.Is(err, js.ErrKeyNotFound) {
		return fmt.Errorf("delete session %s: %w", id, err)
	}
	return nil
}

// GetSession returns a sandbox's session record; errdefs.ErrNotFound if absent.
func (s *Store) GetSession(ctx context.Context, id string) (subjects.Sandbox, error) {
	var sb subjects.Sandbox
	err := getJSON(ctx, s.sessions, id, &sb)
	if errors.Is(err, errdefs.ErrNotFound) {
		return sb, errdefs.Wrap(errdefs.ErrNotFound, fmt.Errorf("sandbox %s not found", id))
	}
	return sb, err
}

// ListSessions returns every session record of the cluster.
func (s *Store) ListSessions(ctx context.Context) ([]subjects.Sandbox, error) {
	return listJSON[subjects.Sandbox](ctx, s.sessions)
}

// CreateSession stores a session record only if its id has none (a claim);
// errdefs.ErrConflict when it has. It returns the record's revision.
func (s *Store) CreateSession(ctx context.Context, sb subjects.Sandbox) (uint64, error) {
	data, err := json.Marshal(sb)
	if err != nil {
		return 0, fmt.Errorf("encode session %s: %w", sb.SandboxID, err)
	}
	rev, err := s.sessions.Create(ctx, sb.SandboxID, data)
	if errors.Is(err, js.ErrKeyExists) {
		return 0, errdefs.Wrap(errdefs.ErrConflict, fmt.Errorf("sandbox %s already exists", sb.SandboxID))
	}
	if err != nil {
		return 0, fmt.Errorf("create session %s: %w", sb.SandboxID, err)
	}
	return rev, nil
}

// GetSessionEntry returns a session record with its revision;
// errdefs.ErrNotFound if absent.
func (s *Store) GetSessionEntry(ctx context.Context, id string) (subjects.Sandbox, uint64, error) {
	var sb subjects.Sandbox
	e, err := s.sessions.Get(ctx, id)
	if errors.Is(err, js.ErrKeyNotFound) {
		return sb, 0, errdefs.Wrap(errdefs.ErrNotFound, fmt.Errorf("sandbox %s not found", id))
	}
	if err != nil {
		return sb, 0, fmt.Errorf("get session %s: %w", id, err)
	}
	if len(e.Value()) > maxSessionBytes {
		return sb, 0, errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("session %s: record of %d bytes", id, len(e.Value())))
	}
	if err := json.Unmarshal(e.Value(), &sb); err != nil {
		return sb, 0, errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("decode session %s: %w", id, err))
	}
	return sb, e.Revision(), nil
}

// UpdateSession replaces a session record only if it is still at revision
// rev (compare-and-set); errdefs.ErrConflict when it changed. It returns the
// new revision.
func (s *Store) UpdateSession(ctx context.Context, sb subjects.Sandbox, rev uint64) (uint64, error) {
	data, err := json.Marshal(sb)
	if err != nil {
		return 0, fmt.Errorf("encode session %s: %w", sb.SandboxID, err)
	}
	n, err := s.sessions.Update(ctx, sb.SandboxID, data, rev)
	if err != nil {
		if isWrongRevision(err) {
			return 0, errdefs.Wrap(errdefs.ErrConflict, fmt.Errorf("sandbox %s: record changed meanwhile", sb.SandboxID))
		}
		return 0, fmt.Errorf("update session %s: %w", sb.SandboxID, err)
	}
	return n, nil
}

// DeleteSessionAt removes a session record only if it is still at revision
// rev; errdefs.ErrConflict when it changed.
func (s *Store) DeleteSessionAt(ctx context.Context, id string, rev uint64) error {
	if err := s.sessions.Delete(ctx, id, js.LastRevision(rev)); err != nil {
		if isWrongRevision(err) {
			return errdefs.Wrap(errdefs.ErrConflict, fmt.Errorf("sandbox %s: record changed meanwhile", id))
		}
		return fmt.Errorf("delete session %s: %w", id, err)
	}
	return nil
}

// maxSessionBytes bounds a session record read back (records are written
// by workers, but the bucket is not trusted).
const maxSessionBytes = 64 << 10

// isWrongRevision reports a compare-and-set that lost: the key's last
// revision was not the expected one (or it exists, for a create).
func isWrongRevision(err error) bool {
	var apiErr *js.APIError
	return errors.Is(err, js.ErrKeyExists) || errors.Is(err, js.ErrKeyRevisionMismatch) ||
		errors.As(err, &apiErr) && (apiErr.ErrorCode == js.JSErrCodeStreamWrongLastSequence ||
			apiErr.ErrorCode == js.JSErrCodeStreamWrongLastSequenceConstant)
}

// CreateSnapshot stores a new snapshot record; errdefs.ErrConflict when the
// id is taken.
func (s *Store) CreateSnapshot(ctx context.Context, rec subjects.SnapshotRecord) error {
	data, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("encode snapshot %s: %w", rec.SnapshotID, err)
	}
	if _, err := s.snapshots.Create(ctx, rec.SnapshotID, data); err != nil {
		if errors.Is(err, js.ErrKeyExists) {
			return errdefs.Wrap(errdefs.ErrConflict, fmt.Errorf("snapshot %s already exists", rec.SnapshotID))
		}
		return fmt.Errorf("store snapshot %s: %w", rec.SnapshotID, err)
	}
	return nil
}

// GetSnapshotRevision returns a snapshot record and its revision (the
// compare-and-set token of ReplaceSnapshot); subjects.ErrSnapshotNotFound
// if absent.
func (s *Store) GetSnapshotRevision(ctx context.Context, id string) (subjects.SnapshotRecord, uint64, error) {
	var rec subjects.SnapshotRecord
	e, err := s.snapshots.Get(ctx, id)
	if errors.Is(err, js.ErrKeyNotFound) {
		return rec, 0, fmt.Errorf("%w: %s", subjects.ErrSnapshotNotFound, id)
	}
	if err != nil {
		return rec, 0, fmt.Errorf("get snapshot %s: %w", id, err)
	}
	if err := json.Unmarshal(e.Value(), &rec); err != nil {
		return rec, 0, fmt.Errorf("decode snapshot %s: %w", id, err)
	}
	return rec, e.Revision(), nil
}

// ReplaceSnapshot replaces a snapshot record if it is still at revision
// rev; errdefs.ErrConflict when it changed (or was deleted) meanwhile.
func (s *Store) ReplaceSnapshot(ctx context.Context, rec subjects.SnapshotRecord, rev uint64) error {
	data, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("encode snapshot %s: %w", rec.SnapshotID, err)
	}
	if _, err := s.snapshots.Update(ctx, rec.SnapshotID, data, rev); err != nil {
		if isWrongRevision(err) || errors.Is(err, js.ErrKeyNotFound) {
			return errdefs.Wrap(errdefs.ErrConflict, fmt.Errorf("snapshot %s changed while it was rebuilt", rec.SnapshotID))
		}
		return fmt.Errorf("store snapshot %s: %w", rec.SnapshotID, err)
	}
	return nil
}

// GetSnapshot returns a snapshot record; subjects.ErrSnapshotNotFound if absent.
func (s *Store) GetSnapshot(ctx context.Context, id string) (subjects.SnapshotRecord, error) {
	var rec subjects.SnapshotRecord
	err := getJSON(ctx, s.snapshots, id, &rec)
	if errors.Is(err, errdefs.ErrNotFound) {
		return rec, fmt.Errorf("%w: %s", subjects.ErrSnapshotNotFound, id)
	}
	return rec, err
}

// DeleteSnapshot removes a snapshot record (no error when absent).
func (s *Store) DeleteSnapshot(ctx context.Context, id string) error {
	if err := s.snapshots.Delete(ctx, id); err != nil && !errors.Is(err, js.ErrKeyNotFound) {
		return fmt.Errorf("delete snapshot %s: %w", id, err)
	}
	return nil
}

// ListSnapshots returns every snapshot record.
func (s *Store) ListSnapshots(ctx context.Context) ([]subjects.SnapshotRecord, error) {
	return listJSON[subjects.SnapshotRecord](ctx, s.snapshots)
}

func putJSON(ctx context.Context, kv js.KeyValue, key string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s/%s: %w", kv.Bucket(), key, err)
	}
	if _, err := kv.Put(ctx, key, data); err != nil {
		return fmt.Errorf("put %s/%s: %w", kv.Bucket(), key, err)
	}
	return nil
}

func getJSON(ctx context.Context, kv js.KeyValue, key string, v any) error {
	e, err := kv.Get(ctx, key)
	if errors.Is(err, js.ErrKeyNotFound) {
		return errdefs.ErrNotFound
	}
	if err != nil {
		return fmt.Errorf("get %s/%s: %w", kv.Bucket(), key, err)
	}
	if err := json.Unmarshal(e.Value(), v); err != nil {
		return fmt.Errorf("decode %s/%s: %w", kv.Bucket(), key, err)
	}
	return nil
}

func listJSON[T any](ctx context.Context, kv js.KeyValue) ([]T, error) {
	lister, err := kv.ListKeys(ctx)
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", kv.Bucket(), err)
	}
	defer lister.Stop()
	out := []T{}
	for key := range lister.Keys() {
		var v T
		err := getJSON(ctx, kv, key, &v)
		if errors.Is(err, errdefs.ErrNotFound) {
			continue // deleted meanwhile
		}
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, nil
}

// JetStream is the JetStream context of the store's connection (the
// artifacts object store is opened on it).
func (s *Store) JetStream() js.JetStream { return s.js }

// WatchSnapshots calls fn for every snapshot record, then for every change
// (rec nil: the record of key was deleted), in the bucket's order, from one
// goroutine until ctx ends. It returns once the records present at the
// start were delivered. A value that does not decode is passed as a record
// with only its id (it fails authentication).
func (s *Store) WatchSnapshots(ctx context.Context, fn func(key string, rec *subjects.SnapshotRecord)) error {
	w, err := s.snapshots.WatchAll(ctx)
	if err != nil {
		return fmt.Errorf("watch %s: %w", SnapshotsBucket, err)
	}
	return watchLoop(ctx, w, func(e js.KeyValueEntry) {
		if e.Operation() != js.KeyValuePut {
			fn(e.Key(), nil)
			return
		}
		var rec subjects.SnapshotRecord
		if json.Unmarshal(e.Value(), &rec) != nil {
			rec = subjects.SnapshotRecord{SnapshotID: e.Key()}
		}
		fn(e.Key(), &rec)
	})
}

// ConfigEntry is one cluster setting: its key, value and revision (later
// writes have higher revisions).
type ConfigEntry struct {
	Key      string
	Value    []byte
	Revision uint64
	Deleted  bool
}

// PutConfig stores a cluster setting.
func (s *Store) PutConfig(ctx context.Context, key string, value []byte) error {
	if _, err := s.config.Put(ctx, key, value); err != nil {
		return fmt.Errorf("put %s/%s: %w", ConfigBucket, key, err)
	}
	return nil
}

// ListConfig returns the settings whose keys match the NATS subject
// pattern filter (e.g. "pool.>").
func (s *Store) ListConfig(ctx context.Context, filter string) ([]ConfigEntry, error) {
	w, err := s.config.Watch(ctx, filter, js.IgnoreDeletes())
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", ConfigBucket, err)
	}
	defer w.Stop()
	out := []ConfigEntry{}
	for {
		select {
		case e, ok := <-w.Updates():
			if !ok {
				return out, nil
			}
			if e == nil {
				return out, nil
			}
			out = append(out, ConfigEntry{Key: e.Key(), Value: e.Value(), Revision: e.Revision()})
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// WatchConfig calls fn for every setting matching filter, then for every
// change, from one goroutine until ctx ends; it returns once the settings
// present at the start were delivered.
func (s *Store) WatchConfig(ctx context.Context, filter string, fn func(ConfigEntry)) error {
	w, err := s.config.Watch(ctx, filter)
	if err != nil {
		return fmt.Errorf("watch %s: %w", ConfigBucket, err)
	}
	return watchLoop(ctx, w, func(e js.KeyValueEntry) {
		fn(ConfigEntry{Key: e.Key(), Value: e.Value(), Revision: e.Revision(), Deleted: e.Operation() != js.KeyValuePut})
	})
}

// watchLoop delivers w's entries to fn: those present at the start before
// it returns, later ones from a goroutine until ctx ends.
func watchLoop(ctx context.Context, w js.KeyWatcher, fn func(js.KeyValueEntry)) error {
	for {
		select {
		case e, ok := <-w.Updates():
			if !ok {
				return errors.New("watcher closed")
			}
			if e == nil {
				go func() {
					defer w.Stop()
					for {
						select {
						case e, ok := <-w.Updates():
							if !ok {
								return
							}
							if e != nil {
								fn(e)
							}
						case <-ctx.Done():
							return
						}
					}
				}()
				return nil
			}
			fn(e)
		case <-ctx.Done():
			_ = w.Stop()
			return ctx.Err()
		}
	}
}
