package backend

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/firkin-dev/firkin-worker/agent"
	"github.com/firkin-dev/firkin-worker/internal/procstat"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// MetricsConfig configures the per-sandbox resource sampler.
type MetricsConfig struct {
	// Every is the sampling period (default 5 s).
	Every time.Duration
	// Keep is how many samples each sandbox keeps for its metrics reply
	// (default 60: five minutes at 5 s).
	Keep int
	// Publish, when set, gets every sample (the worker publishes it on
	// firkin.metrics.<id>, into a stream with short retention).
	Publish func(ctx context.Context, m subjects.SandboxMetrics) error
}

// metricsState is the sampler's state: the samples kept per sandbox and
// what the next rates are computed from.
type metricsState struct {
	mu    sync.Mutex
	cfg   MetricsConfig
	on    bool
	rings map[string][]subjects.SandboxMetrics
	prev  map[string]counters
}

// counters are the cumulative values a rate is computed from.
type counters struct {
	at                  time.Time
	hostTicks           uint64
	guestBusy, guestAll uint64
	guest               bool
}

// guestStatsTimeout bounds one guest's answer to a sample.
const guestStatsTimeout = 2 * time.Second

// StartMetrics samples every owned sandbox's resources every cfg.Every
// until the backend stops. Call it once, after Start.
func (b *Backend) StartMetrics(cfg MetricsConfig) {
	if cfg.Every <= 0 {
		cfg.Every = 5 * time.Second
	}
	if cfg.Keep <= 0 {
		cfg.Keep = 60
	}
	b.metrics.mu.Lock()
	if b.metrics.on {
		b.metrics.mu.Unlock()
		return
	}
	b.metrics.on, b.metrics.cfg = true, cfg
	b.metrics.rings = map[string][]subjects.SandboxMetrics{}
	b.metrics.prev = map[string]counters{}
	b.metrics.mu.Unlock()
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		t := time.NewTicker(cfg.Every)
		defer t.Stop()
		for {
			select {
			case <-b.ctx.Done():
				return
			case <-t.C:
				b.sampleAll(b.ctx)
			}
		}
	}()
}

// SandboxMetrics answers firkin.sandbox.<id>.metrics: the latest sample and
// the ones kept before it, oldest first.
func (b *Backend) SandboxMetrics(_ context.Context, id string) (subjects.MetricsReply, error) {
	if _, err := b.lookup(id); err != nil {
		return subjects.MetricsReply{}, err
	}
	b.metrics.mu.Lock()
	defer b.metrics.mu.Unlock()
	if !b.metrics.on {
		return subjects.MetricsReply{}, invalid("this worker does not sample sandbox metrics")
	}
	hist := slices.Clone(b.metrics.rings[id])
	reply := subjects.MetricsReply{History: hist}
	if hist == nil {
		reply.History = []subjects.SandboxMetrics{}
	} else {
		last := hist[len(hist)-1]
		reply.Latest = &last
	}
	return reply, nil
}

// sampleAll takes one sample of every owned sandbox and forgets the
// samples of sandboxes that are gone.
func (b *Backend) sampleAll(ctx context.Context) {
	b.mu.Lock()
	owned := make(map[string]*session, len(b.sessions))
	for id, s := range b.sessions {
		owned[id] = s
	}
	b.mu.Unlock()
	b.metrics.mu.Lock()
	for id := range b.metrics.rings {
		if owned[id] == nil {
			delete(b.metrics.rings, id)
			delete(b.metrics.prev, id)
		}
	}
	cfg := b.metrics.cfg
	b.metrics.mu.Unlock()
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for id, s := range owned {
		if s.isPaused() {
			continue // no machine to measure
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			m := b.sample(ctx, id, s)
			if cfg.Publish != nil {
				if err := cfg.Publish(ctx, m); err != nil && ctx.Err() == nil {
					b.log.Debug("publish sandbox metrics", "sandbox", id, "err", err)
				}
			}
		}()
	}
	wg.Wait()
}

// sample measures one sandbox and keeps the sample.
func (b *Backend) sample(ctx context.Context, id string, s *session) subjects.SandboxMetrics {
	now := time.Now()
	m := subjects.SandboxMetrics{SandboxID: id, At: now.UTC(), HostCPUPercent: -1, GuestCPUPercent: -1}
	cur := counters{at: now}
	if p, ok := s.mach().(interface{ PID() int }); ok && p.PID() > 0 {
		if st, err := procstat.Read(p.PID()); err == nil {
			cur.hostTicks, m.HostRSSBytes = st.CPUTicks(), st.RSSPages*uint64(os.Getpagesize())
		}
	}
	m.HostDiskBytes = overlayBytes(s.mach().Dir())
	if am, ok := s.mach().(agentMachine); ok {
		if c, err := am.Agent(); err == nil {
			sctx, cancel := context.WithTimeout(ctx, guestStatsTimeout)
			st, err := c.Stats(sctx)
			cancel()
			if err == nil {
				setGuest(&m, st)
				cur.guest, cur.guestBusy, cur.guestAll = true, st.CPUBusy, st.CPUTotal
			} else {
				m.Error = "guest stats: " + err.Error()
			}
		}
	}
	b.metrics.mu.Lock()
	defer b.metrics.mu.Unlock()
	if prev, ok := b.metrics.prev[id]; ok {
		dt := now.Sub(prev.at)
		m.IntervalMS = dt.Milliseconds()
		if dt > 0 && cur.hostTicks >= prev.hostTicks && cur.hostTicks > 0 {
			m.HostCPUPercent = float64(cur.hostTicks-prev.hostTicks) / procstat.ClockTicks / dt.Seconds() * 100
		}
		if cur.guest && prev.guest && cur.guestAll > prev.guestAll && cur.guestBusy >= prev.guestBusy {
			// The guest's word: busy cannot outgrow all.
			m.GuestCPUPercent = min(100, float64(cur.guestBusy-prev.guestBusy)/float64(cur.guestAll-prev.guestAll)*100)
		}
	}
	b.metrics.prev[id] = cur
	ring := append(b.metrics.rings[id], m)
	if len(ring) > b.metrics.cfg.Keep {
		ring = slices.Delete(ring, 0, len(ring)-b.metrics.cfg.Keep)
	}
	b.metrics.rings[id] = ring
	return m
}

func setGuest(m *subjects.SandboxMetrics, st agent.GuestStats) {
	m.GuestMemTotal, m.GuestMemUsed = st.MemTotal, st.MemTotal-st.MemAvailable
	m.GuestDiskTotal, m.GuestDiskUsed = st.DiskTotal, st.DiskUsed
	m.GuestNetRxBytes, m.GuestNetTxBytes = st.NetRx, st.NetTx
}

// overlayBytes is the disk space the machine's overlays take (blocks
// allocated, not their apparent size).
func overlayBytes(dir string) uint64 {
	if dir == "" {
		return 0
	}
	files, _ := filepath.Glob(filepath.Join(dir, "overlay-*.qcow2"))
	var n uint64
	for _, f := range files {
		var st syscall.Stat_t
		if syscall.Lstat(f, &st) == nil {
			n += uint64(st.Blocks) * 512
		}
	}
	return n
}
