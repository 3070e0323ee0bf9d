package backend

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/firkin-dev/firkin-worker/agent"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// Resource bounds of one sandbox.
const (
	MaxVCPUs    = 16
	MinMemoryMB = 128
	MaxMemoryMB = 32 << 10
)

// createPlan is a validated create request with its source resolved.
type createPlan struct {
	id         string
	templateID string
	snapshot   *subjects.SnapshotRecord // restore from this, or nil
	image      vmpool.Image             // boot from this when snapshot is nil
	resources  vmpool.Resources
	timeout    time.Duration
	env        map[string]string
	metadata   map[string]string
	public     bool
	network    bool
	egress     *subjects.EgressPolicy
}

func (b *Backend) plan(ctx context.Context, req subjects.CreateSandboxRequest) (createPlan, error) {
	p := createPlan{id: req.SandboxID, templateID: req.TemplateID, metadata: req.Metadata, public: true, network: true}
	if p.id == "" {
		p.id = NewID(20)
	} else if err := subjects.ValidateSandboxID(p.id); err != nil {
		return p, err
	}
	switch {
	case req.TemplateID == "" && req.SnapshotID == "":
		return p, invalid("template_id or snapshot_id is required")
	case req.TemplateID != "" && req.SnapshotID != "":
		return p, invalid("give template_id or snapshot_id, not both")
	}
	p.resources = b.cfg.DefaultResources
	if r := req.Resources; r != nil {
		if r.VCPUs != 0 {
			p.resources.VCPUs = r.VCPUs
		}
		if r.MemoryMB != 0 {
			p.resources.MemoryMB = r.MemoryMB
		}
	}
	if p.resources.VCPUs < 1 || p.resources.VCPUs > MaxVCPUs {
		return p, invalid("resources.vcpus %d: want 1..%d", p.resources.VCPUs, MaxVCPUs)
	}
	if p.resources.MemoryMB < MinMemoryMB || p.resources.MemoryMB > MaxMemoryMB {
		return p, invalid("resources.memory_mb %d: want %d..%d", p.resources.MemoryMB, MinMemoryMB, MaxMemoryMB)
	}
	switch {
	case req.TimeoutS < 0 || time.Duration(req.TimeoutS)*time.Second > b.cfg.MaxTimeout:
		return p, invalid("timeout_s %d: want 0..%d", req.TimeoutS, int(b.cfg.MaxTimeout/time.Second))
	case req.TimeoutS == 0:
		p.timeout = b.cfg.DefaultTimeout
	default:
		p.timeout = time.Duration(req.TimeoutS) * time.Second
	}
	if req.PublicTraffic != nil {
		p.public = *req.PublicTraffic
	}
	if req.Network != nil {
		p.network = *req.Network
	}
	if err := b.checkEgress(p.network, req.Egress); err != nil {
		return p, err
	}
	p.egress = req.Egress
	switch req.OnTimeout {
	case "", subjects.OnTimeoutKill, subjects.OnTimeoutPause:
	default:
		return p, invalid("on_timeout %q: want kill or pause", req.OnTimeout)
	}
	for k := range req.Env {
		if k == "" || len(k) > 256 {
			return p, invalid("env: key %q: want 1..256 characters", k)
		}
	}
	if err := b.resolveSource(ctx, req, &p); err != nil {
		return p, err
	}
	p.env = mergeEnv(p.env, req.Env)
	return p, nil
}

// resolveSource decides where the machine comes from: a snapshot named by
// snapshot_id, a template snapshot named by template_id, or a built-in image.
func (b *Backend) resolveSource(ctx context.Context, req subjects.CreateSandboxRequest, p *createPlan) error {
	if req.SnapshotID != "" {
		rec, err := b.getSnapshot(ctx, req.SnapshotID) // validates the name
		if err != nil {
			return err
		}
		p.templateID = rec.TemplateID
		p.restoreFrom(rec, req.Resources == nil)
		return nil
	}
	if err := subjects.ValidateTemplateID(req.TemplateID); err != nil {
		return err
	}
	if rec, ok := b.templates.get(req.TemplateID); ok && !req.ColdBoot {
		p.restoreFrom(rec, req.Resources == nil)
		return nil
	}
	img, ok := b.cfg.Images[req.TemplateID]
	if !ok && req.ColdBoot {
		return invalid("cold_boot: template %q is not a built-in image template", req.TemplateID)
	}
	if !ok {
		return invalid("template %q not found on worker %s", req.TemplateID, b.cfg.WorkerID)
	}
	p.image = img
	return nil
}

// restoreFrom makes p restore rec, with the snapshot's template envs and,
// unless the request named resources, the snapshot's machine size.
func (p *createPlan) restoreFrom(rec subjects.SnapshotRecord, snapshotResources bool) {
	p.snapshot = &rec
	p.env = rec.TemplateMetadata.Envs
	if snapshotResources {
		p.resources = vmpool.Resources{VCPUs: rec.Resources.VCPUs, MemoryMB: rec.Resources.MemoryMB}
	}
}

// Create makes a sandbox: admission, disk check, a machine (from the warm
// pool, a snapshot restore or a cold boot), guest init, session record and
// deadline. Any failure after the machine exists undoes what was made.
func (b *Backend) Create(ctx context.Context, req subjects.CreateSandboxRequest) (subjects.Sandbox, error) {
	return b.create(ctx, req, createOptions{})
}

// createOptions change how create initialises the guest (a fork's).
type createOptions struct {
	// keepGuestEnv keeps the default env the restored guest has in memory
	// (the source's create env) instead of the snapshot's template envs.
	keepGuestEnv bool
	// mac, when set, becomes the guest's MAC address.
	mac string
}

func (b *Backend) create(ctx context.Context, req subjects.CreateSandboxRequest, o createOptions) (subjects.Sandbox, error) {
	p, err := b.plan(ctx, req)
	if err != nil {
		return subjects.Sandbox{}, err
	}
	if err := b.claimID(ctx, p.id, req.SandboxID != ""); err != nil {
		return subjects.Sandbox{}, err
	}
	defer b.unclaimID(p.id)

	evict, err := b.admission.Admit(p.id, p.resources)
	if err != nil {
		return subjects.Sandbox{}, err
	}
	var undo undoStack
	undo.push("release admission", func(context.Context) error { b.admission.Release(p.id); return nil })
	fail := func(err error) (subjects.Sandbox, error) {
		undo.run(b.ctx, b.log)
		return subjects.Sandbox{}, err
	}
	b.evictWarm(ctx, evict)
	if err := b.checkDisk(); err != nil {
		return fail(err)
	}

	t0 := time.Now()
	m, source, err := b.startMachine(ctx, p)
	tMachine := time.Since(t0)
	if err != nil {
		return fail(fmt.Errorf("create sandbox %s: %w", p.id, err))
	}
	// Undone in reverse: the machine stops before its policy goes.
	undo.push("remove network policy", func(ctx context.Context) error { b.removeEgress(ctx, p.id, m); return nil })
	undo.push("stop machine", m.Stop)
	if err := b.applyEgress(ctx, p.id, m, p.network, p.egress); err != nil {
		return fail(err)
	}

	init := initRequest(p.id, p.env)
	if o.keepGuestEnv {
		init.Env, init.KeepEnv = nil, true
	}
	if p.network {
		init.MAC = o.mac
	}
	if err := m.Init(ctx, init); err != nil {
		return fail(fmt.Errorf("create sandbox %s: init guest: %w", p.id, err))
	}
	tInit := time.Since(t0) - tMachine
	now := time.Now().UTC().Truncate(time.Second)
	// A new generation at every create: the token opens this instance only.
	generation, trafficToken := b.cfg.Tokens.MintTraffic(p.id)
	rec := subjects.Sandbox{
		SandboxID:     p.id,
		TemplateID:    p.templateID,
		ClientID:      b.cfg.WorkerID,
		Generation:    generation,
		State:         subjects.StateRunning,
		StartedAt:     now,
		EndAt:         now.Add(p.timeout),
		Source:        source,
		Resources:     subjects.Resources{VCPUs: p.resources.VCPUs, MemoryMB: p.resources.MemoryMB},
		Metadata:      p.metadata,
		PublicTraffic: p.public,
		Network:       p.network,
		Egress:        p.egress,
		Driver:        b.cfg.Driver.Name(),
		Dir:           m.Dir(),
		AutoResume:    req.AutoResume,
		OnTimeout:     req.OnTimeout,
		Secure:        req.Secure,
	}
	if p.snapshot != nil {
		rec.SnapshotID = p.snapshot.SnapshotID
		rec.DiskParent, rec.DiskParentLocation = p.snapshot.SnapshotID, b.recordDir(*p.snapshot)
	}
	if err := bindSession(m.Dir(), generation); err != nil {
		return fail(fmt.Errorf("create sandbox %s: %w", p.id, err))
	}
	if err := b.putSession(ctx, rec); err != nil {
		return fail(fmt.Errorf("create sandbox %s: store session: %w", p.id, err))
	}
	undo.push("delete session", func(ctx context.Context) error { return b.cfg.Store.DeleteSession(ctx, p.id) })

	if err := b.adopt(rec, m); err != nil {
		return fail(err)
	}
	if p.snapshot != nil && p.snapshot.TemplateMetadata.StartCmd != "" && p.snapshot.Kind == subjects.KindTemplate {
		b.startTemplateCommand(p.id, m, p.snapshot.TemplateMetadata.StartCmd)
	}
	b.systemLog(ctx, p.id, fmt.Sprintf("sandbox created from %s (source %s) on worker %s", sourceName(p), source, b.cfg.WorkerID))
	b.event(ctx, subjects.EventCreated, p.id, source)
	b.log.Info("sandbox created", "sandbox", p.id, "template", p.templateID, "source", source,
		"machine", tMachine, "init", tInit, "total", time.Since(t0))
	// Only this reply carries the token: the record (stored and kept) does not.
	reply := rec
	reply.TrafficAccessToken = trafficToken
	if rec.Secure {
		reply.EnvdAccessToken = b.cfg.Tokens.EnvdToken(p.id, generation)
	}
	return reply, nil
}

// adopt registers a running sandbox: session map, deadline, NATS ownership.
func (b *Backend) adopt(rec subjects.Sandbox, m vmpool.Machine) error {
	s := &session{rec: rec, machine: m}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return errdefs.Wrap(errdefs.ErrFailedPrecondition, errors.New("worker is shutting down"))
	}
	b.sessions[rec.SandboxID] = s
	if a, ok := m.(interface{ Accel() string }); ok {
		b.accel = a.Accel()
	}
	b.mu.Unlock()
	b.armDeadline(s)
	b.watchMachine(s)
	if b.hooks.Owned != nil {
		b.hooks.Owned(rec.SandboxID)
	}
	return nil
}

// watchMachine ends the session when its machine dies on its own.
func (b *Backend) watchMachine(s *session) {
	b.wg.Add(1)
	s.mu.Lock()
	m := s.machine
	s.mu.Unlock()
	go func() {
		defer b.wg.Done()
		select {
		case <-m.Done():
		case <-b.ctx.Done():
			return
		}
		s.mu.Lock()
		// Ending, or paused (its machine stopped by the pause, maybe a new
		// one since): not a failure.
		ending := s.ending || s.paused || s.machine != m
		s.mu.Unlock()
		if ending {
			return
		}
		ctx, cancel := context.WithTimeout(b.ctx, 30*time.Second)
		defer cancel()
		if err := b.end(ctx, s.rec.SandboxID, subjects.EventFailed, "machine stopped unexpectedly"); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			b.log.Warn("clean up dead machine", "sandbox", s.rec.SandboxID, "err", err)
		}
	}()
}

// claimID reserves id for a create in flight; a taken id is a conflict.
// A requested id is claimed across the cluster too: with a store that can
// compare-and-set (SessionCAS), by creating a placeholder record (state
// creating, this worker's id) that only one worker can create, or by taking
// over a record marked lost at its revision. A generated id (20 random
// characters) is not worth the round trip.
func (b *Backend) claimID(ctx context.Context, id string, requested bool) error {
	b.mu.Lock()
	_, active := b.sessions[id]
	busy := active || b.creating[id]
	closed := b.closed
	if !busy && !closed {
		b.creating[id] = true
	}
	b.mu.Unlock()
	switch {
	case closed:
		return errdefs.Wrap(errdefs.ErrFailedPrecondition, errors.New("worker is shutting down"))
	case busy:
		return errdefs.Wrap(errdefs.ErrConflict, fmt.Errorf("sandbox %s already exists", id))
	}
	if !requested {
		return nil
	}
	taken := errdefs.Wrap(errdefs.ErrConflict, fmt.Errorf("sandbox %s already exists on another worker", id))
	cas, ok := b.cfg.Store.(SessionCAS)
	if !ok {
		if _, err := b.cfg.Store.GetSession(ctx, id); err == nil {
			b.unclaimLocal(id)
			return taken
		}
		return nil
	}
	placeholder := b.claimPlaceholder(id)
	_, err := cas.CreateSession(ctx, placeholder)
	if errors.Is(err, errdefs.ErrConflict) {
		// Taken, unless its record says lost: then take it over, by
		// revision, so of two workers doing so only one wins.
		cur, rev, gerr := cas.GetSessionEntry(ctx, id)
		switch {
		case gerr == nil && cur.State == subjects.StateLost:
			_, err = cas.UpdateSession(ctx, placeholder, rev)
		case errors.Is(gerr, errdefs.ErrNotFound):
			_, err = cas.CreateSession(ctx, placeholder) // deleted meanwhile
		}
	}
	if err != nil {
		b.unclaimLocal(id)
		if errors.Is(err, errdefs.ErrConflict) {
			return taken
		}
		return fmt.Errorf("claim sandbox id %s: %w", id, err)
	}
	return nil
}

// unclaimID ends a create's claim on id. When the create failed, the
// placeholder record it claimed the id with is deleted (at its revision,
// and only while it is still this worker's placeholder).
func (b *Backend) unclaimID(id string) {
	b.unclaimLocal(id)
	cas, ok := b.cfg.Store.(SessionCAS)
	if !ok || b.Owns(id) {
		return
	}
	ctx, cancel := context.WithTimeout(b.ctx, 10*time.Second)
	defer cancel()
	cur, rev, err := cas.GetSessionEntry(ctx, id)
	if err != nil || cur.ClientID != b.cfg.WorkerID || cur.State != subjects.StateCreating {
		return
	}
	if err := cas.DeleteSessionAt(ctx, id, rev); err != nil && !errors.Is(err, errdefs.ErrConflict) {
		b.log.Warn("release claimed sandbox id", "sandbox", id, "err", err)
	}
}

func (b *Backend) unclaimLocal(id string) {
	b.mu.Lock()
	delete(b.creating, id)
	b.mu.Unlock()
}

// startMachine gets a running machine for p: from the warm pool, by restoring
// a snapshot, or by a cold boot. It returns the source used.
func (b *Backend) startMachine(ctx context.Context, p createPlan) (vmpool.Machine, string, error) {
	dir := filepath.Join(b.cfg.StateDir, "sandboxes", p.id)
	if p.snapshot != nil {
		if m, ok := b.takeWarm(ctx, p); ok {
			return m, subjects.SourcePool, nil
		}
		m, err := b.restore(ctx, p.id, dir, *p.snapshot, p.network, false)
		if err != nil {
			return nil, "", err
		}
		return m, subjects.SourceRestore, nil
	}
	m, err := b.cfg.Driver.Boot(ctx, vmpool.BootSpec{ID: p.id, Dir: dir, Image: p.image, Resources: p.resources, Network: p.network})
	if err != nil {
		return nil, "", err
	}
	return m, subjects.SourceBoot, nil
}

func initRequest(id string, env map[string]string) agent.InitRequest {
	entropy := make([]byte, 64)
	_, _ = rand.Read(entropy)
	return agent.InitRequest{SandboxID: id, Hostname: id, Env: env, UnixNano: time.Now().UnixNano(), Entropy: entropy}
}

func sourceName(p createPlan) string {
	if p.snapshot != nil {
		return "snapshot " + p.snapshot.SnapshotID
	}
	return "template " + p.templateID
}

func mergeEnv(base, over map[string]string) map[string]string {
	out := make(map[string]string, len(base)+len(over))
	for k, v := range base {
		out[k] = v
	}
	for k, v := range over {
		out[k] = v
	}
	return out
}
