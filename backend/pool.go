package backend

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/firkin-dev/firkin-worker/agent"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// newPool makes the warm pool: per template id, machines restored from the
// template's snapshot, each holding a warm capacity reservation.
func (b *Backend) newPool() *vmpool.Pool {
	slow := min(20*time.Second, b.cfg.FillTimeout/4)
	return vmpool.NewPool(vmpool.PoolConfig{
		Fill:        b.fillWarm,
		FillTimeout: b.cfg.FillTimeout,
		SlowFill:    slow,
		Release:     func(m vmpool.Machine) { b.admission.Release(m.ID()) },
		Logger:      b.log.With("component", "pool"),
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
	// In the background: a fill's restore and warm-up must not take CPU
	// from the first commands of machines just handed out.
	m, err := b.restore(inBackground(ctx), id, filepath.Join(b.cfg.StateDir, "sandboxes", id), rec, true, false)
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
	if fg, ok := m.(vmpool.Foregrounder); ok {
		if err := fg.Foreground(); err != nil {
			// It would run at a tenth of the CPU share for its life: the
			// create restores a machine of its own instead.
			b.log.Warn("warm machine not handed out: its CPU share cannot be raised", "machine", m.ID(), "err", err)
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), warmStopTimeout)
			_ = m.Stop(sctx)
			cancel()
			return nil, false
		}
	}
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

// Pool target scopes (PoolStatusReply.Scope).
const (
	PoolScopeCluster = "cluster"
	PoolScopeWorker  = "worker"
)

// ErrOtherWorker is SetPool's answer to a request for another worker: the
// handler does not reply to it (that worker does).
var ErrOtherWorker = errdefs.Wrap(errdefs.ErrFailedPrecondition, errors.New("pool.set names another worker"))

// poolKey is the config key of a pool target: pool.<template id> for the
// cluster, pool.<template id>.<worker id> for one worker. Template ids have
// no dots, so the key tells them apart.
func poolKey(templateID, workerID string) string {
	if workerID == "" {
		return "pool." + templateID
	}
	return "pool." + templateID + "." + workerID
}

// poolValue is a pool target's value in the config bucket.
type poolValue struct {
	Target int `json:"target"`
}

// SetPool sets a template's warm pool target: cluster-wide when the request
// names no worker (stored in the config bucket, so every worker, also one
// that joins or restarts later, applies it), or on the worker it names
// (stored under that worker's key; other workers return ErrOtherWorker and
// do not reply). The latest setting that concerns a worker wins.
func (b *Backend) SetPool(ctx context.Context, req subjects.PoolSetRequest) (subjects.PoolStatusReply, error) {
	if req.WorkerID != "" && req.WorkerID != b.cfg.WorkerID {
		return subjects.PoolStatusReply{}, ErrOtherWorker
	}
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
	scope := PoolScopeCluster
	if req.WorkerID != "" {
		scope = PoolScopeWorker
	}
	if cs, ok := b.cfg.Store.(ConfigStore); ok {
		data, _ := json.Marshal(poolValue{Target: req.Target})
		if err := cs.PutConfig(ctx, poolKey(req.TemplateID, req.WorkerID), data); err != nil {
			return subjects.PoolStatusReply{}, fmt.Errorf("store pool target: %w", err)
		}
	} else {
		scope = PoolScopeWorker
	}
	b.pool.SetTarget(req.TemplateID, req.Target)
	reply := b.PoolStatus()
	reply.Scope = scope
	return reply, nil
}

// DefaultPool applies the worker's own start-up pool targets (--pool) to
// the templates that have no target in the config bucket, for the cluster
// or this worker: a stored target wins over the flag.
func (b *Backend) DefaultPool(ctx context.Context, targets map[string]int) {
	stored := map[string]bool{}
	if cs, ok := b.cfg.Store.(ConfigStore); ok {
		entries, err := cs.ListConfig(ctx, "pool.>")
		if err != nil {
			b.log.Warn("read pool targets", "err", err)
		}
		for _, e := range entries {
			if tid, wid, ok := parsePoolKey(e.Key); ok && (wid == "" || wid == b.cfg.WorkerID) {
				stored[tid] = true
			}
		}
	}
	for id, n := range targets {
		if stored[id] {
			b.log.Info("warm pool target from the cluster settings wins over the start-up one", "template", id, "start_up", n)
			continue
		}
		if err := subjects.ValidateTemplateID(id); err != nil {
			b.log.Warn("warm pool target", "template", id, "err", err)
			continue
		}
		if _, ok := b.templates.get(id); !ok && n > 0 {
			b.log.Warn("warm pool target", "template", id, "err", "no template snapshot on this worker")
			continue
		}
		b.pool.SetTarget(id, n)
	}
}

// parsePoolKey splits pool.<template id>[.<worker id>].
func parsePoolKey(key string) (templateID, workerID string, ok bool) {
	rest, found := strings.CutPrefix(key, "pool.")
	if !found {
		return "", "", false
	}
	templateID, workerID, _ = strings.Cut(rest, ".")
	if subjects.ValidateTemplateID(templateID) != nil || (workerID != "" && subjects.ValidateSandboxID(workerID) != nil) {
		return "", "", false
	}
	return templateID, workerID, true
}

// decodePoolValue reads a stored target (untrusted: bounded).
func decodePoolValue(data []byte, maxTarget int) (int, bool) {
	var v poolValue
	if len(data) > 1024 || json.Unmarshal(data, &v) != nil || v.Target < 0 {
		return 0, false
	}
	return min(v.Target, maxTarget), true
}

// poolSettings are the stored targets that concern this worker, per
// template: the cluster's and its own; the later one applies.
type poolSettings struct {
	mu sync.Mutex
	m  map[string]*[2]ConfigEntry // [0] cluster, [1] this worker
}

// watchPoolTargets applies the stored pool targets that concern this worker
// now and whenever they change.
func (b *Backend) watchPoolTargets() error {
	cs, ok := b.cfg.Store.(ConfigStore)
	if !ok {
		return nil
	}
	ps := &poolSettings{m: map[string]*[2]ConfigEntry{}}
	return cs.WatchConfig(b.ctx, "pool.>", func(e ConfigEntry) {
		tid, wid, ok := parsePoolKey(e.Key)
		if !ok || (wid != "" && wid != b.cfg.WorkerID) {
			return
		}
		slot := 0
		if wid != "" {
			slot = 1
		}
		ps.mu.Lock()
		s := ps.m[tid]
		if s == nil {
			s = &[2]ConfigEntry{}
			ps.m[tid] = s
		}
		s[slot] = e
		latest := s[0]
		if s[1].Revision > latest.Revision {
			latest = s[1]
		}
		ps.mu.Unlock()
		if latest.Deleted || latest.Revision == 0 {
			return
		}
		n, ok := decodePoolValue(latest.Value, b.cfg.Limits.MaxSessions)
		if !ok {
			b.log.Warn("pool target ignored: not a target", "key", latest.Key)
			return
		}
		if b.pool.Target(tid) != n {
			b.log.Info("warm pool target from the cluster settings", "template", tid, "target", n, "key", latest.Key)
			b.pool.SetTarget(tid, n)
		}
	})
}

// poolTargetUsers names the stored pool targets above zero of template sid,
// for the cluster or any worker.
func (b *Backend) poolTargetUsers(ctx context.Context, sid string) ([]string, error) {
	cs, ok := b.cfg.Store.(ConfigStore)
	if !ok || subjects.ValidateTemplateID(sid) != nil {
		return nil, nil
	}
	entries, err := cs.ListConfig(ctx, "pool."+sid+".>")
	if err != nil {
		return nil, err
	}
	cluster, err := cs.ListConfig(ctx, "pool."+sid)
	if err != nil {
		return nil, err
	}
	var clusterRev uint64
	for _, e := range cluster {
		clusterRev = max(clusterRev, e.Revision)
	}
	var users []string
	for _, e := range append(cluster, entries...) {
		tid, wid, ok := parsePoolKey(e.Key)
		if !ok || tid != sid || (wid != "" && e.Revision < clusterRev) {
			continue // a worker's target set before the cluster-wide one no longer applies
		}
		if n, ok := decodePoolValue(e.Value, b.cfg.Limits.MaxSessions); ok && n > 0 {
			if wid == "" {
				users = append(users, "cluster-wide warm pool target")
			} else {
				users = append(users, "warm pool target of worker "+wid)
			}
		}
	}
	return users, nil
}

// PoolStatus reports this worker's warm pool per template.
func (b *Backend) PoolStatus() subjects.PoolStatusReply {
	reply := subjects.PoolStatusReply{WorkerID: b.cfg.WorkerID, Templates: []subjects.PoolTemplateStatus{}}
	for _, s := range b.pool.Status() {
		reply.Templates = append(reply.Templates, subjects.PoolTemplateStatus{TemplateID: s.Key, Target: s.Target, Ready: s.Ready, InProgress: s.InProgress, LastError: s.LastError, FillTimeouts: s.FillTimeouts})
	}
	return reply
}
