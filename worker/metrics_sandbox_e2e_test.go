package worker_test

import (
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/worker"
)

// TestSandboxMetricsE2E: a sandbox's samples come on its metrics subject
// and in its metrics reply, and its CPU figures move when the guest burns
// CPU.
func TestSandboxMetricsE2E(t *testing.T) {
	e := startWorker(t, func(c *worker.Config) { c.SandboxMetricsInterval = time.Second })
	id := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"}).SandboxID
	ctx := e.ctx(3 * time.Minute)

	live := make(chan subjects.SandboxMetrics, 64)
	sub, err := e.clientConn().Subscribe(subjects.Default.Metrics(id), func(m *nats.Msg) {
		var s subjects.SandboxMetrics
		if json.Unmarshal(m.Data, &s) == nil {
			select {
			case live <- s:
			default:
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()

	var idle subjects.SandboxMetrics
	eventually(t, 30*time.Second, "an idle sample with guest figures", func() error {
		r, err := e.c.Metrics(ctx, id)
		if err != nil {
			return err
		}
		if r.Latest == nil || r.Latest.GuestCPUPercent < 0 || r.Latest.HostCPUPercent < 0 {
			return fmt.Errorf("latest %+v", r.Latest)
		}
		idle = *r.Latest
		return nil
	})
	if idle.GuestMemTotal == 0 || idle.GuestMemUsed == 0 || idle.GuestMemUsed > idle.GuestMemTotal ||
		idle.HostRSSBytes == 0 || idle.GuestDiskTotal == 0 || idle.GuestDiskUsed == 0 || idle.HostDiskBytes == 0 {
		t.Fatalf("idle sample %+v", idle)
	}
	select {
	case s := <-live:
		if s.SandboxID != id {
			t.Fatalf("live sample of %q", s.SandboxID)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no sample on the metrics subject")
	}

	// An idle sandbox is quiet: its guest is not asked at every sample,
	// the samples between carry the last answer and say when it was read.
	eventually(t, 30*time.Second, "a quiet sample carrying the guest's last answer", func() error {
		r, err := e.c.Metrics(ctx, id)
		if err != nil {
			return err
		}
		for _, s := range r.History {
			if !s.GuestAt.IsZero() && s.At.Sub(s.GuestAt) >= 900*time.Millisecond && s.GuestMemTotal == idle.GuestMemTotal &&
				s.GuestCPUPercent >= 0 && s.GuestCPUPercent < 5 {
				return nil
			}
		}
		return fmt.Errorf("no quiet sample in %d", len(r.History))
	})

	// Burn the guest's CPU for a few seconds.
	done := make(chan error, 1)
	go func() {
		_, err := e.c.Exec(ctx, id, subjects.ExecRequest{Command: "timeout 6 sh -c 'while :; do :; done'; true"})
		done <- err
	}()
	var busy subjects.SandboxMetrics
	eventually(t, 20*time.Second, "a busy sample", func() error {
		r, err := e.c.Metrics(ctx, id)
		if err != nil {
			return err
		}
		if r.Latest.GuestCPUPercent < 80 || r.Latest.HostCPUPercent < 50 {
			return fmt.Errorf("latest guest %.0f%% host %.0f%%", r.Latest.GuestCPUPercent, r.Latest.HostCPUPercent)
		}
		// A busy guest is asked at every sample (the answer comes
		// after the sample's time, within the stats call's 2 s).
		if d := r.Latest.GuestAt.Sub(r.Latest.At); d < 0 || d > 3*time.Second {
			return fmt.Errorf("busy sample's guest figures read %v after it, want fresh", d)
		}
		busy = *r.Latest
		if len(r.History) < 3 {
			return fmt.Errorf("history of %d", len(r.History))
		}
		return nil
	})
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	t.Logf("idle: guest cpu %.1f%% host cpu %.1f%% rss %d MiB guest mem %d/%d MiB disk %d MiB (host %d MiB); busy: guest %.1f%% host %.1f%%",
		idle.GuestCPUPercent, idle.HostCPUPercent, idle.HostRSSBytes>>20, idle.GuestMemUsed>>20, idle.GuestMemTotal>>20,
		idle.GuestDiskUsed>>20, idle.HostDiskBytes>>20, busy.GuestCPUPercent, busy.HostCPUPercent)
	if busy.GuestCPUPercent <= idle.GuestCPUPercent {
		t.Errorf("guest cpu did not move: idle %.1f busy %.1f", idle.GuestCPUPercent, busy.GuestCPUPercent)
	}
}
