package backend

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"github.com/firkin-dev/firkin-worker/agent"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// newPool makes the warm pool: per template id, machines restored from the
// template's snapshot, each holding a warm capacity reservation.
func (b *Backend) newPool() *vmpool.Pool {
	return vmpool.NewPool(vmpool.PoolConfig{
		Fill:    b.fillWarm,
		Release: func(m vmpool.Machine) { b.admission.Release(m.ID()) },
		Logger:  b.log.With("component", "pool"),
	})
}

// Deadlines of a warm fill's steps after the restore (the restore is bounded
// by the pool's fill timeout).
const (
	warmInitTimeout = 30 * time.Second
	warmExecTimeout = 30 * time.Second
	warmStopTimeout = 30 * time.Second
)

// fillWarm restores one warm machine of template key. Every step has a
// deadline (ctx, from the pool, bounds the whole fill); a machine whose
// guest misses one is stopped.
func (b *Backend) fillWarm(ctx context.Context, key string) (vmpool.Machine, error) {
	rec, ok := b.templates.get(key)
	if !ok {
		return nil, errdefs.Wrap(errdefs.ErrNotFound, fmt.Errorf("template %q has no template snapshot on this worker", key))
	}
	if err := b.checkDisk(); err != nil {
		return nil, err
	}
	id := "warm-" + NewID(12)
	res := vmpool.Resources{VCPUs: rec.Resources.VCPUs, MemoryMB: rec.Resources.MemoryMB}
	if err := b.admission.ReserveWarm(id, res); err != nil {
		return nil, err
	}
	m, err := b.restore(ctx, id, filepath.Join(b.cfg.StateDir, "sandboxes", id), rec, true, false)
	if err != nil {
		b.admission.Release(id)
		return nil, fmt.Errorf("restore %s: %w", id, err)
	}
	fail := func(step string, err error) (vmpool.Machine, error) {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), warmStopTimeout)
		defer cancel()
		if serr := m.Stop(sctx); serr != nil {
			b.log.Warn("stop warm machine after a failed fill", "machine", id, "step", step, "err", serr)
		}
		b.admission.Release(id)
		return nil, fmt.Errorf("%s %s: %w", step, id, err)
	}
	// A freshly restored QEMU starts with a cold translation cache (under
	// TCG the first commands take hundreds of milliseconds): run the paths
	// a create and a first command take — guest init, shell start, fork,
	// exec — before the machine is handed out. (Init runs again with the
	// sandbox's identity when the machine is taken.)
	ictx, cancel := context.WithTimeout(ctx, warmInitTimeout)
	err = m.Init(ictx, initRequest(id, rec.TemplateMetadata.Envs))
	cancel()
	if err != nil {
		return fail("init", err)
	}
	for range 3 {
		ectx, cancel := context.WithTimeout(ctx, warmExecTimeout)
		_, err := m.Exec(ectx, agent.ExecRequest{Command: "echo warm >/dev/null", Timeout: warmExecTimeout}, func(agent.Stream, []byte) {})
		cancel()
		if err != nil {
			return fail("warm up", err)
		}
	}
	return m, nil
}

// takeWarm hands out a warm machine for p when one fits it exactly.
func (b *Backend) takeWarm(ctx context.Context, p createPlan) (vmpool.Machine, bool) {
	if p.snapshot == nil || p.snapshot.Kind != subjects.KindTemplate || !p.network {
		return nil, false
	}
	cur, ok := b.templates.get(p.snapshot.SnapshotID)
	if !ok || cur.Generation != p.snapshot.Generation || cur.Resources.VCPUs != p.resources.VCPUs || cur.Resources.MemoryMB != p.resources.MemoryMB {
		return nil, false
	}
	m, ok := b.pool.Take(ctx, p.snapshot.SnapshotID)
	if !ok {
		return nil, false
	}
	// The warm reservation becomes the sandbox's; drop the one Create made.
	b.admission.Release(m.ID())
	return m, true
}

// evictWarm stops warm machines that admission gave up for an active sandbox.
func (b *Backend) evictWarm(_ context.Context, ids []string) {
	for _, id := range ids {
		if !b.pool.Remove(id) {
			b.admission.Release(id)
		}
	}
}

// SetPool sets a template's warm pool target on this worker.
func (b *Backend) SetPool(_ context.Context, req subjects.PoolSetRequest) (subjects.PoolStatusReply, error) {
	if err := subjects.ValidateTemplateID(req.TemplateID); err != nil {
		return subjects.PoolStatusReply{}, err
	}
	if req.Target < 0 || req.Target > b.cfg.Limits.MaxSessions {
		return subjects.PoolStatusReply{}, invalid("target %d: want 0..%d", req.Target, b.cfg.Limits.MaxSessions)
	}
	_, snapshot := b.templates.get(req.TemplateID)
	if _, builtin := b.cfg.Images[req.TemplateID]; !snapshot && !builtin {
		return subjects.PoolStatusReply{}, invalid("template %q not found on worker %s", req.TemplateID, b.cfg.WorkerID)
	}
	if !snapshot && req.Target > 0 {
		return subjects.PoolStatusReply{}, invalid("template %q has no template snapshot on worker %s yet", req.TemplateID, b.cfg.WorkerID)
	}
	b.pool.SetTarget(req.TemplateID, req.Target)
	return b.PoolStatus(), nil
}

// PoolStatus reports this worker's warm pool per template.
func (b *Backend) PoolStatus() subjects.PoolStatusReply {
	reply := subjects.PoolStatusReply{WorkerID: b.cfg.WorkerID, Templates: []subjects.PoolTemplateStatus{}}
	for _, s := range b.pool.Status() {
		reply.Templates = append(reply.Templates, subjects.PoolTemplateStatus{TemplateID: s.Key, Target: s.Target, Ready: s.Ready, InProgress: s.InProgress, LastError: s.LastError, FillTimeouts: s.FillTimeouts})
	}
	return reply
}
