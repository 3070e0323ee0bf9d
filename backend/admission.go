package backend

import (
	"fmt"
	"sync"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// Limits bound what one worker runs at once.
type Limits struct {
	MaxSessions int `json:"max_sandboxes"` // active sandboxes plus warm machines
	MaxVCPUs    int `json:"max_vcpus"`
	MaxMemoryMB int `json:"max_memory_mb"`
}

// Admission is the worker's capacity ledger: active sandboxes and warm pool
// machines hold reservations; a warm reservation may be evicted to make room
// for an active one.
type Admission struct {
	limits Limits

	mu     sync.Mutex
	active map[string]vmpool.Resources
	warm   map[string]vmpool.Resources
}

// NewAdmission returns an empty ledger with limits.
func NewAdmission(limits Limits) *Admission {
	return &Admission{limits: limits, active: map[string]vmpool.Resources{}, warm: map[string]vmpool.Resources{}}
}

// Admit reserves res for an active sandbox id. When the ledger is full it
// returns the warm machines whose eviction makes room (the caller stops them
// and calls Release for each) and reserves anyway; when even that is not
// enough it fails with errdefs.ErrCapacity. Admitting an id twice is a no-op.
func (a *Admission) Admit(id string, res vmpool.Resources) (evict []string, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, ok := a.active[id]; ok {
		return nil, nil
	}
	if res.VCPUs > a.limits.MaxVCPUs || res.MemoryMB > a.limits.MaxMemoryMB {
		return nil, errdefs.Wrap(errdefs.ErrCapacity, fmt.Errorf("sandbox needs %d vCPUs and %d MiB; this worker has at most %d vCPUs and %d MiB", res.VCPUs, res.MemoryMB, a.limits.MaxVCPUs, a.limits.MaxMemoryMB))
	}
	sessions, vcpus, mem := a.usage(a.active)
	if sessions+1 > a.limits.MaxSessions || vcpus+res.VCPUs > a.limits.MaxVCPUs || mem+res.MemoryMB > a.limits.MaxMemoryMB {
		return nil, errdefs.Wrap(errdefs.ErrCapacity, fmt.Errorf("worker is full: %d sandboxes, %d vCPUs, %d MiB in use (limits %d, %d, %d)", sessions, vcpus, mem, a.limits.MaxSessions, a.limits.MaxVCPUs, a.limits.MaxMemoryMB))
	}
	// Room among active ones; evict warm machines until everything fits.
	ws, wv, wm := a.usage(a.warm)
	for wid, wr := range a.warm {
		if sessions+ws+1 <= a.limits.MaxSessions && vcpus+wv+res.VCPUs <= a.limits.MaxVCPUs && mem+wm+res.MemoryMB <= a.limits.MaxMemoryMB {
			break
		}
		evict = append(evict, wid)
		delete(a.warm, wid)
		ws, wv, wm = ws-1, wv-wr.VCPUs, wm-wr.MemoryMB
	}
	a.active[id] = res
	return evict, nil
}

// ReserveWarm reserves res for a warm machine; it never evicts and fails
// with errdefs.ErrCapacity when there is no free room.
func (a *Admission) ReserveWarm(id string, res vmpool.Resources) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	s1, v1, m1 := a.usage(a.active)
	s2, v2, m2 := a.usage(a.warm)
	if s1+s2+1 > a.limits.MaxSessions || v1+v2+res.VCPUs > a.limits.MaxVCPUs || m1+m2+res.MemoryMB > a.limits.MaxMemoryMB {
		return errdefs.Wrap(errdefs.ErrCapacity, fmt.Errorf("no room for a warm machine"))
	}
	a.warm[id] = res
	return nil
}

// Promote turns a warm reservation into an active one under a new id.
func (a *Admission) Promote(warmID, activeID string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if res, ok := a.warm[warmID]; ok {
		delete(a.warm, warmID)
		a.active[activeID] = res
	}
}

// Release drops id's reservation, active or warm.
func (a *Admission) Release(id string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.active, id)
	delete(a.warm, id)
}

// Usage reports active and warm reservations.
func (a *Admission) Usage() (active, warm int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.active), len(a.warm)
}

func (a *Admission) usage(m map[string]vmpool.Resources) (n, vcpus, mem int) {
	for _, r := range m {
		n++
		vcpus += r.VCPUs
		mem += r.MemoryMB
	}
	return n, vcpus, mem
}

// Usage is what a worker has handed out, and its limits.
type Usage struct {
	// Sandboxes and Warm count active sandboxes and warm machines.
	Sandboxes int `json:"sandboxes"`
	Warm      int `json:"warm"`
	// VCPUs and MemoryMB are reserved by both; ActiveVCPUs and
	// ActiveMemoryMB by the active sandboxes alone.
	VCPUs          int    `json:"vcpus"`
	MemoryMB       int    `json:"memory_mb"`
	ActiveVCPUs    int    `json:"active_vcpus"`
	ActiveMemoryMB int    `json:"active_memory_mb"`
	Limits         Limits `json:"limits"`
}

// Snapshot reports the ledger's reservations and limits.
func (a *Admission) Snapshot() Usage {
	a.mu.Lock()
	defer a.mu.Unlock()
	n1, v1, m1 := a.usage(a.active)
	n2, v2, m2 := a.usage(a.warm)
	return Usage{Sandboxes: n1, Warm: n2, VCPUs: v1 + v2, MemoryMB: m1 + m2, ActiveVCPUs: v1, ActiveMemoryMB: m1, Limits: a.limits}
}
