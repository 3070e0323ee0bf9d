package backend

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// recover runs at start: sandboxes this worker owned before a restart are
// reattached when their machine still runs (and their deadline has not
// passed), otherwise cleaned up; machine directories nobody owns (warm
// machines, builds, crashed creates) are stopped and removed.
func (b *Backend) recover(ctx context.Context) error {
	sessions, err := b.cfg.Store.ListSessions(ctx)
	if err != nil {
		return fmt.Errorf("recover: %w", err)
	}
	kept := map[string]bool{}
	seen := map[string]bool{}
	for _, rec := range sessions {
		if rec.ClientID != b.cfg.WorkerID {
			continue
		}
		err := b.verifyOwnSession(rec)
		if err == nil && seen[rec.SandboxID] {
			// A signed record copied under another key: the first one is
			// the sandbox's; the copy is neither used nor acted on.
			b.log.Warn("duplicate session record ignored", "sandbox", rec.SandboxID)
			continue
		}
		seen[rec.SandboxID] = true
		if err == nil && rec.State == subjects.StatePaused {
			rec.MAC = ""
			if err := b.adoptPaused(rec); err != nil {
				b.log.Warn("paused sandbox not recovered", "sandbox", rec.SandboxID, "err", err)
			}
			continue // no machine: nothing to reattach
		}
		rec.MAC = ""
		var dir string
		var m vmpool.Machine
		if err == nil {
			// Ours still (not claimed by another worker while this one
			// was down), stored again as running: by compare-and-set.
			rec, err = b.reclaimSession(ctx, rec)
			if errors.Is(err, errClaimedElsewhere) {
				b.log.Warn("sandbox not recovered", "sandbox", rec.SandboxID, "err", err)
				continue // its machine is swept; the record is the new owner's
			}
		}
		if err == nil {
			dir, m, err = b.reattachSession(ctx, rec, kept)
		}
		if err != nil {
			b.log.Warn("sandbox not recovered; cleaning up", "sandbox", rec.SandboxID, "err", err)
			b.dropSession(ctx, rec.SandboxID)
			b.event(ctx, subjects.EventFailed, rec.SandboxID, "not recovered after worker restart: "+err.Error())
			continue
		}
		rec.Dir = dir
		// A worker that died between taking a warm machine and giving it
		// the normal CPU share left it low.
		if fg, ok := m.(vmpool.Foregrounder); ok {
			if err := fg.Foreground(); err != nil {
				b.log.Warn("reattached sandbox keeps a background CPU share", "sandbox", rec.SandboxID, "err", err)
			}
		}
		if _, err := b.admission.Admit(rec.SandboxID, vmpool.Resources{VCPUs: rec.Resources.VCPUs, MemoryMB: rec.Resources.MemoryMB}); err != nil {
			b.log.Warn("recovered sandbox over capacity", "sandbox", rec.SandboxID, "err", err)
		}
		if err := b.applyEgress(ctx, rec.SandboxID, m, rec.Network, rec.Egress); err != nil {
			b.log.Warn("sandbox not recovered: network policy", "sandbox", rec.SandboxID, "err", err)
			_ = m.Stop(ctx)
			b.removeEgress(ctx, rec.SandboxID, m)
			b.admission.Release(rec.SandboxID)
			b.dropSession(ctx, rec.SandboxID)
			b.event(ctx, subjects.EventFailed, rec.SandboxID, "not recovered after worker restart: network policy: "+err.Error())
			continue
		}
		if err := b.adopt(rec, m); err != nil {
			_ = m.Stop(ctx)
			b.removeEgress(ctx, rec.SandboxID, m)
			continue
		}
		kept[dir] = true
		if err := b.AdoptProcesses(ctx, rec.SandboxID); err != nil {
			b.log.Warn("processes of a reattached sandbox not followed", "sandbox", rec.SandboxID, "err", err)
		}
		b.systemLog(ctx, rec.SandboxID, "sandbox reattached after worker restart")
		b.log.Info("sandbox reattached", "sandbox", rec.SandboxID)
	}
	return errors.Join(b.sweep(ctx, kept), b.sweepSnapshots(ctx))
}

// reattachSession finds the machine directory of an authenticated session
// record, checks that the machine there was made for it and not already
// claimed by a sandbox in kept, and reattaches it.
func (b *Backend) reattachSession(ctx context.Context, rec subjects.Sandbox, kept map[string]bool) (string, vmpool.Machine, error) {
	dir, err := b.machineDir(rec)
	if err != nil {
		return "", nil, err
	}
	if err := checkSessionBinding(dir, rec.Generation); err != nil {
		return "", nil, err
	}
	if kept[dir] {
		return "", nil, errors.New("its machine directory belongs to another sandbox")
	}
	m, err := b.reattach(ctx, rec, dir)
	if err != nil {
		return "", nil, err
	}
	return dir, m, nil
}

// machineDir is the machine directory of a session record, derived from the
// state directory: <state>/sandboxes/<name>, where name is the sandbox id, or
// the warm machine's id for a sandbox taken from the warm pool (the base name
// of the record's dir, which must be one of these). The record's dir is
// never used as a path.
func (b *Backend) machineDir(rec subjects.Sandbox) (string, error) {
	if err := subjects.ValidateSandboxID(rec.SandboxID); err != nil {
		return "", err
	}
	name := rec.SandboxID
	if rec.Dir != "" {
		base := filepath.Base(rec.Dir)
		if base != rec.SandboxID && (!strings.HasPrefix(base, "warm-") || subjects.ValidateSandboxID(base) != nil) {
			return "", fmt.Errorf("session record names machine directory %q, which is neither the sandbox's nor a warm machine's", base)
		}
		name = base
	}
	return filepath.Join(b.cfg.StateDir, "sandboxes", name), nil
}

func (b *Backend) reattach(ctx context.Context, rec subjects.Sandbox, dir string) (vmpool.Machine, error) {
	if !rec.EndAt.IsZero() && time.Now().After(rec.EndAt) {
		return nil, errors.New("deadline passed while the worker was down")
	}
	r, ok := b.cfg.Driver.(vmpool.Reattacher)
	if !ok {
		return nil, fmt.Errorf("driver %s cannot reattach", b.cfg.Driver.Name())
	}
	// A loaded host under TCG can take a while to answer a new agent session.
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return r.Reattach(ctx, dir)
}

// sweep stops and removes every machine directory not kept.
func (b *Backend) sweep(ctx context.Context, kept map[string]bool) error {
	root := filepath.Join(b.cfg.StateDir, "sandboxes")
	entries, err := os.ReadDir(root)
	if err != nil {
		return fmt.Errorf("sweep %s: %w", root, err)
	}
	r, canReattach := b.cfg.Driver.(vmpool.Reattacher)
	var errs []error
	for _, e := range entries {
		dir := filepath.Join(root, e.Name())
		if kept[dir] || !e.IsDir() {
			continue
		}
		if canReattach {
			// A machine may still run there: attach to it only to stop it.
			actx, cancel := context.WithTimeout(ctx, 5*time.Second)
			if m, err := r.Reattach(actx, dir); err == nil {
				if err := m.Stop(actx); err != nil {
					errs = append(errs, err)
				}
			}
			cancel()
		}
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, err)
			continue
		}
		if !strings.HasPrefix(e.Name(), "warm-") {
			b.log.Info("removed orphaned machine directory", "dir", dir)
		}
	}
	return errors.Join(errs...)
}
