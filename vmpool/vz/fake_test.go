package vz

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/agent"
)

// fakeHV is a hypervisor in memory. Its VMs serve the real agent protocol
// (agent.Server, without chroot) on net.Pipe connections, check state
// transitions like the framework does, and refuse to restore a state saved
// by a machine of another configuration.
type fakeHV struct {
	t      *testing.T
	limits limits

	mu    sync.Mutex
	calls []string
	vms   []*fakeVM
	// dialFailures is how many vsock dials of each new VM fail (the guest
	// does not listen yet).
	dialFailures int
	// Failure injection, by operation name ("start", "save", ...).
	fail map[string]error
	// unsupported is what SaveRestoreSupported returns.
	unsupported error
	// unsaveable names optional devices ("entropy", "console") that keep
	// a configuration from being saved.
	unsaveable map[string]bool
}

func newFakeHV(t *testing.T) *fakeHV {
	return &fakeHV{t: t, limits: limits{MinVCPUs: 1, MaxVCPUs: 8, MinMemoryMB: 128, MaxMemoryMB: 8192}, fail: map[string]error{}}
}

func (h *fakeHV) record(format string, args ...any) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.calls = append(h.calls, fmt.Sprintf(format, args...))
}

// takeCalls returns the calls recorded so far and forgets them.
func (h *fakeHV) takeCalls() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	c := h.calls
	h.calls = nil
	return c
}

func (h *fakeHV) failure(op string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.fail[op]
}

func (h *fakeHV) Limits() limits { return h.limits }

func (h *fakeHV) NewMachineIdentifier() ([]byte, error) {
	b := make([]byte, 32)
	_, err := rand.Read(b)
	h.record("new machine identifier")
	return b, err
}

func (h *fakeHV) CloneFile(src, dst string) error {
	h.record("clone %s -> %s", src, dst)
	if err := h.failure("clone"); err != nil {
		return err
	}
	return copyFile(src, dst)
}

func (h *fakeHV) SaveRestoreSupported(cfg machineConfig) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.unsupported != nil {
		return h.unsupported
	}
	if cfg.Entropy && h.unsaveable["entropy"] {
		return errors.New("unsupported entropy device in configuration")
	}
	if cfg.Console && h.unsaveable["console"] {
		return errors.New("unsupported console device in configuration")
	}
	return nil
}

func (h *fakeHV) NewVM(cfg machineConfig) (vm, error) {
	h.record("new vm")
	if err := h.failure("new vm"); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	v := &fakeVM{hv: h, cfg: cfg, state: "stopped", done: make(chan struct{}), ctx: ctx, cancel: cancel, dialFailures: h.dialFailures}
	h.mu.Lock()
	h.vms = append(h.vms, v)
	h.mu.Unlock()
	h.t.Cleanup(func() { _ = v.Stop() })
	return v, nil
}

// fakeVM is one fake machine.
type fakeVM struct {
	hv  *fakeHV
	cfg machineConfig

	mu           sync.Mutex
	state        string // stopped, running, paused
	started      bool
	dialFailures int
	dials        int
	conns        []net.Conn

	done   chan struct{}
	once   sync.Once
	ctx    context.Context // the guest's life
	cancel context.CancelFunc
}

// transition moves from one state to another, or fails like the framework.
func (v *fakeVM) transition(op, from, to string) error {
	v.hv.record("%s", op)
	if err := v.hv.failure(op); err != nil {
		return err
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.state != from {
		return fmt.Errorf("%s: invalid state transition from %s", op, v.state)
	}
	v.state = to
	return nil
}

func (v *fakeVM) Start() error {
	v.mu.Lock()
	started := v.started
	v.mu.Unlock()
	if started {
		return errors.New("start: already started")
	}
	if err := v.transition("start", "stopped", "running"); err != nil {
		return err
	}
	v.mu.Lock()
	v.started = true
	v.mu.Unlock()
	return nil
}

func (v *fakeVM) Pause() error  { return v.transition("pause", "running", "paused") }
func (v *fakeVM) Resume() error { return v.transition("resume", "paused", "running") }

func (v *fakeVM) Stop() error {
	v.once.Do(func() {
		v.hv.record("stop")
		v.mu.Lock()
		v.state = "stopped"
		conns := v.conns
		v.mu.Unlock()
		v.cancel()
		for _, c := range conns {
			c.Close()
		}
		close(v.done)
	})
	return nil
}

// savedImage is what the fake writes as a machine state: the
// configuration that must match at restore.
type savedImage struct {
	Config machineConfig `json:"config"`
}

// comparable strips what may differ between the saved and the restored
// machine: the paths of its own disk and console.
func comparable(c machineConfig) machineConfig {
	c.Disk, c.ConsoleLog = "", ""
	return c
}

func (v *fakeVM) SaveState(path string) error {
	v.hv.record("save %s", path)
	if err := v.hv.failure("save"); err != nil {
		return err
	}
	v.mu.Lock()
	state := v.state
	v.mu.Unlock()
	if state != "paused" {
		return fmt.Errorf("save: machine is %s, not paused", state)
	}
	b, _ := json.Marshal(savedImage{Config: comparable(v.cfg)})
	return os.WriteFile(path, b, 0o644)
}

func (v *fakeVM) RestoreState(path string) error {
	v.hv.record("restore %s", path)
	if err := v.hv.failure("restore"); err != nil {
		return err
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.state != "stopped" || v.started {
		return fmt.Errorf("restore: machine is %s (started %v), not a fresh stopped machine", v.state, v.started)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var img savedImage
	if err := json.Unmarshal(b, &img); err != nil {
		return err
	}
	want, _ := json.Marshal(img.Config)
	got, _ := json.Marshal(comparable(v.cfg))
	if string(want) != string(got) {
		return fmt.Errorf("restore: configuration differs from the saved one:\nsaved %s\nnow   %s", want, got)
	}
	v.state, v.started = "paused", true
	return nil
}

func (v *fakeVM) DialVsock(port uint32) (net.Conn, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.dials++
	if port != v.cfg.VsockPort {
		return nil, fmt.Errorf("vsock port %d: connection refused", port)
	}
	if v.state != "running" {
		return nil, fmt.Errorf("vsock: machine is %s", v.state)
	}
	if v.dials <= v.dialFailures {
		return nil, errors.New("vsock: connection reset (guest not listening yet)")
	}
	host, guest := net.Pipe()
	v.conns = append(v.conns, host, guest)
	srv := &agent.Server{}
	go func() {
		_ = srv.ServeConn(v.ctx, guest)
		guest.Close()
	}()
	return host, nil
}

func (v *fakeVM) Done() <-chan struct{} { return v.done }

// dialCount returns how many vsock dials the VM saw.
func (v *fakeVM) dialCount() int {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.dials
}

// callsLike keeps the calls that start with one of the prefixes, with
// paths relative to dirs replaced by names, for comparisons.
func callsLike(calls []string, dirs map[string]string, prefixes ...string) []string {
	var out []string
	for _, c := range calls {
		if !slices.ContainsFunc(prefixes, func(p string) bool { return strings.HasPrefix(c, p) }) {
			continue
		}
		for dir, name := range dirs {
			c = strings.ReplaceAll(c, dir, name)
		}
		out = append(out, c)
	}
	return out
}

// waitClosed fails the test unless ch is closed within d.
func waitClosed(t *testing.T, ch <-chan struct{}, d time.Duration, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(d):
		t.Fatalf("%s: not closed within %v", what, d)
	}
}
