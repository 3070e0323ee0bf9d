package vmpool

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
)

// FillFunc makes one warm machine for key (a template snapshot id). It
// returns only once the machine's agent answered.
type FillFunc func(ctx context.Context, key string) (Machine, error)

// PoolConfig configures a Pool.
type PoolConfig struct {
	Fill FillFunc
	// Release is called for every machine the pool gives up (drained,
	// evicted, failed a health check), after it was stopped.
	Release func(m Machine)
	// Concurrency bounds fills running at once across all keys (default 1),
	// so refills never starve requests of CPU. A key has at most one fill
	// running, and keys take turns.
	Concurrency int
	// FillTimeout bounds one fill (default 2 min): the fill's context ends
	// then, the fill must stop its machine, and the timeout is counted.
	FillTimeout time.Duration
	// SlowFill is how long a fill holds its concurrency slot (default 20s):
	// a fill still running then gives it up to another key, so one key's
	// hung guest delays other keys' fills by at most this long.
	SlowFill time.Duration
	// HealthTimeout bounds the ping a machine must answer when it is taken
	// (default 500ms).
	HealthTimeout time.Duration
	// MaxBackoff caps the wait between failed fills of a key (default 30s).
	MaxBackoff time.Duration
	Logger     *slog.Logger
}

// PoolStatus is one key's state.
type PoolStatus struct {
	Key        string
	Target     int
	Ready      int
	InProgress int
	LastError  string
	// FillTimeouts counts fills that missed FillTimeout or a deadline of
	// one of their steps.
	FillTimeouts int
}

// Pool keeps, per key, a target number of warm machines whose agent answered,
// hands them out newest first and refills in the background with backoff.
type Pool struct {
	cfg   PoolConfig
	log   *slog.Logger
	sem   chan struct{}
	ctx   context.Context
	stop  context.CancelFunc
	wg    sync.WaitGroup
	mu    sync.Mutex
	keys  map[string]*poolKey
	last  string // the key that took the last slot; the next turn starts after it
	kick  chan struct{}
	start sync.Once
}

type poolKey struct {
	target     int
	ready      []Machine
	inProgress int
	failures   int
	notBefore  time.Time
	lastError  string
	generation int
	timeouts   int
}

// NewPool returns a pool; call Start to begin filling.
func NewPool(cfg PoolConfig) *Pool {
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = 1
	}
	if cfg.HealthTimeout == 0 {
		cfg.HealthTimeout = 500 * time.Millisecond
	}
	if cfg.FillTimeout <= 0 {
		cfg.FillTimeout = 2 * time.Minute
	}
	if cfg.SlowFill <= 0 {
		cfg.SlowFill = 20 * time.Second
	}
	if cfg.MaxBackoff == 0 {
		cfg.MaxBackoff = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Release == nil {
		cfg.Release = func(Machine) {}
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Pool{cfg: cfg, log: cfg.Logger, sem: make(chan struct{}, cfg.Concurrency), ctx: ctx, stop: cancel,
		keys: map[string]*poolKey{}, kick: make(chan struct{}, 1)}
}

// Start begins the background refill loop.
func (p *Pool) Start() {
	p.start.Do(func() {
		p.wg.Add(1)
		go p.loop()
	})
}

// SetTarget sets how many warm machines key should have. Lowering it stops
// the surplus at once; 0 drains the key.
func (p *Pool) SetTarget(key string, n int) {
	p.mu.Lock()
	k := p.key(key)
	k.target = max(n, 0)
	var surplus []Machine
	if len(k.ready) > k.target {
		surplus = append(surplus, k.ready[:len(k.ready)-k.target]...) // oldest first
		k.ready = append([]Machine(nil), k.ready[len(k.ready)-k.target:]...)
	}
	k.failures, k.notBefore = 0, time.Time{}
	p.mu.Unlock()
	p.discard(surplus)
	p.wake()
}

// Target returns key's target.
func (p *Pool) Target(key string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if k, ok := p.keys[key]; ok {
		return k.target
	}
	return 0
}

// Drain stops every warm machine of key (its template changed); machines
// being filled for the old generation are dropped when they arrive. The
// target stays, so the pool refills from the new template.
func (p *Pool) Drain(key string) {
	p.mu.Lock()
	k := p.key(key)
	old := k.ready
	k.ready = nil
	k.generation++
	p.mu.Unlock()
	p.discard(old)
	p.wake()
}

// Take hands out the newest warm machine of key whose agent answers a ping.
// It returns false when none is ready. The pool refills in the background.
func (p *Pool) Take(ctx context.Context, key string) (Machine, bool) {
	for {
		p.mu.Lock()
		k, ok := p.keys[key]
		if !ok || len(k.ready) == 0 {
			p.mu.Unlock()
			return nil, false
		}
		m := k.ready[len(k.ready)-1]
		k.ready = k.ready[:len(k.ready)-1]
		p.mu.Unlock()
		p.wake()
		pctx, cancel := context.WithTimeout(ctx, p.cfg.HealthTimeout)
		err := m.Ping(pctx)
		cancel()
		if err == nil {
			return m, true
		}
		p.log.Warn("warm machine failed its health check; discarding it", "key", key, "machine", m.ID(), "err", err)
		// Stopping a hung machine can take the stop timeout; the caller
		// should not wait for it.
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.discard([]Machine{m})
		}()
	}
}

// Remove stops the warm machine with id (capacity eviction). It reports
// whether the pool had it.
func (p *Pool) Remove(id string) bool {
	p.mu.Lock()
	var found Machine
	for _, k := range p.keys {
		for i, m := range k.ready {
			if m.ID() == id {
				found = m
				k.ready = append(k.ready[:i:i], k.ready[i+1:]...)
				break
			}
		}
	}
	p.mu.Unlock()
	if found != nil {
		p.discard([]Machine{found})
	}
	return found != nil
}

// Status reports every key, sorted.
func (p *Pool) Status() []PoolStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]PoolStatus, 0, len(p.keys))
	for key, k := range p.keys {
		out = append(out, PoolStatus{Key: key, Target: k.target, Ready: len(k.ready), InProgress: k.inProgress, LastError: k.lastError, FillTimeouts: k.timeouts})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out
}

// Stop ends refilling, waits for fills in progress and stops every warm machine.
func (p *Pool) Stop() {
	p.stop()
	p.wg.Wait()
	p.mu.Lock()
	var all []Machine
	for _, k := range p.keys {
		all = append(all, k.ready...)
		k.ready = nil
	}
	p.mu.Unlock()
	p.discard(all)
}

func (p *Pool) key(key string) *poolKey {
	k, ok := p.keys[key]
	if !ok {
		k = &poolKey{}
		p.keys[key] = k
	}
	return k
}

func (p *Pool) wake() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

func (p *Pool) discard(ms []Machine) {
	for _, m := range ms {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := m.Stop(ctx); err != nil {
			p.log.Warn("stop warm machine", "machine", m.ID(), "err", err)
		}
		cancel()
		p.cfg.Release(m)
	}
}

// loop starts fills while some key is below target, at most Concurrency at
// once, honouring each key's backoff.
func (p *Pool) loop() {
	defer p.wg.Done()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		next := p.startFills()
		if next > 0 {
			timer.Reset(next)
		}
		select {
		case <-p.ctx.Done():
			return
		case <-p.kick:
		case <-timer.C:
		}
	}
}

// startFills launches what it can and returns when to look again (0: on the
// next kick only). Keys take turns, starting after the key served last; a
// key has at most one fill running.
func (p *Pool) startFills() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	var wait time.Duration
	now := time.Now()
	keys := make([]string, 0, len(p.keys))
	for key := range p.keys {
		keys = append(keys, key)
	}
	sort.Strings(keys)
	turn := sort.SearchStrings(keys, p.last+"\x00") // the first key after last
	keys = append(keys[turn:], keys[:turn]...)
	for _, key := range keys {
		k := p.keys[key]
		if k.inProgress > 0 || len(k.ready) >= k.target {
			continue
		}
		if now.Before(k.notBefore) {
			if d := k.notBefore.Sub(now); wait == 0 || d < wait {
				wait = d
			}
			continue
		}
		select {
		case p.sem <- struct{}{}:
		default:
			return wait // all fill slots busy; a finishing or slow fill kicks us
		}
		k.inProgress++
		p.last = key
		p.wg.Add(1)
		go p.fill(key, k.generation)
	}
	return wait
}

func (p *Pool) fill(key string, generation int) {
	defer p.wg.Done()
	ctx, cancel := context.WithTimeout(p.ctx, p.cfg.FillTimeout)
	defer cancel()
	var once sync.Once
	release := func() {
		once.Do(func() {
			<-p.sem
			p.wake()
		})
	}
	slow := time.AfterFunc(p.cfg.SlowFill, release)
	t0 := time.Now()
	m, err := p.cfg.Fill(ctx, key)
	slow.Stop()
	// The fill's deadline, or one of its steps' own (a guest that never
	// answered): either way a machine missed a deadline and was stopped.
	timedOut := err != nil && p.ctx.Err() == nil &&
		(errors.Is(ctx.Err(), context.DeadlineExceeded) || errors.Is(err, context.DeadlineExceeded))
	p.mu.Lock()
	k := p.key(key)
	k.inProgress--
	var drop Machine
	switch {
	case err != nil:
		k.failures++
		k.lastError = err.Error()
		if timedOut {
			k.timeouts++
			k.lastError = fmt.Sprintf("fill timed out after %s: %v", time.Since(t0).Round(time.Millisecond), err)
		}
		bo := backoff.NewExponentialBackOff(backoff.WithInitialInterval(200*time.Millisecond), backoff.WithMaxInterval(p.cfg.MaxBackoff))
		var d time.Duration
		for i := 0; i < k.failures; i++ {
			d = bo.NextBackOff()
		}
		k.notBefore = time.Now().Add(d)
	case generation != k.generation || len(k.ready) >= k.target || p.ctx.Err() != nil:
		drop = m // template changed or target lowered meanwhile
	default:
		k.failures, k.lastError = 0, ""
		k.ready = append(k.ready, m)
	}
	p.mu.Unlock()
	release() // after the key's state is updated, so the next turn sees it
	if err != nil && !errors.Is(err, context.Canceled) {
		p.log.Warn("warm pool fill failed", "key", key, "timed_out", timedOut, "err", err)
	}
	if drop != nil {
		p.discard([]Machine{drop})
	}
	p.wake()
}
