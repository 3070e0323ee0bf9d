package vmpool

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/agent"
)

// fakeMachine stands in for a VM in the pool's logic tests.
type fakeMachine struct {
	id      string
	pingErr error
	stopped atomic.Bool
	done    chan struct{}
}

func (m *fakeMachine) ID() string                                       { return m.id }
func (m *fakeMachine) Dir() string                                      { return "" }
func (m *fakeMachine) Init(context.Context, agent.InitRequest) error    { return nil }
func (m *fakeMachine) Ping(context.Context) error                       { return m.pingErr }
func (m *fakeMachine) DialGuest(context.Context, int) (net.Conn, error) { return nil, errors.New("no") }
func (m *fakeMachine) Done() <-chan struct{}                            { return m.done }
func (m *fakeMachine) Stop(context.Context) error                       { m.stopped.Store(true); return nil }
func (m *fakeMachine) Exec(context.Context, agent.ExecRequest, agent.OutputFunc) (agent.ExecResult, error) {
	return agent.ExecResult{}, nil
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func status(p *Pool, key string) PoolStatus {
	for _, s := range p.Status() {
		if s.Key == key {
			return s
		}
	}
	return PoolStatus{}
}

func TestPoolFillsTakesAndRefills(t *testing.T) {
	var n atomic.Int32
	var mu sync.Mutex
	made := map[string]*fakeMachine{}
	p := NewPool(PoolConfig{Fill: func(ctx context.Context, key string) (Machine, error) {
		m := &fakeMachine{id: fmt.Sprintf("%s-%d", key, n.Add(1)), done: make(chan struct{})}
		mu.Lock()
		made[m.id] = m
		mu.Unlock()
		return m, nil
	}})
	p.Start()
	defer p.Stop()
	p.SetTarget("tiny", 2)
	waitFor(t, "two ready", func() bool { return status(p, "tiny").Ready == 2 })
	m, ok := p.Take(context.Background(), "tiny")
	if !ok || m.ID() != "tiny-2" {
		t.Fatalf("Take = %v, %v; want the newest, tiny-2", m, ok)
	}
	waitFor(t, "refill", func() bool { return status(p, "tiny").Ready == 2 })
	if _, ok := p.Take(context.Background(), "other"); ok {
		t.Fatal("took from an empty key")
	}
	p.SetTarget("tiny", 0)
	if s := status(p, "tiny"); s.Ready != 0 {
		t.Fatalf("after target 0: %+v", s)
	}
	mu.Lock()
	defer mu.Unlock()
	stopped := 0
	for _, fm := range made {
		if fm.stopped.Load() {
			stopped++
		}
	}
	if stopped != 2 {
		t.Fatalf("drained machines stopped = %d, want 2", stopped)
	}
}

func TestPoolDiscardsUnhealthyAndBacksOff(t *testing.T) {
	var calls atomic.Int32
	var released atomic.Int32
	p := NewPool(PoolConfig{
		Fill: func(ctx context.Context, key string) (Machine, error) {
			c := calls.Add(1)
			if key == "broken" {
				return nil, errors.New("restore failed")
			}
			m := &fakeMachine{id: fmt.Sprint(c), done: make(chan struct{})}
			if c == 1 {
				m.pingErr = errors.New("agent does not answer")
			}
			return m, nil
		},
		Release: func(Machine) { released.Add(1) },
	})
	p.Start()
	defer p.Stop()
	p.SetTarget("tiny", 1)
	waitFor(t, "ready", func() bool { return status(p, "tiny").Ready == 1 })
	// Take may hand out a machine refilled meanwhile, never the unhealthy one.
	if m, ok := p.Take(context.Background(), "tiny"); ok && m.(*fakeMachine).pingErr != nil {
		t.Fatalf("handed out machine %s whose agent does not answer", m.ID())
	}
	waitFor(t, "unhealthy machine released", func() bool { return released.Load() == 1 })
	waitFor(t, "healthy refill", func() bool { return status(p, "tiny").Ready == 1 })
	if m, ok := p.Take(context.Background(), "tiny"); !ok || m.(*fakeMachine).pingErr != nil {
		t.Fatal("healthy machine not handed out")
	}
	if m1 := calls.Load(); m1 < 2 {
		t.Fatalf("fills = %d, want a refill after the discard", m1)
	}

	p.SetTarget("broken", 1)
	waitFor(t, "failure recorded", func() bool { return status(p, "broken").LastError != "" })
	before := calls.Load()
	time.Sleep(100 * time.Millisecond)
	if after := calls.Load(); after-before > 2 {
		t.Fatalf("failing fills not backed off: %d calls in 100ms", after-before)
	}
}

func TestPoolDrainDropsOldGeneration(t *testing.T) {
	release := make(chan struct{})
	var n atomic.Int32
	p := NewPool(PoolConfig{Fill: func(ctx context.Context, key string) (Machine, error) {
		if n.Add(1) == 1 {
			<-release
		}
		return &fakeMachine{id: fmt.Sprint(n.Load()), done: make(chan struct{})}, nil
	}})
	p.Start()
	defer p.Stop()
	p.SetTarget("t", 1)
	waitFor(t, "fill in progress", func() bool { return status(p, "t").InProgress == 1 })
	p.Drain("t")
	close(release)
	waitFor(t, "new generation ready", func() bool { s := status(p, "t"); return s.Ready == 1 && s.InProgress == 0 })
	m, _ := p.Take(context.Background(), "t")
	if m == nil || m.ID() == "1" {
		t.Fatalf("took %v: the machine of the drained generation", m)
	}
}

func TestPoolHungFillDoesNotBlockOtherKeys(t *testing.T) {
	var hungEnded atomic.Bool
	p := NewPool(PoolConfig{
		FillTimeout: 400 * time.Millisecond,
		SlowFill:    50 * time.Millisecond,
		MaxBackoff:  time.Hour, // one timeout is enough to see
		Fill: func(ctx context.Context, key string) (Machine, error) {
			if key == "a-hung" { // a guest that never answers
				<-ctx.Done()
				hungEnded.Store(true)
				return nil, fmt.Errorf("restore: %w", ctx.Err())
			}
			return &fakeMachine{id: key, done: make(chan struct{})}, nil
		},
	})
	p.Start()
	defer p.Stop()
	p.SetTarget("a-hung", 1) // sorts first, takes the only slot
	waitFor(t, "the hung fill to start", func() bool { return status(p, "a-hung").InProgress == 1 })
	t0 := time.Now()
	p.SetTarget("b", 2)
	waitFor(t, "the other key to fill", func() bool { return status(p, "b").Ready == 2 })
	if d := time.Since(t0); d > 300*time.Millisecond {
		t.Errorf("the other key filled after %s, with a hung fill holding its slot for at most 50ms", d)
	}
	if hungEnded.Load() {
		t.Error("the other key waited for the hung fill's timeout")
	}
	waitFor(t, "the hung fill to time out", func() bool { return status(p, "a-hung").FillTimeouts == 1 })
	s := status(p, "a-hung")
	if s.InProgress != 0 || s.Ready != 0 || !hungEnded.Load() {
		t.Errorf("after the timeout: %+v, fill ended %v", s, hungEnded.Load())
	}
	if want := "fill timed out after"; len(s.LastError) < len(want) || s.LastError[:len(want)] != want {
		t.Errorf("last error %q", s.LastError)
	}
}

func TestPoolKeysTakeTurns(t *testing.T) {
	var mu sync.Mutex
	var order []string
	gate := make(chan struct{})
	p := NewPool(PoolConfig{Fill: func(ctx context.Context, key string) (Machine, error) {
		<-gate
		mu.Lock()
		order = append(order, key)
		mu.Unlock()
		return &fakeMachine{id: key, done: make(chan struct{})}, nil
	}})
	p.Start()
	defer p.Stop()
	p.SetTarget("a", 3)
	p.SetTarget("b", 3)
	close(gate)
	waitFor(t, "both keys full", func() bool { return status(p, "a").Ready == 3 && status(p, "b").Ready == 3 })
	mu.Lock()
	defer mu.Unlock()
	for i := 1; i < len(order); i++ {
		if order[i] == order[i-1] {
			t.Fatalf("fill order %v: a key filled twice in a row while the other waited", order)
		}
	}
}
