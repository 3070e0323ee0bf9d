// Package backend is the worker's runtime between the NATS handlers and the
// machine drivers (the seed's SingleNodeBackend): it owns the sandboxes of this
// worker — admission, creation and undo, exec with streamed logs, deadlines
// enforced while running, snapshots, the warm pool, and recovery after a restart.
package backend

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// LogWriter publishes the log events of one sandbox or build in order.
type LogWriter interface {
	Publish(ev subjects.LogEvent)
	Flush(ctx context.Context) error
}

// Store is the durable state the backend needs (JetStream in the worker).
type Store interface {
	PutSession(ctx context.Context, sb subjects.Sandbox) error
	DeleteSession(ctx context.Context, id string) error
	GetSession(ctx context.Context, id string) (subjects.Sandbox, error)
	ListSessions(ctx context.Context) ([]subjects.Sandbox, error)

	CreateSnapshot(ctx context.Context, rec subjects.SnapshotRecord) error
	// GetSnapshotRevision and ReplaceSnapshot replace a record by
	// compare-and-set on its revision (a rebuilt template).
	GetSnapshotRevision(ctx context.Context, id string) (subjects.SnapshotRecord, uint64, error)
	ReplaceSnapshot(ctx context.Context, rec subjects.SnapshotRecord, rev uint64) error
	GetSnapshot(ctx context.Context, id string) (subjects.SnapshotRecord, error)
	DeleteSnapshot(ctx context.Context, id string) error
	ListSnapshots(ctx context.Context) ([]subjects.SnapshotRecord, error)

	Logs(sandboxID string) LogWriter
	ReadLogs(ctx context.Context, sandboxID string, cursor uint64, limit int) (subjects.LogsReply, error)
	BuildLogs(templateID string) LogWriter
	PublishEvent(ctx context.Context, ev subjects.LifecycleEvent) error
}

// Tokens mints and checks the traffic access tokens of sandboxes (see
// package tokens).
type Tokens interface {
	// MintTraffic makes a new instance of a sandbox: a fresh random
	// generation, kept in the session record, and the traffic token bound to
	// the id and that generation, handed out once in the create reply.
	MintTraffic(sandboxID string) (generation, token string)
	// VerifyTraffic reports, in constant time, whether token is the traffic
	// token of that generation of the sandbox.
	VerifyTraffic(sandboxID, generation, token string) bool
	// EnvdToken is the envd access token of that generation of a secure
	// sandbox (its E2B sandbox API's X-Access-Token).
	EnvdToken(sandboxID, generation string) string
}

// Config configures a Backend.
type Config struct {
	WorkerID string
	Driver   vmpool.Driver
	Store    Store
	Tokens   Tokens
	// Egress enforces network policies; nil when the host cannot (the
	// driver then gives guests no outbound network at all).
	Egress Egress
	// HostPortAllowed says whether an egress "host:PORT" entry may open
	// that host port (the operator's list, never the worker's own ports);
	// nil allows none.
	HostPortAllowed func(port int) bool
	// StateDir holds sandboxes/<id> and snapshots/<sid>.<generation>.
	StateDir string
	// RecordKey authenticates snapshot records (RecordKey(worker secret));
	// at least 32 bytes.
	RecordKey []byte
	// Images are the built-in templates that boot from an image ("tiny").
	Images map[string]vmpool.Image
	// Artifacts shares snapshot artifacts with the other workers of a
	// cluster (nil: snapshots stay on the worker that saved them).
	Artifacts Artifacts
	Limits    Limits
	// PoolTargets are the warm pool targets per template at start.
	PoolTargets map[string]int
	// DefaultResources apply when a create names none (1 vCPU, 256 MiB).
	DefaultResources vmpool.Resources
	// DefaultTimeout is a sandbox's lifetime when a create names none (5 min);
	// MaxTimeout bounds what a request may ask for (24 h).
	DefaultTimeout, MaxTimeout time.Duration
	// ExecDefaultTimeout (60 s) and ExecMaxTimeout (1 h) bound a command.
	ExecDefaultTimeout, ExecMaxTimeout time.Duration
	// ReplyOutputCap is the most bytes of each output stream an exec reply
	// carries (256 KiB); the rest is only in the log stream.
	ReplyOutputCap int
	// MinFreeDiskBytes refuses creates and snapshots with disk_pressure when
	// the state directory's file system has less free space (1 GiB).
	MinFreeDiskBytes uint64
	// FillTimeout bounds one warm fill, every step of it (restore, guest
	// init, warm-up commands) included (default 2 min): a fill that misses
	// it, or one of its steps' own deadlines, has its machine stopped and
	// is counted (pool.status fill_timeouts). A fill still running after a
	// quarter of it (at most 20 s) lets another template's fill start.
	FillTimeout time.Duration
	// LogBytesPerSecond and LogBytesTotal are each sandbox's log budget:
	// output beyond it is dropped (counted, reported in a system log event
	// and the exec reply) rather than filling the shared log stream. The
	// rate allows bursts of four seconds' worth. Defaults 16 MiB/s and
	// 256 MiB; negative: no limit.
	LogBytesPerSecond, LogBytesTotal int64
	// MaxReplyBytes bounds an exec reply after JSON encoding (the server's
	// max payload less headroom; default 1 MiB less 8 KiB).
	MaxReplyBytes int
	Logger        *slog.Logger
	// Subjects names the subjects the worker publishes on (live process
	// output); default prefix when zero.
	Subjects subjects.Subjects
	// Live publishes process and exec output live (see proc.go); nil: no
	// live output, only the log stream.
	Live LivePublisher
}

func (c *Config) setDefaults() error {
	if c.WorkerID == "" || c.Driver == nil || c.Store == nil || c.Tokens == nil || c.StateDir == "" {
		return errors.New("backend: worker id, driver, store, tokens and state dir are required")
	}
	if len(c.RecordKey) < 32 {
		return errors.New("backend: a record key of at least 32 bytes is required (backend.RecordKey of the worker secret)")
	}
	def := DefaultLimits()
	if c.Limits.MaxSessions == 0 {
		c.Limits.MaxSessions = def.MaxSessions
	}
	if c.Limits.MaxVCPUs == 0 {
		c.Limits.MaxVCPUs = def.MaxVCPUs
	}
	if c.Limits.MaxMemoryMB == 0 {
		c.Limits.MaxMemoryMB = def.MaxMemoryMB
	}
	if c.DefaultResources.VCPUs == 0 {
		c.DefaultResources.VCPUs = 1
	}
	if c.DefaultResources.MemoryMB == 0 {
		c.DefaultResources.MemoryMB = 256
	}
	if c.DefaultTimeout == 0 {
		c.DefaultTimeout = 5 * time.Minute
	}
	if c.MaxTimeout == 0 {
		c.MaxTimeout = 24 * time.Hour
	}
	if c.ExecDefaultTimeout == 0 {
		c.ExecDefaultTimeout = 60 * time.Second
	}
	if c.ExecMaxTimeout == 0 {
		c.ExecMaxTimeout = time.Hour
	}
	if c.ReplyOutputCap == 0 {
		c.ReplyOutputCap = 256 << 10
	}
	if c.FillTimeout <= 0 {
		c.FillTimeout = 2 * time.Minute
	}
	if c.MinFreeDiskBytes == 0 {
		c.MinFreeDiskBytes = 1 << 30
	}
	if c.LogBytesPerSecond == 0 {
		c.LogBytesPerSecond = 16 << 20
	}
	if c.LogBytesTotal == 0 {
		c.LogBytesTotal = 256 << 20
	}
	if c.MaxReplyBytes <= 0 {
		c.MaxReplyBytes = 1<<20 - 8<<10
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// Hooks tell the NATS layer when this worker starts and stops owning a sandbox.
type Hooks struct {
	Owned    func(id string)
	Released func(id string)
}

// Backend runs the sandboxes of one worker. It is safe for concurrent use.
type Backend struct {
	cfg       Config
	log       *slog.Logger
	admission *Admission
	hooks     Hooks
	templates *templates
	pool      *vmpool.Pool
	// logDropped counts exec output dropped since start.
	logDropped atomic.Int64

	// ctx owns the machines' lifetimes (not any request's context).
	ctx    context.Context
	cancel context.CancelFunc

	mu       sync.Mutex
	sessions map[string]*session
	creating map[string]bool
	closed   bool
	wg       sync.WaitGroup
	// accel is the accelerator of the last machine adopted.
	accel string
	// awaited are the fetches waiting for a snapshot's artifacts, cut short
	// when its record changes.
	awaited awaitedRecords
	// procs are the sandboxes' processes (proc.go).
	procs   procRegistry
	metrics metricsState // per-sandbox resource samples (metrics.go)
}

// session is one sandbox owned by this worker.
type session struct {
	mu      sync.Mutex
	rec     subjects.Sandbox
	machine vmpool.Machine
	timer   *time.Timer
	ending  bool
	budget  *logBudget // made by the first exec
	// paused: the sandbox is paused (lifecycle.go); machine is then a
	// pausedMachine.
	paused bool
	// life serialises pause, resume and fork of the sandbox.
	life sync.Mutex
}

func (s *session) record() subjects.Sandbox {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.rec
}

// New validates cfg and returns a Backend; call Start before use.
func New(cfg Config) (*Backend, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	for _, dir := range []string{filepath.Join(cfg.StateDir, "sandboxes"), filepath.Join(cfg.StateDir, "snapshots")} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("backend: %w", err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	b := &Backend{
		cfg:       cfg,
		log:       cfg.Logger,
		admission: NewAdmission(cfg.Limits),
		ctx:       ctx,
		cancel:    cancel,
		sessions:  map[string]*session{},
		creating:  map[string]bool{},
	}
	tpl, err := loadTemplates(filepath.Join(cfg.StateDir, "templates"), b.verifyRecord, b.log)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("backend: %w", err)
	}
	b.templates = tpl
	b.pool = b.newPool()
	b.log.Info("admission limits", "max_sandboxes", cfg.Limits.MaxSessions, "max_vcpus", cfg.Limits.MaxVCPUs, "max_memory_mb", cfg.Limits.MaxMemoryMB)
	return b, nil
}

// SetHooks installs the ownership hooks; call it before Start.
func (b *Backend) SetHooks(h Hooks) { b.hooks = h }

// LogDroppedBytes is the exec output dropped since start: over a log budget
// or not stored in the log stream.
func (b *Backend) LogDroppedBytes() int64 { return b.logDropped.Load() }

// Usage reports the worker's admission ledger: what its sandboxes and warm
// machines hold, and its limits.
func (b *Backend) Usage() Usage { return b.admission.Snapshot() }

// WorkerID is this worker's id (the client_id of its sandboxes).
func (b *Backend) WorkerID() string { return b.cfg.WorkerID }

// DriverName is the name of the machine driver in use.
func (b *Backend) DriverName() string { return b.cfg.Driver.Name() }

// Start recovers the sandboxes this worker owned before a restart (machines
// still running are reattached, the rest cleaned up) and starts the warm
// pool. Call EnsureBuiltinTemplates afterwards to make template snapshots of
// the built-in images that lack one.
func (b *Backend) Start(ctx context.Context) error {
	if err := b.recover(ctx); err != nil {
		b.log.Warn("recovery was incomplete", "err", err)
	}
	b.pool.Start()
	for id, n := range b.cfg.PoolTargets {
		b.pool.SetTarget(id, n)
	}
	if err := b.startCluster(ctx); err != nil {
		b.log.Warn("following the cluster's records and settings", "err", err)
	}
	return nil
}

// Stop stops every sandbox of this worker and waits for background work.
func (b *Backend) Stop(ctx context.Context) error {
	b.mu.Lock()
	b.closed = true
	ids := make([]string, 0, len(b.sessions))
	for id := range b.sessions {
		ids = append(ids, id)
	}
	b.mu.Unlock()
	var errs []error
	for _, id := range ids {
		if s, err := b.lookup(id); err == nil && s.isPaused() {
			b.forget(id) // stays paused in the store, resumable after a restart
			continue
		}
		if err := b.end(ctx, id, subjects.EventKilled, "worker shutting down"); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			errs = append(errs, err)
		}
	}
	b.pool.Stop()
	b.cancel()
	b.wg.Wait()
	return errors.Join(errs...)
}

// lookup returns the session of a sandbox owned by this worker.
func (b *Backend) lookup(id string) (*session, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	s, ok := b.sessions[id]
	if !ok {
		return nil, errdefs.Wrap(errdefs.ErrNotFound, fmt.Errorf("sandbox %s not found", id))
	}
	return s, nil
}

// Owns reports whether this worker owns sandbox id.
func (b *Backend) Owns(id string) bool {
	_, err := b.lookup(id)
	return err == nil
}

// Get returns the record of a sandbox this worker owns.
func (b *Backend) Get(_ context.Context, id string) (subjects.Sandbox, error) {
	s, err := b.lookup(id)
	if err != nil {
		return subjects.Sandbox{}, err
	}
	return s.record().WithoutTokens(), nil
}

// List returns the sandboxes of the whole cluster, from the sessions bucket,
// without tokens.
func (b *Backend) List(ctx context.Context) ([]subjects.Sandbox, error) {
	list, err := b.cfg.Store.ListSessions(ctx)
	for i := range list {
		list[i] = list[i].WithoutTokens()
	}
	return list, err
}

// Kill stops and deletes a sandbox.
func (b *Backend) Kill(ctx context.Context, id string) (subjects.KillReply, error) {
	if err := b.end(ctx, id, subjects.EventKilled, "killed on request"); err != nil {
		return subjects.KillReply{}, err
	}
	return subjects.KillReply{SandboxID: id, State: subjects.StateStopped}, nil
}

// SetTimeout moves a sandbox's deadline to now + timeout.
func (b *Backend) SetTimeout(ctx context.Context, id string, req subjects.TimeoutRequest) (subjects.Sandbox, error) {
	if req.TimeoutS <= 0 || time.Duration(req.TimeoutS)*time.Second > b.cfg.MaxTimeout {
		return subjects.Sandbox{}, invalid("timeout_s %d: want 1..%d", req.TimeoutS, int(b.cfg.MaxTimeout/time.Second))
	}
	s, err := b.lookup(id)
	if err != nil {
		return subjects.Sandbox{}, err
	}
	s.mu.Lock()
	s.rec.EndAt = time.Now().UTC().Add(time.Duration(req.TimeoutS) * time.Second).Truncate(time.Second)
	rec := s.rec.WithoutTokens()
	s.mu.Unlock()
	b.armDeadline(s)
	if err := b.putSession(ctx, rec); err != nil {
		return rec, fmt.Errorf("store session %s: %w", id, err)
	}
	return rec, nil
}

// armDeadline (re)starts the timer that ends the sandbox at its end_at.
func (b *Backend) armDeadline(s *session) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.timer != nil {
		s.timer.Stop()
	}
	id := s.rec.SandboxID
	s.timer = time.AfterFunc(time.Until(s.rec.EndAt), func() {
		ctx, cancel := context.WithTimeout(b.ctx, 3*time.Minute)
		defer cancel()
		if b.expire(ctx, id) {
			return // paused instead (on_timeout pause)
		}
		if err := b.end(ctx, id, subjects.EventExpired, "deadline reached"); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			b.log.Warn("expire sandbox", "sandbox", id, "err", err)
		}
	})
}

// end stops a sandbox, removes its record and tells the NATS layer.
func (b *Backend) end(ctx context.Context, id, kind, reason string) error {
	b.mu.Lock()
	s, ok := b.sessions[id]
	if ok {
		delete(b.sessions, id)
	}
	b.mu.Unlock()
	if !ok {
		return errdefs.Wrap(errdefs.ErrNotFound, fmt.Errorf("sandbox %s not found", id))
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
	var errs []error
	if err := s.mach().Stop(ctx); err != nil {
		errs = append(errs, fmt.Errorf("stop machine: %w", err))
	}
	b.endProcs(id)
	b.removeEgress(ctx, id, s.mach())
	b.admission.Release(id)
	if err := b.cfg.Store.DeleteSession(ctx, id); err != nil {
		errs = append(errs, err)
	}
	b.dropSnapshots(id, s.record().DiskParent)
	b.systemLog(ctx, id, fmt.Sprintf("sandbox %s: %s", kind, reason))
	b.event(ctx, kind, id, reason)
	b.log.Info("sandbox ended", "sandbox", id, "kind", kind, "reason", reason)
	return errors.Join(errs...)
}

// systemLog writes one system event to the sandbox's log stream.
func (b *Backend) systemLog(ctx context.Context, id, msg string) {
	w := b.cfg.Store.Logs(id)
	w.Publish(subjects.NewLogEvent(subjects.SourceSystem, id, "", []byte(msg)))
	if err := w.Flush(ctx); err != nil {
		b.log.Warn("write system log", "sandbox", id, "err", err)
	}
}

func (b *Backend) event(ctx context.Context, kind, id, reason string) {
	ev := subjects.LifecycleEvent{Kind: kind, SandboxID: id, WorkerID: b.cfg.WorkerID, Time: time.Now().UTC(), Reason: reason}
	if err := b.cfg.Store.PublishEvent(ctx, ev); err != nil {
		b.log.Warn("publish lifecycle event", "sandbox", id, "kind", kind, "err", err)
	}
}

// checkDisk fails with disk_pressure when the state dir's file system is
// short of space.
func (b *Backend) checkDisk() error {
	var st unix.Statfs_t
	if err := unix.Statfs(b.cfg.StateDir, &st); err != nil {
		return fmt.Errorf("statfs %s: %w", b.cfg.StateDir, err)
	}
	free := st.Bavail * uint64(st.Bsize)
	if free < b.cfg.MinFreeDiskBytes {
		return errdefs.Wrap(errdefs.ErrDiskPressure, fmt.Errorf("only %d MiB free on the worker's state file system (need %d MiB)", free>>20, b.cfg.MinFreeDiskBytes>>20))
	}
	return nil
}

// NewID returns a random lowercase alphanumeric id of n characters that
// starts with a letter (a DNS label and a subject token).
func NewID(n int) string {
	const letters = "abcdefghijklmnopqrstuvwxyz"
	const alnum = letters + "0123456789"
	buf := make([]byte, n)
	_, _ = rand.Read(buf)
	for i := range buf {
		set := alnum
		if i == 0 {
			set = letters
		}
		buf[i] = set[int(buf[i])%len(set)]
	}
	return string(buf)
}

func invalid(format string, args ...any) error {
	return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf(format, args...))
}

// Logs returns a page of a sandbox's log events (they outlive the sandbox).
func (b *Backend) Logs(ctx context.Context, id string, req subjects.LogsRequest) (subjects.LogsReply, error) {
	return b.cfg.Store.ReadLogs(ctx, id, req.Cursor, req.Limit)
}

// wakeTimeout bounds the resume of a paused sandbox that traffic wakes.
const wakeTimeout = 2 * time.Minute

// RouteTarget is how the port proxy reaches a sandbox's guest ports.
type RouteTarget struct {
	Dial   func(ctx context.Context, port int) (net.Conn, error)
	Public bool
	// VerifyToken reports, in constant time, whether a presented traffic
	// token opens this instance of the sandbox.
	VerifyToken func(token string) bool
	// Secure is set for a sandbox created with secure: its E2B sandbox API
	// takes only requests that carry EnvdToken (in X-Access-Token, or a
	// signature made with it).
	Secure bool
	// EnvdToken is the envd access token of this instance of a secure
	// sandbox; empty otherwise. Compare with tokens.Equal.
	EnvdToken string
}

// Target returns the route target of a sandbox this worker owns. It never
// wakes a paused sandbox itself: one created with auto_resume gets a Dial
// that resumes it, which the proxy calls only after the request passed the
// token check (an unauthenticated client cannot keep resuming sandboxes).
func (b *Backend) Target(ctx context.Context, id string) (RouteTarget, error) {
	s, err := b.lookup(id)
	if err != nil {
		return RouteTarget{}, err
	}
	rec := s.record()
	dial := s.mach().DialGuest
	if s.isPaused() {
		if !rec.AutoResume {
			return RouteTarget{}, errPaused(id)
		}
		dial = func(ctx context.Context, port int) (net.Conn, error) {
			// A resume outlives the dial's own deadline: stopped halfway
			// it would only have to start again.
			wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), wakeTimeout)
			defer cancel()
			if err := b.Wake(wctx, id); err != nil {
				return nil, err
			}
			s, err := b.lookup(id)
			if err != nil {
				return nil, err
			}
			return s.mach().DialGuest(ctx, port)
		}
	}
	gen := rec.Generation
	verify := func(token string) bool { return b.cfg.Tokens.VerifyTraffic(id, gen, token) }
	t := RouteTarget{Dial: dial, Public: rec.PublicTraffic, VerifyToken: verify, Secure: rec.Secure}
	if rec.Secure {
		t.EnvdToken = b.cfg.Tokens.EnvdToken(id, gen)
	}
	return t, nil
}

// Accelerator names the accelerator of this worker's machines (e.g. "kvm"
// or "tcg"), as reported by the last sandbox started; empty before that or
// when the driver does not say.
func (b *Backend) Accelerator() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.accel
}
