package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	js "github.com/nats-io/nats.go/jetstream"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// DefaultInterval is how often a worker puts its heartbeat.
const DefaultInterval = 2 * time.Second

// DefaultDrainTimeout is how long a drain lets running jobs go on before
// it hands them back to the queue.
const DefaultDrainTimeout = 5 * time.Minute

// MaxDrainTimeout bounds a drain request's timeout_s.
const MaxDrainTimeout = time.Hour

// fullScanEvery is how many beats pass between scans of every session
// record when no member left (a safety net: a member that leaves is
// noticed at the next beat, and scanned for then).
const fullScanEvery = 15

// maxSessionBytes bounds a session record read by lost detection.
const maxSessionBytes = 64 << 10

// Status is what a worker reports of itself at every heartbeat.
type Status struct {
	Accelerator string
	Capacity    subjects.WorkerCapacity
	Load        subjects.WorkerLoad
}

// Jobs is the worker's job runner as a drain sees it.
type Jobs interface {
	// Drain stops taking jobs and waits for the running ones; when ctx
	// ends first it hands them back to the queue (another worker takes
	// them) and returns once they are.
	Drain(ctx context.Context) error
	// Running is the number of jobs running now.
	Running() int
}

// Warm is the worker's warm pool as a drain sees it.
type Warm interface {
	// ReleaseWarm stops refilling the warm pool and stops its machines.
	ReleaseWarm(ctx context.Context) error
}

// Config configures a Membership.
type Config struct {
	Subjects subjects.Subjects
	WorkerID string
	Version  string
	Driver   string
	// Conn is the worker's store connection: the KV buckets, lost events
	// and forwarded creates go through it.
	Conn *nats.Conn
	// Interval between heartbeats (DefaultInterval). TTL is how long a
	// heartbeat lives in the bucket (default 3 intervals and a half); a
	// worker whose heartbeat expired is gone. When the bucket exists with
	// a longer TTL, that one is kept.
	Interval, TTL time.Duration
	// SessionsBucket is the KV bucket of session records (firkin_sessions).
	SessionsBucket string
	// Replicas of the bucket in a cluster (1).
	Replicas int
	// Margin is placement's "clearly more room" (DefaultMargin).
	Margin float64
	// DefaultNeed is what a create that names no resources needs (1 vCPU,
	// 256 MiB).
	DefaultNeed Need
	// DrainTimeout is a drain's default timeout (DefaultDrainTimeout).
	DrainTimeout time.Duration
	// Status reports capacity and load (required).
	Status func() Status
	Jobs   Jobs // nil: no jobs to drain
	Warm   Warm // nil: no warm pool to release
	// Rejoined is called after a heartbeat that came longer than the TTL
	// after the previous one: the others may have judged this worker gone
	// and marked its sandboxes lost (nil: nothing to do).
	Rejoined func(ctx context.Context)
	Logger   *slog.Logger
}

// Membership is one worker's heartbeat and view of the cluster. Construct
// it with Start; Stop deletes the heartbeat.
type Membership struct {
	cfg      Config
	log      *slog.Logger
	workers  js.KeyValue
	sessions js.KeyValue
	js       js.JetStream
	ttl      time.Duration
	started  time.Time

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	// Lost detection (the beat loop's own): the members last seen, and
	// whether a scan of the sessions is due.
	prevLive map[string]bool
	scanDue  bool
	ticks    int

	beatMu   sync.Mutex
	lastBeat time.Time // of the last successful put (under beatMu)
	// heldUntil: no beats before then (Hold).
	heldUntil time.Time

	mu        sync.Mutex
	state     string
	members   []subjects.WorkerRecord // as last read
	drainDone chan struct{}
	stopped   bool
}

// Start creates or updates the bucket, puts the first heartbeat and starts
// beating every interval (each beat also reads the members and marks the
// sessions of gone workers lost).
func Start(ctx context.Context, cfg Config) (*Membership, error) {
	if cfg.Conn == nil || cfg.Status == nil {
		return nil, errors.New("cluster: a connection and a status function are required")
	}
	if err := ValidateWorkerID(cfg.WorkerID); err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}
	if cfg.Subjects.Prefix == "" {
		cfg.Subjects = subjects.Default
	}
	if cfg.Interval <= 0 {
		cfg.Interval = DefaultInterval
	}
	if cfg.TTL <= 0 {
		cfg.TTL = 3*cfg.Interval + cfg.Interval/2
	}
	if cfg.TTL < 2*cfg.Interval {
		return nil, fmt.Errorf("cluster: heartbeat TTL %s must be at least two intervals (%s)", cfg.TTL, cfg.Interval)
	}
	if cfg.SessionsBucket == "" {
		cfg.SessionsBucket = "firkin_sessions"
	}
	if cfg.Replicas <= 0 {
		cfg.Replicas = 1
	}
	if cfg.Margin <= 0 {
		cfg.Margin = DefaultMargin
	}
	if cfg.DefaultNeed.VCPUs <= 0 {
		cfg.DefaultNeed.VCPUs = 1
	}
	if cfg.DefaultNeed.MemoryMB <= 0 {
		cfg.DefaultNeed.MemoryMB = 256
	}
	if cfg.DrainTimeout <= 0 {
		cfg.DrainTimeout = DefaultDrainTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	j, err := js.New(cfg.Conn)
	if err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}
	m := &Membership{cfg: cfg, log: cfg.Logger, js: j, ttl: cfg.TTL, started: time.Now().UTC().Truncate(time.Millisecond), state: subjects.WorkerActive}
	// The bucket's TTL is the longest any worker asked for: a shorter one
	// would expire a slower worker's heartbeat between its beats.
	if kv, err := j.KeyValue(ctx, Bucket); err == nil {
		if st, err := kv.Status(ctx); err == nil && st.TTL() > m.ttl {
			m.ttl = st.TTL()
		}
	}
	if m.workers, err = j.CreateOrUpdateKeyValue(ctx, js.KeyValueConfig{
		Bucket: Bucket, Description: "firkin worker heartbeats", TTL: m.ttl, History: 1,
		MaxValueSize: MaxRecordBytes, Replicas: cfg.Replicas,
	}); err != nil {
		return nil, fmt.Errorf("cluster: bucket %s: %w", Bucket, err)
	}
	if m.sessions, err = j.KeyValue(ctx, cfg.SessionsBucket); err != nil {
		return nil, fmt.Errorf("cluster: bucket %s: %w", cfg.SessionsBucket, err)
	}
	if err := m.beat(ctx); err != nil {
		return nil, err
	}
	if list, err := m.Members(ctx); err == nil {
		m.setMembers(list)
	}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	m.wg.Add(1)
	go m.loop()
	m.log.Info("joined the cluster", "interval", cfg.Interval, "ttl", m.ttl)
	return m, nil
}

// LostWithin is the bound on how long after a worker's last heartbeat its
// sessions are marked lost: the bucket's TTL and one interval.
func (m *Membership) LostWithin() time.Duration { return m.ttl + m.cfg.Interval }

func (m *Membership) loop() {
	defer m.wg.Done()
	t := time.NewTicker(m.cfg.Interval)
	defer t.Stop()
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-t.C:
		}
		m.tick()
	}
}

// tick is one heartbeat: put our record, read the members, mark the
// sessions of gone workers lost.
func (m *Membership) tick() {
	ctx, cancel := context.WithTimeout(m.ctx, max(2*m.cfg.Interval, 5*time.Second))
	defer cancel()
	m.mu.Lock()
	held := time.Now().Before(m.heldUntil)
	m.mu.Unlock()
	if held {
		return
	}
	m.beatMu.Lock()
	gap := time.Since(m.lastBeat)
	m.beatMu.Unlock()
	if err := m.beat(ctx); err != nil {
		if m.ctx.Err() == nil {
			m.log.Warn("heartbeat", "err", err)
		}
		return
	}
	if gap > m.ttl && m.cfg.Rejoined != nil {
		m.log.Warn("heartbeat back after a gap longer than its TTL: reconciling sandboxes", "gap", gap.Round(time.Millisecond), "ttl", m.ttl)
		m.cfg.Rejoined(ctx)
	}
	list, err := m.Members(ctx)
	if err != nil {
		if m.ctx.Err() == nil {
			m.log.Warn("read cluster members", "err", err)
		}
		return
	}
	m.setMembers(list)
	live := map[string]bool{}
	for _, w := range list {
		live[w.WorkerID] = true
	}
	if !live[m.cfg.WorkerID] {
		// Our own beat is not in what we read: our view is not to be
		// trusted to judge others.
		return
	}
	// Scan the sessions when a member left since the last beat, at the
	// first beat, and every fullScanEvery beats.
	m.ticks++
	if m.prevLive == nil || m.ticks%fullScanEvery == 0 {
		m.scanDue = true
	}
	for id := range m.prevLive {
		if !live[id] {
			m.scanDue = true
		}
	}
	m.prevLive = live
	if !m.scanDue {
		return
	}
	if err := m.markLost(ctx, live); err != nil {
		if m.ctx.Err() == nil {
			m.log.Warn("lost session detection", "err", err)
		}
		return
	}
	m.scanDue = false
}

// Record is this worker's heartbeat as of now.
func (m *Membership) Record() subjects.WorkerRecord {
	st := m.cfg.Status()
	m.mu.Lock()
	state := m.state
	m.mu.Unlock()
	return subjects.WorkerRecord{
		WorkerID: m.cfg.WorkerID, Version: m.cfg.Version, Driver: m.cfg.Driver, Accelerator: st.Accelerator,
		State: state, Capacity: st.Capacity, Load: st.Load, StartedAt: m.started,
		UpdatedAt: time.Now().UTC().Truncate(time.Millisecond),
	}
}

func (m *Membership) beat(ctx context.Context) error {
	// One beat at a time: a beat of the loop must not put an older state
	// after a drain put a newer one.
	m.beatMu.Lock()
	defer m.beatMu.Unlock()
	data, err := json.Marshal(m.Record())
	if err != nil {
		return fmt.Errorf("cluster: encode heartbeat: %w", err)
	}
	if _, err := m.workers.Put(ctx, m.cfg.WorkerID, data); err != nil {
		return fmt.Errorf("cluster: put heartbeat: %w", err)
	}
	m.lastBeat = time.Now()
	return nil
}

// Hold skips the heartbeats (and the lost scans) of the next d, as if this
// worker were cut off from NATS: for tests of what a partition does.
func (m *Membership) Hold(d time.Duration) {
	m.mu.Lock()
	m.heldUntil = time.Now().Add(d)
	m.mu.Unlock()
}

// Members reads the live members from the bucket (sorted by id). Records
// that fail validation are logged and left out.
func (m *Membership) Members(ctx context.Context) ([]subjects.WorkerRecord, error) {
	w, err := m.workers.WatchAll(ctx, js.IgnoreDeletes())
	if err != nil {
		return nil, fmt.Errorf("cluster: read members: %w", err)
	}
	defer func() { _ = w.Stop() }()
	out := []subjects.WorkerRecord{}
	for {
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("cluster: read members: %w", ctx.Err())
		case e, ok := <-w.Updates():
			if !ok {
				return nil, errors.New("cluster: read members: watcher closed")
			}
			if e == nil { // all current values seen
				sort.Slice(out, func(i, j int) bool { return out[i].WorkerID < out[j].WorkerID })
				return out, nil
			}
			rec, err := DecodeRecord(e.Key(), e.Value())
			if err != nil {
				m.log.Warn("worker record ignored", "key", e.Key(), "err", err)
				continue
			}
			out = append(out, rec)
		}
	}
}

func (m *Membership) setMembers(list []subjects.WorkerRecord) {
	m.mu.Lock()
	m.members = list
	m.mu.Unlock()
}

// cachedMembers are the members as last read (at most one interval old).
func (m *Membership) cachedMembers() []subjects.WorkerRecord {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.members
}

// markLost marks lost every session record whose worker is not live,
// with a compare-and-set on the record's revision so that of the workers
// that notice it, one marks it and publishes the lost event.
func (m *Membership) markLost(ctx context.Context, live map[string]bool) error {
	lister, err := m.sessions.ListKeys(ctx)
	if errors.Is(err, js.ErrNoKeysFound) {
		return nil
	}
	if err != nil {
		return err
	}
	defer func() { _ = lister.Stop() }()
	var keys []string
	for k := range lister.Keys() {
		keys = append(keys, k)
	}
	var errs []error
	for _, key := range keys {
		if err := m.markOne(ctx, key, live); err != nil {
			errs = append(errs, fmt.Errorf("sandbox %s: %w", key, err))
		}
	}
	return errors.Join(errs...)
}

func (m *Membership) markOne(ctx context.Context, key string, live map[string]bool) error {
	e, err := m.sessions.Get(ctx, key)
	if errors.Is(err, js.ErrKeyNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if len(e.Value()) > maxSessionBytes {
		m.log.Warn("session record ignored", "sandbox", key, "bytes", len(e.Value()))
		return nil
	}
	var head struct {
		ClientID string `json:"client_id"`
		State    string `json:"state"`
	}
	// The record is patched, not re-encoded: fields this build does not
	// know stay as they are.
	var raw map[string]json.RawMessage
	if json.Unmarshal(e.Value(), &head) != nil || json.Unmarshal(e.Value(), &raw) != nil {
		m.log.Warn("session record ignored: not a JSON object", "sandbox", key)
		return nil
	}
	// A paused sandbox has no machine to lose: it stays paused, for its
	// worker to resume when it is back.
	if head.State == subjects.StateLost || head.State == subjects.StatePaused || live[head.ClientID] {
		return nil
	}
	raw["state"] = json.RawMessage(`"` + subjects.StateLost + `"`)
	data, err := json.Marshal(raw)
	if err != nil {
		return err
	}
	if _, err := m.sessions.Update(ctx, key, data, e.Revision()); err != nil {
		if isWrongRevision(err) {
			return nil // another worker marked it, or it changed: judged again next time
		}
		return err
	}
	reason := fmt.Sprintf("worker %s has no live heartbeat (marked by worker %s)", head.ClientID, m.cfg.WorkerID)
	m.log.Info("sandbox marked lost", "sandbox", key, "owner", head.ClientID)
	if subjects.ValidateSandboxID(key) != nil {
		return nil // no subject token: no event
	}
	owner := head.ClientID
	if ValidateWorkerID(owner) != nil {
		owner = ""
	}
	ev, _ := json.Marshal(subjects.LifecycleEvent{Kind: subjects.EventLost, SandboxID: key, WorkerID: owner, Time: time.Now().UTC(), Reason: reason})
	if _, err := m.js.Publish(ctx, m.cfg.Subjects.Event(subjects.EventLost, key), ev); err != nil {
		return fmt.Errorf("publish lost event: %w", err)
	}
	return nil
}

func isWrongRevision(err error) bool {
	var apiErr *js.APIError
	return errors.Is(err, js.ErrKeyExists) || errors.Is(err, js.ErrKeyRevisionMismatch) ||
		errors.As(err, &apiErr) && (apiErr.ErrorCode == js.JSErrCodeStreamWrongLastSequence ||
			apiErr.ErrorCode == js.JSErrCodeStreamWrongLastSequenceConstant)
}

// Draining reports whether this worker takes no new creates or jobs.
func (m *Membership) Draining() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.state != subjects.WorkerActive
}

// Place says where a create goes: "" keeps it on this worker, otherwise
// the id of the worker to forward it to. A pinned create (forwarded, or
// sent to this worker's own subject) stays. errdefs.ErrCapacity when this
// worker is draining and the create cannot go elsewhere.
func (m *Membership) Place(_ context.Context, req subjects.CreateSandboxRequest, pinned bool) (string, error) {
	self := m.Record()
	if pinned {
		if self.State != subjects.WorkerActive {
			return "", errdefs.Wrap(errdefs.ErrCapacity, fmt.Errorf("worker %s is %s: it takes no creates", m.cfg.WorkerID, self.State))
		}
		return "", nil
	}
	need := m.cfg.DefaultNeed
	if r := req.Resources; r != nil {
		if r.VCPUs > 0 {
			need.VCPUs = r.VCPUs
		}
		if r.MemoryMB > 0 {
			need.MemoryMB = r.MemoryMB
		}
	}
	target, why := Choose(self, m.cachedMembers(), need, m.cfg.Margin)
	if target == "" && self.State != subjects.WorkerActive {
		return "", errdefs.Wrap(errdefs.ErrCapacity, fmt.Errorf("worker %s is %s and no other worker has room", m.cfg.WorkerID, self.State))
	}
	if target != "" {
		m.log.Debug("create placed on another worker", "target", target, "why", why)
	}
	return target, nil
}

// Forward publishes a create (its body and the client's reply subject) to
// worker target's own create subject, marked as forwarded; the target
// answers the client directly.
func (m *Membership) Forward(_ context.Context, target, reply string, data []byte) error {
	if err := ValidateWorkerID(target); err != nil {
		return err
	}
	msg := nats.NewMsg(m.cfg.Subjects.WorkerCreate(target))
	msg.Reply = reply
	msg.Data = data
	msg.Header.Set(subjects.ForwardedHeader, m.cfg.WorkerID)
	if err := m.cfg.Conn.PublishMsg(msg); err != nil {
		return fmt.Errorf("cluster: forward create to %s: %w", target, err)
	}
	return nil
}

// Drain makes this worker a lame duck: its heartbeat says draining at once
// (placement sends creates elsewhere), it takes no jobs, releases its warm
// machines, lets running jobs finish for the timeout and then hands them
// back, and says drained. Sandboxes keep running until they end. With
// req.Wait the reply comes when it is drained (or ctx ends). A second
// drain joins the first.
func (m *Membership) Drain(ctx context.Context, req subjects.DrainRequest) (subjects.DrainReply, error) {
	timeout := m.cfg.DrainTimeout
	switch {
	case req.TimeoutS < 0 || time.Duration(req.TimeoutS)*time.Second > MaxDrainTimeout:
		return subjects.DrainReply{}, invalid("timeout_s %d: want 0..%d", req.TimeoutS, int(MaxDrainTimeout/time.Second))
	case req.TimeoutS > 0:
		timeout = time.Duration(req.TimeoutS) * time.Second
	}
	m.mu.Lock()
	if m.stopped {
		m.mu.Unlock()
		return subjects.DrainReply{}, errdefs.Wrap(errdefs.ErrFailedPrecondition, errors.New("worker is shutting down"))
	}
	if m.state == subjects.WorkerActive {
		m.state = subjects.WorkerDraining
		m.drainDone = make(chan struct{})
		m.wg.Add(1)
		go m.drain(timeout, m.drainDone)
	}
	done := m.drainDone
	m.mu.Unlock()
	if err := m.beat(ctx); err != nil {
		m.log.Warn("heartbeat", "err", err)
	}
	if req.Wait && done != nil {
		select {
		case <-done:
		case <-ctx.Done():
			return subjects.DrainReply{}, errdefs.Wrap(errdefs.ErrTimeout, fmt.Errorf("drain: not done yet: %w", ctx.Err()))
		}
	}
	rec := m.Record()
	return subjects.DrainReply{WorkerID: m.cfg.WorkerID, State: rec.State, JobsRunning: rec.Load.Jobs, Sandboxes: rec.Load.Sandboxes}, nil
}

func (m *Membership) drain(timeout time.Duration, done chan struct{}) {
	defer m.wg.Done()
	defer close(done)
	m.log.Info("draining", "timeout", timeout)
	if m.cfg.Warm != nil {
		if err := m.cfg.Warm.ReleaseWarm(m.ctx); err != nil {
			m.log.Warn("drain: release warm machines", "err", err)
		}
	}
	if m.cfg.Jobs != nil {
		ctx, cancel := context.WithTimeout(m.ctx, timeout)
		err := m.cfg.Jobs.Drain(ctx)
		cancel()
		if err != nil {
			m.log.Warn("drain: jobs", "err", err)
		}
	}
	m.mu.Lock()
	m.state = subjects.WorkerDrained
	m.mu.Unlock()
	ctx, cancel := context.WithTimeout(m.ctx, 10*time.Second)
	defer cancel()
	if err := m.beat(ctx); err != nil && m.ctx.Err() == nil {
		m.log.Warn("heartbeat", "err", err)
	}
	m.log.Info("drained")
}

// Leave says draining in the heartbeat at once, so no create is placed on
// a worker that is stopping; Stop then deletes the heartbeat.
func (m *Membership) Leave(ctx context.Context) {
	m.mu.Lock()
	if m.state == subjects.WorkerActive {
		m.state = subjects.WorkerDraining
	}
	m.mu.Unlock()
	if err := m.beat(ctx); err != nil {
		m.log.Warn("heartbeat", "err", err)
	}
}

// Stop stops beating and deletes this worker's heartbeat.
func (m *Membership) Stop(ctx context.Context) error {
	m.halt()
	if err := m.workers.Delete(ctx, m.cfg.WorkerID); err != nil && !errors.Is(err, js.ErrKeyNotFound) {
		return fmt.Errorf("cluster: delete heartbeat: %w", err)
	}
	return nil
}

// Abandon stops beating without deleting the heartbeat, as a crashed
// worker would (tests).
func (m *Membership) Abandon() { m.halt() }

func (m *Membership) halt() {
	m.mu.Lock()
	m.stopped = true
	m.mu.Unlock()
	m.cancel()
	m.wg.Wait()
}
