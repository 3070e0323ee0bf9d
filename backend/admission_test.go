package backend

import (
	"errors"
	"testing"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

func TestAdmission(t *testing.T) {
	a := NewAdmission(Limits{MaxSessions: 3, MaxVCPUs: 4, MaxMemoryMB: 1024})
	small := vmpool.Resources{VCPUs: 1, MemoryMB: 256}
	if _, err := a.Admit("a", vmpool.Resources{VCPUs: 5, MemoryMB: 256}); !errors.Is(err, errdefs.ErrCapacity) {
		t.Fatalf("oversized: %v", err)
	}
	if _, err := a.Admit("a", small); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Admit("a", small); err != nil {
		t.Fatalf("same id twice: %v", err)
	}
	if err := a.ReserveWarm("w1", small); err != nil {
		t.Fatal(err)
	}
	if err := a.ReserveWarm("w2", small); err != nil {
		t.Fatal(err)
	}
	if err := a.ReserveWarm("w3", small); !errors.Is(err, errdefs.ErrCapacity) {
		t.Fatalf("warm over the session limit: %v", err)
	}
	evict, err := a.Admit("b", small)
	if err != nil || len(evict) != 1 {
		t.Fatalf("admit with warm eviction: %v %v", evict, err)
	}
	if act, warm := a.Usage(); act != 2 || warm != 1 {
		t.Fatalf("usage = %d active, %d warm", act, warm)
	}
	a.Promote("w1", "c")
	a.Promote("w2", "c")
	if _, err := a.Admit("d", small); !errors.Is(err, errdefs.ErrCapacity) {
		t.Fatalf("full: %v", err)
	}
	a.Release("a")
	if _, err := a.Admit("d", small); err != nil {
		t.Fatalf("after release: %v", err)
	}
}

func TestDefaultLimits(t *testing.T) {
	for _, c := range []struct {
		cores, memMB int
		want         Limits
	}{
		{2, 24 << 10, Limits{MaxSessions: 64, MaxVCPUs: 64, MaxMemoryMB: 24<<10 - 2457}},
		{8, 4 << 10, Limits{MaxSessions: 64, MaxVCPUs: 256, MaxMemoryMB: 3 << 10}},
		{1, 0, Limits{MaxSessions: 64, MaxVCPUs: 32, MaxMemoryMB: 3 << 10}},
		{0, 512, Limits{MaxSessions: 64, MaxVCPUs: 32, MaxMemoryMB: MinMemoryMB}},
	} {
		if got := defaultLimits(c.cores, c.memMB); got != c.want {
			t.Errorf("defaultLimits(%d, %d) = %+v, want %+v", c.cores, c.memMB, got, c.want)
		}
	}
	if l := DefaultLimits(); l.MaxVCPUs < vcpuOvercommit || l.MaxMemoryMB < MinMemoryMB {
		t.Errorf("DefaultLimits() = %+v", l)
	}
}
