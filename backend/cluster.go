package backend

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// SessionCAS is the optional part of a Store that claims sandbox ids across
// workers: compare-and-set on a session record's revision. Without it
// (a store of one worker) ids are claimed in this process only.
type SessionCAS interface {
	// CreateSession stores sb only if its id has no record
	// (errdefs.ErrConflict otherwise) and returns its revision.
	CreateSession(ctx context.Context, sb subjects.Sandbox) (uint64, error)
	// GetSessionEntry returns a record and its revision.
	GetSessionEntry(ctx context.Context, id string) (subjects.Sandbox, uint64, error)
	// UpdateSession replaces a record still at rev (errdefs.ErrConflict
	// otherwise) and returns the new revision.
	UpdateSession(ctx context.Context, sb subjects.Sandbox, rev uint64) (uint64, error)
	// DeleteSessionAt deletes a record still at rev.
	DeleteSessionAt(ctx context.Context, id string, rev uint64) error
}

// Load reports the worker's admission limits and what its active sandboxes
// and warm machines hold (its heartbeat).
func (b *Backend) Load() (subjects.WorkerCapacity, subjects.WorkerLoad) {
	u := b.Usage()
	c := subjects.WorkerCapacity{VCPUs: u.Limits.MaxVCPUs, MemoryMB: u.Limits.MaxMemoryMB, Sandboxes: u.Limits.MaxSessions}
	return c, subjects.WorkerLoad{VCPUs: u.ActiveVCPUs, MemoryMB: u.ActiveMemoryMB, Sandboxes: u.Sandboxes, Warm: u.Warm}
}

// ReleaseWarm sets every warm pool target to 0: the pool stops refilling
// and stops its machines (a draining worker).
func (b *Backend) ReleaseWarm(ctx context.Context) error {
	var errs []error
	for _, t := range b.PoolStatus().Templates {
		if _, err := b.SetPool(ctx, subjects.PoolSetRequest{TemplateID: t.TemplateID, Target: 0}); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// errClaimedElsewhere: a session record this worker wrote now belongs to
// another worker (it was marked lost and its id claimed meanwhile).
var errClaimedElsewhere = errors.New("its id was claimed by another worker meanwhile")

// verifyOwnSession authenticates a session record of this worker. A record
// another worker marked lost is the owner's signed record with only its
// state changed: it is checked as the running record it was.
func (b *Backend) verifyOwnSession(rec subjects.Sandbox) error {
	if rec.State == subjects.StateLost {
		rec.State = subjects.StateRunning
	}
	return b.verifySession(rec)
}

// reclaimSession takes a recovered session record back for this worker by
// compare-and-set: it must still be this worker's (running, or marked lost
// while it was down and not claimed since). The record is stored again,
// signed, in state running. errClaimedElsewhere when it is not ours any
// more: the caller must neither adopt nor delete it.
func (b *Backend) reclaimSession(ctx context.Context, rec subjects.Sandbox) (subjects.Sandbox, error) {
	cas, ok := b.cfg.Store.(SessionCAS)
	rec.State = subjects.StateRunning
	if !ok {
		return rec, nil
	}
	cur, rev, err := cas.GetSessionEntry(ctx, rec.SandboxID)
	if err != nil {
		if errors.Is(err, errdefs.ErrNotFound) {
			return rec, fmt.Errorf("session record deleted meanwhile: %w", errClaimedElsewhere)
		}
		return rec, err
	}
	if cur.ClientID != b.cfg.WorkerID || cur.Generation != rec.Generation {
		return rec, errClaimedElsewhere
	}
	signed := rec
	if signed.MAC, err = sessionMAC(b.cfg.RecordKey, rec); err != nil {
		return rec, err
	}
	if _, err := cas.UpdateSession(ctx, signed, rev); err != nil {
		if errors.Is(err, errdefs.ErrConflict) {
			return rec, errClaimedElsewhere
		}
		return rec, err
	}
	return rec, nil
}

// dropSession deletes the session record of a sandbox this worker could
// not recover, only while it is still this worker's (never one claimed by
// another worker meanwhile).
func (b *Backend) dropSession(ctx context.Context, id string) {
	cas, ok := b.cfg.Store.(SessionCAS)
	if !ok {
		_ = b.cfg.Store.DeleteSession(ctx, id)
		return
	}
	cur, rev, err := cas.GetSessionEntry(ctx, id)
	if err != nil || cur.ClientID != b.cfg.WorkerID {
		return
	}
	if err := cas.DeleteSessionAt(ctx, id, rev); err != nil && !errors.Is(err, errdefs.ErrConflict) {
		b.log.Warn("delete session record", "sandbox", id, "err", err)
	}
}

// claimPlaceholder is the record that claims a requested id while its
// create runs.
func (b *Backend) claimPlaceholder(id string) subjects.Sandbox {
	now := time.Now().UTC().Truncate(time.Second)
	return subjects.Sandbox{SandboxID: id, ClientID: b.cfg.WorkerID, State: subjects.StateCreating, StartedAt: now, EndAt: now}
}

// Reconcile runs when this worker's heartbeat comes back after a gap longer
// than its TTL (cut off from NATS): the others may have marked its
// sandboxes lost meanwhile, and claimed some of their ids. Each sandbox's
// record is taken back by compare-and-set (running again); a sandbox whose
// id now belongs to another worker is stopped here, leaving the new owner's
// record alone, so that no id has two owners.
func (b *Backend) Reconcile(ctx context.Context) {
	if _, ok := b.cfg.Store.(SessionCAS); !ok {
		return
	}
	b.mu.Lock()
	list := make([]*session, 0, len(b.sessions))
	for _, s := range b.sessions {
		list = append(list, s)
	}
	b.mu.Unlock()
	for _, s := range list {
		if s.isPaused() {
			continue // never marked lost, so never claimed: still ours
		}
		rec := s.record()
		rec.MAC = ""
		_, err := b.reclaimSession(ctx, rec)
		switch {
		case errors.Is(err, errClaimedElsewhere):
			b.log.Warn("sandbox stopped: its id was claimed by another worker while this one was cut off", "sandbox", rec.SandboxID)
			b.abandon(ctx, rec.SandboxID)
		case err != nil:
			b.log.Warn("reconcile sandbox record", "sandbox", rec.SandboxID, "err", err)
		}
	}
}

// abandon stops a sandbox whose record belongs to another worker now: as
// end does, but its record and lifecycle events are the new owner's.
func (b *Backend) abandon(ctx context.Context, id string) {
	b.mu.Lock()
	s, ok := b.sessions[id]
	if ok {
		delete(b.sessions, id)
	}
	b.mu.Unlock()
	if !ok {
		return
	}
	s.mu.Lock()
	s.ending = true
	if s.timer != nil {
		s.timer.Stop()
	}
	s.mu.Unlock()
	if b.hooks.Released != nil {
		b.hooks.Released(id)
	}
	if err := s.mach().Stop(ctx); err != nil {
		b.log.Warn("stop abandoned sandbox", "sandbox", id, "err", err)
	}
	b.removeEgress(ctx, id, s.mach())
	b.admission.Release(id)
}
