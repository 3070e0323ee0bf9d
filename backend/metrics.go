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
	at        time.Time
	hostTicks uint64
	// guest: stats holds the guest's last answer, read at guestAt (a
	// quiet sandbox's samples carry it, see guestQuiet).
	guest   bool
	guestAt time.Time
	stats   agent.GuestStats
}

// A quiet sandbox's guest is not asked for its counters at every sample:
// under TCG the stats call is most of an idle sandbox's host CPU (the agent
// wakes, reads /proc, answers: 5-13 ms of host CPU, against ~2 ms a second
// for the idle guest kernel), so at 64 idle sandboxes a 5 s sampler alone
// would take over 10 % of a core. A sandbox is quiet when its hypervisor
// process used less than quietHostCPUPercent of a core since the previous
// sample; its guest is then asked at most every guestQuietEvery, and the
// samples between carry the last answer (guest_at says when it was read).
const (
	quietHostCPUPercent = 1.0
	guestQuietEvery     = time.Minute
)

// guestQuiet reports whether a sample may carry the guest's last answer
// instead of asking it: the host CPU over the interval (-1: unknown) is
// below quietHostCPUPercent and the answer is younger than guestQuietEvery.
func guestQuiet(hostCPUPercent float64, answerAge time.Duration) bool {
	return hostCPUPercent >= 0 && hostCPUPercent < quietHostCPUPercent && answerAge >= 0 && answerAge < guestQuietEvery
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
	b.metrics.mu.Lock()
	prev, hadPrev := b.metrics.prev[id]
	b.metrics.mu.Unlock()
	if hadPrev {
		dt := now.Sub(prev.at)
		m.IntervalMS = dt.Milliseconds()
		if dt > 0 && cur.hostTicks >= prev.hostTicks && cur.hostTicks > 0 {
			m.HostCPUPercent = float64(cur.hostTicks-prev.hostTicks) / procstat.ClockTicks / dt.Seconds() * 100
		}
	}
	switch am, ok := s.mach().(agentMachine); {
	case hadPrev && prev.guest && guestQuiet(m.HostCPUPercent, now.Sub(prev.guestAt)):
		// The guest cannot have run more than its hypervisor process:
		// the host's share per vCPU bounds its busy share.
		cur.guest, cur.guestAt, cur.stats = true, prev.guestAt, prev.stats
		setGuest(&m, prev.stats)
		m.GuestAt = prev.guestAt.UTC()
		m.GuestCPUPercent = min(100, m.HostCPUPercent/float64(max(1, s.record().Resources.VCPUs)))
	case ok:
		c, err := am.Agent()
		if err != nil {
			break
		}
		sctx, cancel := context.WithTimeout(ctx, guestStatsTimeout)
		st, err := c.Stats(sctx)
		cancel()
		if err != nil {
			m.Error = "guest stats: " + err.Error()
			break
		}
		setGuest(&m, st)
		cur.guest, cur.guestAt, cur.stats = true, time.Now(), st
		m.GuestAt = cur.guestAt.UTC()
		if hadPrev && prev.guest && st.CPUTotal > prev.stats.CPUTotal && st.CPUBusy >= prev.stats.CPUBusy {
			// The guest's word: busy cannot outgrow all.
			m.GuestCPUPercent = min(100, float64(st.CPUBusy-prev.stats.CPUBusy)/float64(st.CPUTotal-prev.stats.CPUTotal)*100)
		}
	}
	b.metrics.mu.Lock()
	defer b.metrics.mu.Unlock()
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
