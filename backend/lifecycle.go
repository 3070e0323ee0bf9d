package backend

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/firkin-dev/firkin-worker/agent"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// minResumeLifetime: a sandbox resumed with less than this left of its
// deadline (one paused at its deadline, on_timeout pause) gets the default
// timeout instead.
const minResumeLifetime = 10 * time.Second

// errPaused is the class of a request to a paused sandbox that does not
// resume it.
func errPaused(id string) error {
	return errdefs.Wrap(errdefs.ErrFailedPrecondition, fmt.Errorf("sandbox %s is paused: resume it first (or create it with auto_resume)", id))
}

// pausedMachine stands for the machine of a paused sandbox: there is none,
// every use fails with failed_precondition.
type pausedMachine struct{ id string }

func (p pausedMachine) ID() string                                    { return p.id }
func (p pausedMachine) Dir() string                                   { return "" }
func (p pausedMachine) Init(context.Context, agent.InitRequest) error { return errPaused(p.id) }
func (p pausedMachine) Exec(context.Context, agent.ExecRequest, agent.OutputFunc) (agent.ExecResult, error) {
	return agent.ExecResult{}, errPaused(p.id)
}
func (p pausedMachine) DialGuest(context.Context, int) (net.Conn, error) { return nil, errPaused(p.id) }
func (p pausedMachine) Ping(context.Context) error                       { return errPaused(p.id) }
func (p pausedMachine) Stop(context.Context) error                       { return nil }
func (p pausedMachine) Done() <-chan struct{}                            { return nil }
func (p pausedMachine) Agent() (*agent.Client, error)                    { return nil, errPaused(p.id) }

var _ vmpool.Machine = pausedMachine{}

// isPaused reports whether a session is paused.
func (s *session) isPaused() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.paused
}

// Pause saves a running sandbox as a continuation snapshot and stops its
// machine. The session stays on this worker (its subjects answered, its
// routes registered, its token valid) in state paused, holding no machine
// and no admission reservation; its deadline is suspended. Pausing a
// paused sandbox answers its record.
func (b *Backend) Pause(ctx context.Context, id string, _ subjects.PauseRequest) (subjects.Sandbox, error) {
	s, err := b.lookup(id)
	if err != nil {
		return subjects.Sandbox{}, err
	}
	s.life.Lock()
	defer s.life.Unlock()
	return b.pauseLocked(ctx, s, "paused on request")
}

func (b *Backend) pauseLocked(ctx context.Context, s *session, reason string) (subjects.Sandbox, error) {
	s.mu.Lock()
	id := s.rec.SandboxID
	switch {
	case s.ending:
		s.mu.Unlock()
		return subjects.Sandbox{}, errdefs.Wrap(errdefs.ErrNotFound, fmt.Errorf("sandbox %s not found", id))
	case s.paused:
		rec := s.rec.WithoutTokens()
		s.mu.Unlock()
		return rec, nil
	}
	if s.timer != nil {
		s.timer.Stop()
	}
	remaining := time.Until(s.rec.EndAt)
	s.paused = true // the machine's exit is the pause's, not a failure
	s.mu.Unlock()
	t0 := time.Now()
	b.detachProcs(id)
	sid := pauseSnapshotPrefix(id) + NewID(6)
	rec, err := b.save(ctx, s, sid, vmpool.SaveOptions{Kind: vmpool.Continuation, Stop: true}, subjects.TemplateMetadata{Envs: map[string]string{}})
	if err != nil {
		// The driver leaves the machine running after a failed save.
		s.mu.Lock()
		s.paused = false
		s.mu.Unlock()
		b.armDeadline(s)
		if aerr := b.AdoptProcesses(ctx, id); aerr != nil {
			b.log.Warn("follow processes after a failed pause", "sandbox", id, "err", aerr)
		}
		return subjects.Sandbox{}, fmt.Errorf("pause sandbox %s: %w", id, err)
	}
	if rec, err = b.signRecord(rec); err == nil {
		err = b.cfg.Store.CreateSnapshot(ctx, rec)
	}
	if err != nil {
		// The machine is gone and its state cannot be kept: the sandbox
		// ends.
		_ = os.RemoveAll(b.recordDir(rec))
		s.mu.Lock()
		s.paused = false
		s.mu.Unlock()
		_ = b.end(context.WithoutCancel(ctx), id, subjects.EventFailed, "pause failed: "+err.Error())
		return subjects.Sandbox{}, fmt.Errorf("pause sandbox %s: store snapshot: %w", id, err)
	}
	b.upload(rec)
	old := s.mach()
	b.removeEgress(ctx, id, old)
	b.admission.Release(id)
	if remaining < 0 {
		remaining = 0
	}
	s.mu.Lock()
	s.machine = pausedMachine{id: id}
	s.rec.State = subjects.StatePaused
	s.rec.Paused = &subjects.PausedInfo{SnapshotID: sid, PausedAt: time.Now().UTC(), RemainingMS: remaining.Milliseconds()}
	s.rec.DiskParent, s.rec.DiskParentLocation = sid, b.recordDir(rec)
	s.rec.Dir = ""
	updated := s.rec
	s.mu.Unlock()
	if err := b.putSession(ctx, updated); err != nil {
		b.log.Warn("store paused session", "sandbox", id, "err", err)
	}
	b.systemLog(ctx, id, fmt.Sprintf("sandbox paused (%s) into snapshot %s (%d bytes)", reason, sid, rec.SizeBytes))
	b.event(ctx, subjects.EventPaused, id, reason)
	b.log.Info("sandbox paused", "sandbox", id, "snapshot", sid, "reason", reason, "elapsed", time.Since(t0))
	return updated.WithoutTokens(), nil
}

// Resume restores a paused sandbox from its pause snapshot under the same
// id, generation (so the same traffic token) and routes; its processes go
// on where they were and are followed again. Its deadline is what was left
// when it was paused (at least 10 s, else the default timeout), or
// req.TimeoutS when set. Resuming a running sandbox answers its record.
func (b *Backend) Resume(ctx context.Context, id string, req subjects.ResumeRequest) (subjects.Sandbox, error) {
	if req.TimeoutS < 0 || time.Duration(req.TimeoutS)*time.Second > b.cfg.MaxTimeout {
		return subjects.Sandbox{}, invalid("timeout_s %d: want 0..%d", req.TimeoutS, int(b.cfg.MaxTimeout/time.Second))
	}
	s, err := b.lookup(id)
	if err != nil {
		return subjects.Sandbox{}, err
	}
	s.life.Lock()
	defer s.life.Unlock()
	return b.resumeLocked(ctx, s, time.Duration(req.TimeoutS)*time.Second)
}

func (b *Backend) resumeLocked(ctx context.Context, s *session, timeout time.Duration) (subjects.Sandbox, error) {
	s.mu.Lock()
	rec := s.rec
	paused, ending := s.paused, s.ending
	s.mu.Unlock()
	id := rec.SandboxID
	switch {
	case ending:
		return subjects.Sandbox{}, errdefs.Wrap(errdefs.ErrNotFound, fmt.Errorf("sandbox %s not found", id))
	case !paused:
		return b.withEnvdToken(rec), nil
	case rec.Paused == nil:
		return subjects.Sandbox{}, errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("paused sandbox %s has no pause snapshot in its record", id))
	}
	t0 := time.Now()
	snap, err := b.getSnapshot(ctx, rec.Paused.SnapshotID)
	if err != nil {
		return subjects.Sandbox{}, fmt.Errorf("resume sandbox %s: %w", id, err)
	}
	res := vmpool.Resources{VCPUs: rec.Resources.VCPUs, MemoryMB: rec.Resources.MemoryMB}
	evict, err := b.admission.Admit(id, res)
	if err != nil {
		return subjects.Sandbox{}, err
	}
	var undo undoStack
	undo.push("release admission", func(context.Context) error { b.admission.Release(id); return nil })
	fail := func(err error) (subjects.Sandbox, error) {
		undo.run(b.ctx, b.log)
		return subjects.Sandbox{}, fmt.Errorf("resume sandbox %s: %w", id, err)
	}
	b.evictWarm(ctx, evict)
	if err := b.checkDisk(); err != nil {
		return fail(err)
	}
	dir := filepath.Join(b.cfg.StateDir, "sandboxes", id)
	m, err := b.restore(ctx, id, dir, snap, rec.Network, false)
	if err != nil {
		return fail(err)
	}
	undo.push("remove network policy", func(ctx context.Context) error { b.removeEgress(ctx, id, m); return nil })
	undo.push("stop machine", m.Stop)
	if err := b.applyEgress(ctx, id, m, rec.Network, rec.Egress); err != nil {
		return fail(err)
	}
	if err := m.Init(ctx, resumeInit(id)); err != nil {
		return fail(fmt.Errorf("init guest: %w", err))
	}
	if err := bindSession(m.Dir(), rec.Generation); err != nil {
		return fail(err)
	}
	tRestored := time.Since(t0)
	life := timeout
	if life == 0 {
		life = time.Duration(rec.Paused.RemainingMS) * time.Millisecond
		if life < minResumeLifetime {
			life = b.cfg.DefaultTimeout
		}
	}
	s.mu.Lock()
	s.machine = m
	s.paused = false
	s.rec.State = subjects.StateRunning
	s.rec.Paused = nil
	s.rec.Dir = m.Dir()
	s.rec.EndAt = time.Now().UTC().Add(life).Truncate(time.Second)
	updated := s.rec
	s.mu.Unlock()
	if err := b.putSession(ctx, updated); err != nil {
		b.log.Warn("store resumed session", "sandbox", id, "err", err)
	}
	b.armDeadline(s)
	b.watchMachine(s)
	if err := b.AdoptProcesses(ctx, id); err != nil {
		b.log.Warn("follow processes after resume", "sandbox", id, "err", err)
	}
	b.systemLog(ctx, id, fmt.Sprintf("sandbox resumed from snapshot %s on worker %s", snap.SnapshotID, b.cfg.WorkerID))
	b.event(ctx, subjects.EventResumed, id, snap.SnapshotID)
	b.log.Info("sandbox resumed", "sandbox", id, "snapshot", snap.SnapshotID, "restore", tRestored, "total", time.Since(t0))
	return b.withEnvdToken(updated), nil
}

// withEnvdToken is rec as a resume answers it: without the traffic token,
// with the envd access token of a secure sandbox (the same one the create
// reply carried: the generation is kept). Whoever may resume a sandbox
// controls it through the NATS API anyway; E2B's connect hands the token
// out the same way, so an SDK that connects to a secure sandbox can reach
// its sandbox API.
func (b *Backend) withEnvdToken(rec subjects.Sandbox) subjects.Sandbox {
	rec = rec.WithoutTokens()
	if rec.Secure {
		rec.EnvdAccessToken = b.cfg.Tokens.EnvdToken(rec.SandboxID, rec.Generation)
	}
	return rec
}

// resumeInit is the guest init of a resume: the same identity, the env the
// guest keeps, the host's clock and fresh entropy.
func resumeInit(id string) agent.InitRequest {
	entropy := make([]byte, 64)
	_, _ = rand.Read(entropy)
	return agent.InitRequest{SandboxID: id, Hostname: id, KeepEnv: true, UnixNano: time.Now().UnixNano(), Entropy: entropy}
}

// Wake makes sandbox id ready for a request that needs its machine: a
// running sandbox is; a paused one is resumed when it was created with
// auto_resume, and refused with failed_precondition otherwise.
func (b *Backend) Wake(ctx context.Context, id string) error {
	s, err := b.lookup(id)
	if err != nil {
		return err
	}
	if !s.isPaused() {
		return nil
	}
	if !s.record().AutoResume {
		return errPaused(id)
	}
	s.life.Lock()
	defer s.life.Unlock()
	_, err = b.resumeLocked(ctx, s, 0)
	return err
}

// expire runs at a sandbox's deadline: it pauses a sandbox created with
// on_timeout pause and reports true, or reports false (the caller ends it).
func (b *Backend) expire(ctx context.Context, id string) bool {
	s, err := b.lookup(id)
	if err != nil || s.record().OnTimeout != subjects.OnTimeoutPause {
		return false
	}
	s.life.Lock()
	defer s.life.Unlock()
	if _, err := b.pauseLocked(ctx, s, "deadline reached"); err != nil {
		b.log.Warn("pause at deadline failed; the sandbox ends", "sandbox", id, "err", err)
		return false
	}
	return true
}

// adoptPaused registers a paused sandbox found in the store at start (this
// worker's, authenticated): its subjects are answered again and it can be
// resumed here.
func (b *Backend) adoptPaused(rec subjects.Sandbox) error {
	if rec.Paused == nil {
		return errors.New("paused record without pause snapshot")
	}
	s := &session{rec: rec, machine: pausedMachine{id: rec.SandboxID}, paused: true}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return errdefs.Wrap(errdefs.ErrFailedPrecondition, errors.New("worker is shutting down"))
	}
	b.sessions[rec.SandboxID] = s
	b.mu.Unlock()
	if b.hooks.Owned != nil {
		b.hooks.Owned(rec.SandboxID)
	}
	b.log.Info("paused sandbox recovered", "sandbox", rec.SandboxID, "snapshot", rec.Paused.SnapshotID)
	return nil
}

// forget drops a paused sandbox from this worker without touching its
// record (the worker stops; the sandbox stays paused in the store).
func (b *Backend) forget(id string) {
	b.mu.Lock()
	delete(b.sessions, id)
	b.mu.Unlock()
	if b.hooks.Released != nil {
		b.hooks.Released(id)
	}
}

// ListPage answers a filtered, paginated list of the cluster's sandboxes.
func (b *Backend) ListPage(ctx context.Context, req subjects.ListSandboxesRequest) (subjects.ListSandboxesReply, error) {
	if err := req.Validate(); err != nil {
		return subjects.ListSandboxesReply{}, err
	}
	list, err := b.List(ctx)
	if err != nil {
		return subjects.ListSandboxesReply{}, err
	}
	return subjects.PageSandboxes(list, req), nil
}

// mach returns the session's current machine (a pause and a resume replace
// it).
func (s *session) mach() vmpool.Machine {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.machine
}

// Fork makes req.Count new running sandboxes from a running one: it saves
// the source as a continuation snapshot (the source goes on running, its
// processes followed again) and creates each fork from it, as a create
// with snapshot_id does (its own id, generation and traffic token, guest
// hostname, clock and fresh entropy, the CRNG reseeded, a new MAC
// address) and follows the processes it inherited. The forks keep the
// source's resources, public_traffic, network and egress policy,
// auto_resume and on_timeout, and its guest's default env (the create
// env); metadata and lifetime are the request's or the source's. (Port
// routes are the proxy's: the worker copies them.) A fork that fails is
// reported by the error, with the forks made so far killed. The fork
// snapshots are intermediate: the last of their users to end deletes them
// (see dropSnapshots).
func (b *Backend) Fork(ctx context.Context, id string, req subjects.ForkRequest) (subjects.ForkReply, error) {
	if err := req.Validate(); err != nil {
		return subjects.ForkReply{}, err
	}
	s, err := b.lookup(id)
	if err != nil {
		return subjects.ForkReply{}, err
	}
	if s.isPaused() {
		return subjects.ForkReply{}, errPaused(id)
	}
	t0 := time.Now()
	snap, err := b.forkSnapshot(ctx, s)
	if err != nil {
		return subjects.ForkReply{}, err
	}
	src := s.record()
	if req.Count > 1 {
		// Forks of a shared-memory snapshot map its RAM file copy-on-write.
		if shared, err := b.sharedForkBase(ctx, src, snap); err != nil {
			b.log.Warn("fork: no shared-memory base; each fork loads its own memory", "sandbox", id, "err", err)
		} else {
			snap = shared
		}
	}
	tSaved := time.Since(t0)
	create := subjects.CreateSandboxRequest{SnapshotID: snap.SnapshotID, Metadata: src.Metadata, TimeoutS: req.TimeoutS,
		Resources:     &subjects.Resources{VCPUs: src.Resources.VCPUs, MemoryMB: src.Resources.MemoryMB},
		PublicTraffic: &src.PublicTraffic, Network: &src.Network, Egress: src.Egress, AutoResume: src.AutoResume, OnTimeout: src.OnTimeout,
		Secure: src.Secure}
	if req.Metadata != nil {
		create.Metadata = req.Metadata
	}
	if create.TimeoutS == 0 {
		create.TimeoutS = max(int(time.Until(src.EndAt)/time.Second), int(minResumeLifetime/time.Second))
	}
	out := make([]subjects.Sandbox, req.Count)
	errs := make([]error, req.Count)
	done := make(chan int, req.Count)
	for i := range req.Count {
		go func() {
			out[i], errs[i] = b.forkOne(ctx, id, create)
			done <- i
		}()
	}
	for range req.Count {
		<-done
	}
	if err := errors.Join(errs...); err != nil {
		for _, sb := range out {
			if sb.SandboxID != "" {
				_ = b.end(context.WithoutCancel(ctx), sb.SandboxID, subjects.EventFailed, "another fork of the same request failed")
			}
		}
		b.dropSnapshots(id, snap.SnapshotID)
		return subjects.ForkReply{}, err
	}
	ids := make([]string, len(out))
	for i, sb := range out {
		ids[i] = sb.SandboxID
	}
	b.systemLog(ctx, id, fmt.Sprintf("sandbox forked into %v from snapshot %s", ids, snap.SnapshotID))
	b.event(ctx, subjects.EventForked, id, snap.SnapshotID)
	b.log.Info("sandbox forked", "sandbox", id, "count", req.Count, "snapshot", snap.SnapshotID, "save", tSaved, "total", time.Since(t0))
	return subjects.ForkReply{SourceID: id, Sandboxes: out, SnapshotID: snap.SnapshotID}, nil
}

// forkSnapshot saves a running sandbox as the continuation snapshot its
// forks restore, and follows its processes again.
func (b *Backend) forkSnapshot(ctx context.Context, s *session) (subjects.SnapshotRecord, error) {
	s.life.Lock()
	defer s.life.Unlock()
	if s.isPaused() {
		return subjects.SnapshotRecord{}, errPaused(s.record().SandboxID)
	}
	id := s.record().SandboxID
	sid := id + forkSnapshotInfix + NewID(6)
	b.detachProcs(id)
	defer func() {
		if err := b.AdoptProcesses(ctx, id); err != nil {
			b.log.Warn("follow processes after fork", "sandbox", id, "err", err)
		}
	}()
	rec, err := b.save(ctx, s, sid, vmpool.SaveOptions{Kind: vmpool.Continuation}, subjects.TemplateMetadata{Envs: map[string]string{}})
	if err != nil {
		return rec, fmt.Errorf("fork sandbox %s: %w", id, err)
	}
	if rec, err = b.signRecord(rec); err == nil {
		err = b.cfg.Store.CreateSnapshot(ctx, rec)
	}
	if err != nil {
		_ = os.RemoveAll(b.recordDir(rec))
		return subjects.SnapshotRecord{}, fmt.Errorf("fork sandbox %s: store snapshot: %w", id, err)
	}
	b.upload(rec)
	s.mu.Lock()
	s.rec.DiskParent, s.rec.DiskParentLocation = sid, b.recordDir(rec)
	updated := s.rec
	s.mu.Unlock()
	if err := b.putSession(ctx, updated); err != nil {
		b.log.Warn("update session after fork snapshot", "sandbox", id, "err", err)
	}
	return rec, nil
}

// sharedForkBase turns the fork snapshot stream (memory in the migration
// stream, loaded into each restored machine's own RAM) into a snapshot
// whose memory is a file that every fork maps copy-on-write: a machine is
// restored from stream with its RAM in a shared file and saved at once
// with that file (the driver's shared-memory format), then stopped.
func (b *Backend) sharedForkBase(ctx context.Context, src subjects.Sandbox, stream subjects.SnapshotRecord) (subjects.SnapshotRecord, error) {
	baseID := "forkbase-" + NewID(12)
	dir := filepath.Join(b.cfg.StateDir, "sandboxes", baseID)
	m, err := b.restore(ctx, baseID, dir, stream, src.Network, true)
	if err != nil {
		return subjects.SnapshotRecord{}, err
	}
	defer func() { _ = m.Stop(context.WithoutCancel(ctx)) }()
	rec := src
	rec.DiskParent, rec.DiskParentLocation = stream.SnapshotID, b.recordDir(stream)
	tmp := &session{rec: rec, machine: m}
	sid := src.SandboxID + forkMemInfix + NewID(6)
	out, err := b.save(ctx, tmp, sid, vmpool.SaveOptions{Kind: vmpool.Template, Stop: true}, subjects.TemplateMetadata{Envs: map[string]string{}})
	if err != nil {
		return subjects.SnapshotRecord{}, err
	}
	if out.Format == stream.Format {
		_ = os.RemoveAll(b.recordDir(out))
		return subjects.SnapshotRecord{}, fmt.Errorf("driver %s saved format %q: no shared memory", b.cfg.Driver.Name(), out.Format)
	}
	// A base of forks, not a template (the driver's kind only chose the
	// memory format).
	out.Kind = subjects.KindContinuation
	if out, err = b.signRecord(out); err == nil {
		err = b.cfg.Store.CreateSnapshot(ctx, out)
	}
	if err != nil {
		_ = os.RemoveAll(b.recordDir(out))
		return subjects.SnapshotRecord{}, err
	}
	b.upload(out)
	return out, nil
}

// forkOne creates one fork with its own network identity (MAC address)
// and the default env the source's guest has (its create env).
func (b *Backend) forkOne(ctx context.Context, source string, req subjects.CreateSandboxRequest) (subjects.Sandbox, error) {
	sb, err := b.create(ctx, req, createOptions{keepGuestEnv: true, mac: newMAC()})
	if err != nil {
		return sb, fmt.Errorf("fork of %s: %w", source, err)
	}
	s, err := b.lookup(sb.SandboxID)
	if err != nil {
		return subjects.Sandbox{}, err
	}
	s.mu.Lock()
	s.rec.ForkedFrom = source
	rec := s.rec
	s.mu.Unlock()
	if err := b.putSession(ctx, rec); err != nil {
		b.log.Warn("store fork session", "sandbox", sb.SandboxID, "err", err)
	}
	if err := b.AdoptProcesses(ctx, sb.SandboxID); err != nil {
		b.log.Warn("follow processes of a fork", "sandbox", sb.SandboxID, "err", err)
	}
	sb.ForkedFrom = source
	return sb, nil
}

// newMAC is a random locally administered unicast address in QEMU's range.
func newMAC() string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return fmt.Sprintf("52:54:00:%02x:%02x:%02x", b[0], b[1], b[2])
}

// pauseSnapshotPrefix starts the names of a sandbox's pause snapshots.
func pauseSnapshotPrefix(id string) string { return id + "-pause-" }

// Fork snapshots are named <source id><forkSnapshotInfix><6 characters>
// (the continuation the forks restore) and <source id><forkMemInfix><6
// characters> (its shared-memory copy for a fork of 2 or more).
const (
	forkSnapshotInfix = "-fork-"
	forkMemInfix      = "-forkmem-"
)

// forkSnapshot reports whether rec is an intermediate snapshot a fork made.
func isForkSnapshot(rec subjects.SnapshotRecord) bool {
	if rec.Kind != subjects.KindContinuation || rec.SourceSandboxID == "" {
		return false
	}
	rest, ok := strings.CutPrefix(rec.SnapshotID, rec.SourceSandboxID)
	if !ok {
		return false
	}
	for _, infix := range []string{forkSnapshotInfix, forkMemInfix} {
		if suffix, ok := strings.CutPrefix(rest, infix); ok && len(suffix) == 6 {
			return true
		}
	}
	return false
}

// maxSnapshotChain bounds the walk of dropSnapshots (a chain grows by one
// snapshot per pause or fork).
const maxSnapshotChain = 1000

// dropSnapshots deletes, in the background, the intermediate snapshots a
// sandbox that ended (id) no longer needs: from the snapshot its disk sat
// on (sid) down its chain of parents, each one that is a pause snapshot of
// this sandbox, a pause snapshot of a sandbox that is gone, or a fork
// snapshot, and that nothing uses any more. DeleteSnapshot refuses one a
// sandbox, a pool or another snapshot still depends on, and the walk stops
// there: that user's own end (or deletion) walks on from it later, so the
// last fork of a fork snapshot to end deletes it. Snapshots a user named
// (snapshot, template) are never touched.
func (b *Backend) dropSnapshots(id, sid string) {
	if sid == "" {
		return
	}
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		ctx, cancel := context.WithTimeout(b.ctx, 2*time.Minute)
		defer cancel()
		for range maxSnapshotChain {
			rec, err := b.getSnapshot(ctx, sid)
			if err != nil || !b.disposable(ctx, id, rec) {
				return
			}
			if _, err := b.DeleteSnapshot(ctx, sid); err != nil {
				b.log.Debug("intermediate snapshot kept", "sandbox", id, "snapshot", sid, "err", err)
				return
			}
			b.log.Info("intermediate snapshot deleted", "sandbox", id, "snapshot", sid)
			if sid = rec.Parent; sid == "" {
				return
			}
		}
	}()
}

// disposable reports whether rec is an intermediate snapshot dropSnapshots
// may delete once unused: a fork snapshot, a pause snapshot of sandbox id
// (which ended), or a pause snapshot of a sandbox that has no session.
func (b *Backend) disposable(ctx context.Context, id string, rec subjects.SnapshotRecord) bool {
	switch {
	case rec.Kind != subjects.KindContinuation:
		return false
	case isForkSnapshot(rec):
		return true
	case !strings.HasPrefix(rec.SnapshotID, pauseSnapshotPrefix(rec.SourceSandboxID)):
		return false
	case rec.SourceSandboxID == id:
		return true
	}
	_, err := b.cfg.Store.GetSession(ctx, rec.SourceSandboxID)
	return errors.Is(err, errdefs.ErrNotFound)
}

// TakeOver resumes, on this worker, a paused sandbox whose worker is not
// live (live reports the live workers): its session record moves to this
// worker by compare-and-set on its revision (of two workers trying, one
// wins; the other answers conflict), then it resumes as Resume does, from
// the pause snapshot fetched from the artifact store. A sandbox this
// worker owns is resumed; one whose worker is live is refused with
// conflict (its owner answers firkin.sandbox.<id>.resume).
func (b *Backend) TakeOver(ctx context.Context, req subjects.TakeOverRequest, live func(workerID string) bool) (subjects.Sandbox, error) {
	id := req.SandboxID
	if err := subjects.ValidateSandboxID(id); err != nil {
		return subjects.Sandbox{}, err
	}
	if b.Owns(id) {
		return b.Resume(ctx, id, subjects.ResumeRequest{TimeoutS: req.TimeoutS})
	}
	cas, ok := b.cfg.Store.(SessionCAS)
	if !ok {
		return subjects.Sandbox{}, errdefs.Wrap(errdefs.ErrUnsupported, errors.New("this worker's store cannot move a sandbox between workers"))
	}
	cur, rev, err := cas.GetSessionEntry(ctx, id)
	if err != nil {
		return subjects.Sandbox{}, err
	}
	switch {
	case cur.State != subjects.StatePaused || cur.Paused == nil:
		return subjects.Sandbox{}, errdefs.Wrap(errdefs.ErrConflict, fmt.Errorf("sandbox %s is %s, not paused: its worker answers it", id, cur.State))
	case cur.ClientID == b.cfg.WorkerID:
		return subjects.Sandbox{}, errdefs.Wrap(errdefs.ErrConflict, fmt.Errorf("sandbox %s is this worker's but not loaded: retry", id))
	case live(cur.ClientID):
		return subjects.Sandbox{}, errdefs.Wrap(errdefs.ErrConflict, fmt.Errorf("sandbox %s belongs to live worker %s: send its resume request", id, cur.ClientID))
	}
	if err := b.verifySession(cur); err != nil {
		return subjects.Sandbox{}, err
	}
	moved := cur
	moved.MAC = ""
	moved.ClientID = b.cfg.WorkerID
	signed := moved
	if signed.MAC, err = sessionMAC(b.cfg.RecordKey, moved); err != nil {
		return subjects.Sandbox{}, err
	}
	if _, err := cas.UpdateSession(ctx, signed, rev); err != nil {
		return subjects.Sandbox{}, fmt.Errorf("take over sandbox %s: %w", id, err)
	}
	if err := b.adoptPaused(moved); err != nil {
		return subjects.Sandbox{}, err
	}
	b.log.Info("paused sandbox taken over", "sandbox", id, "from", cur.ClientID)
	return b.Resume(ctx, id, subjects.ResumeRequest{TimeoutS: req.TimeoutS})
}
