// Package cluster is the worker's membership in a cluster of workers that
// share one NATS system: who the workers are (each keeps a heartbeat in the
// firkin_workers KV bucket), how loaded they are, where a create goes
// (placement), which sandboxes are lost because their worker is gone, and
// the lame-duck drain of a worker.
//
// Everything read from the bucket is untrusted input: a record is bounded in
// size, its key must be its worker id, and its fields are validated before
// placement or lost detection believe it.
package cluster

import (
	"encoding/json"
	"fmt"
	"strings"
	"unicode"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// Bucket is the KV bucket of heartbeats: key = worker id, value = a
// subjects.WorkerRecord.
const Bucket = "firkin_workers"

// MaxRecordBytes bounds a heartbeat record read from the bucket.
const MaxRecordBytes = 4 << 10

// maxCount bounds every count and size in a record (no worker has a billion
// vCPUs; larger values would overflow the placement arithmetic's meaning).
const maxCount = 1 << 30

// DecodeRecord parses and validates the heartbeat stored under key.
func DecodeRecord(key string, data []byte) (subjects.WorkerRecord, error) {
	var rec subjects.WorkerRecord
	if len(data) > MaxRecordBytes {
		return rec, invalid("worker record %q: %d bytes, at most %d", key, len(data), MaxRecordBytes)
	}
	if err := json.Unmarshal(data, &rec); err != nil {
		return rec, invalid("worker record %q: %v", key, err)
	}
	if err := ValidateRecord(rec); err != nil {
		return rec, err
	}
	if rec.WorkerID != key {
		return rec, invalid("worker record %q names worker %q", key, rec.WorkerID)
	}
	return rec, nil
}

// ValidateRecord checks a heartbeat record's fields.
func ValidateRecord(rec subjects.WorkerRecord) error {
	if err := ValidateWorkerID(rec.WorkerID); err != nil {
		return err
	}
	switch rec.State {
	case subjects.WorkerActive, subjects.WorkerDraining, subjects.WorkerDrained:
	default:
		return invalid("worker %s: state %q", rec.WorkerID, rec.State)
	}
	for name, s := range map[string]string{"version": rec.Version, "driver": rec.Driver, "accelerator": rec.Accelerator} {
		if !label(s) {
			return invalid("worker %s: %s %q: want at most 64 printable characters", rec.WorkerID, name, s)
		}
	}
	c, l := rec.Capacity, rec.Load
	for _, n := range []int{c.VCPUs, c.MemoryMB, c.Sandboxes, c.Jobs, l.VCPUs, l.MemoryMB, l.Sandboxes, l.Warm, l.Jobs} {
		if n < 0 || n > maxCount {
			return invalid("worker %s: capacity or load out of range", rec.WorkerID)
		}
	}
	if rec.StartedAt.IsZero() || rec.UpdatedAt.IsZero() {
		return invalid("worker %s: started_at and updated_at are required", rec.WorkerID)
	}
	return nil
}

// ValidateWorkerID checks a worker id: what a sandbox id may be (one subject
// token and KV key of [a-z0-9-]).
func ValidateWorkerID(id string) error {
	if err := subjects.ValidateSandboxID(id); err != nil {
		return invalid("worker id %q: want 1-63 characters of [a-z0-9-], starting with a letter or digit", id)
	}
	return nil
}

func label(s string) bool {
	return len(s) <= 64 && strings.IndexFunc(s, func(r rune) bool { return !unicode.IsPrint(r) }) < 0
}

func invalid(format string, a ...any) error {
	return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf(format, a...))
}
