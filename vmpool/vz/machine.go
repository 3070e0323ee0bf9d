package vz

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"

	"github.com/firkin-dev/firkin-worker/agent"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// Agent dial tuning: the first vsock dial is retried with exponential
// backoff (the guest may not listen yet) until the caller's ctx ends; one
// attempt is bounded because a dial to a port nobody listens on may never
// complete.
const (
	dialInitialInterval = 10 * time.Millisecond
	dialMaxInterval     = 250 * time.Millisecond
	dialAttemptTimeout  = 2 * time.Second
)

// machine is one VZ virtual machine with its agent session.
type machine struct {
	d     *Driver
	id    string
	dir   string
	vm    vm
	cfg   machineConfig
	image vmpool.Image

	saveMu sync.Mutex // one save at a time

	mu     sync.Mutex
	client *agent.Client
	conn   net.Conn

	stopOnce sync.Once
	stopErr  error
	stopped  chan struct{} // closed by Stop
	done     chan struct{} // closed when the VM stopped, or by Stop
}

var _ vmpool.Machine = (*machine)(nil)

func newMachine(d *Driver, id, dir string, v vm, cfg machineConfig, img vmpool.Image) *machine {
	m := &machine{d: d, id: id, dir: dir, vm: v, cfg: cfg, image: img, stopped: make(chan struct{}), done: make(chan struct{})}
	go func() {
		select {
		case <-v.Done():
		case <-m.stopped:
		}
		close(m.done)
	}()
	return m
}

// ID returns the sandbox id the machine was started for.
func (m *machine) ID() string { return m.id }

// Dir returns the machine's private directory.
func (m *machine) Dir() string { return m.dir }

// Done is closed when the VM stopped (for any reason) or Stop was called.
func (m *machine) Done() <-chan struct{} { return m.done }

// agent returns the current agent session.
func (m *machine) agent() (*agent.Client, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.client == nil {
		return nil, errdefs.Wrap(errdefs.ErrFailedPrecondition, fmt.Errorf("vz: machine %s: no agent session (being saved or stopped)", m.id))
	}
	return m.client, nil
}

// Init re-initialises identity, env, clock and entropy in the guest.
func (m *machine) Init(ctx context.Context, req agent.InitRequest) error {
	c, err := m.agent()
	if err != nil {
		return err
	}
	return c.Init(ctx, req)
}

// Exec runs a command in the guest.
func (m *machine) Exec(ctx context.Context, req agent.ExecRequest, out agent.OutputFunc) (agent.ExecResult, error) {
	c, err := m.agent()
	if err != nil {
		return agent.ExecResult{}, err
	}
	return c.Exec(ctx, req, out)
}

// DialGuest opens a TCP stream to a port on the guest's loopback.
func (m *machine) DialGuest(ctx context.Context, port int) (net.Conn, error) {
	c, err := m.agent()
	if err != nil {
		return nil, err
	}
	return c.DialGuest(ctx, port)
}

// Ping checks that the agent answers.
func (m *machine) Ping(ctx context.Context) error {
	c, err := m.agent()
	if err != nil {
		return err
	}
	return c.Ping(ctx)
}

// Stop stops the VM at once (its disk is thrown away, so there is nothing
// for the guest to flush) and removes the machine's directory. It is safe to
// call more than once; later calls return the first call's result.
func (m *machine) Stop(ctx context.Context) error {
	m.stopOnce.Do(func() {
		m.closeAgent()
		var errs []error
		select {
		case <-m.vm.Done():
		default:
			stopped := make(chan error, 1)
			go func() { stopped <- m.vm.Stop() }()
			timer := time.NewTimer(m.d.cfg.StopTimeout)
			defer timer.Stop()
			select {
			case err := <-stopped:
				if err != nil {
					errs = append(errs, fmt.Errorf("stop: %w", err))
				}
			case <-timer.C:
				errs = append(errs, errdefs.Wrap(errdefs.ErrTimeout, fmt.Errorf("stop: no answer within %v", m.d.cfg.StopTimeout)))
			case <-ctx.Done():
				errs = append(errs, fmt.Errorf("stop: %w", ctx.Err()))
			}
		}
		close(m.stopped)
		if err := os.RemoveAll(m.dir); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", m.dir, err))
		}
		if err := errors.Join(errs...); err != nil {
			m.stopErr = classify(fmt.Errorf("vz: machine %s: %w", m.id, err))
		}
	})
	return m.stopErr
}

// connect dials the agent over vsock (retrying with backoff until ctx ends),
// starts a session and checks that it answers.
func (m *machine) connect(ctx context.Context) error {
	conn, err := dialAgent(ctx, m.vm, m.cfg.VsockPort)
	if err != nil {
		return err
	}
	c, err := agent.Connect(ctx, conn)
	if err != nil {
		conn.Close()
		return err
	}
	if err := c.Ping(ctx); err != nil {
		c.Close()
		conn.Close()
		return err
	}
	m.mu.Lock()
	m.client, m.conn = c, conn
	m.mu.Unlock()
	return nil
}

// closeAgent ends the agent session and closes its vsock connection.
func (m *machine) closeAgent() {
	m.mu.Lock()
	c, conn := m.client, m.conn
	m.client, m.conn = nil, nil
	m.mu.Unlock()
	if c != nil {
		_ = c.Close()
	}
	if conn != nil {
		_ = conn.Close()
	}
}

// quiesceAgent asks the guest to drop its session (so that it waits for a
// new hello), then closes the vsock connection: a saved machine must not
// hold a session, and vsock connections do not survive a restore.
func (m *machine) quiesceAgent(ctx context.Context) {
	m.mu.Lock()
	c, conn := m.client, m.conn
	m.client, m.conn = nil, nil
	m.mu.Unlock()
	if c != nil {
		if err := c.Quiesce(ctx); err != nil {
			m.d.log.Debug("vz: quiesce before save", "id", m.id, "err", err)
		}
		_ = c.Close()
	}
	if conn != nil {
		_ = conn.Close()
	}
}

// save runs the save sequence (see Driver.Save).
func (m *machine) save(ctx context.Context, dir string, opts vmpool.SaveOptions) (vmpool.Snapshot, error) {
	m.saveMu.Lock()
	defer m.saveMu.Unlock()
	select {
	case <-m.done:
		return vmpool.Snapshot{}, errdefs.Wrap(errdefs.ErrFailedPrecondition, fmt.Errorf("vz: save %s: the machine has stopped", m.id))
	default:
	}
	if err := m.d.hv.SaveRestoreSupported(m.cfg); err != nil {
		return vmpool.Snapshot{}, unsupported(fmt.Errorf("vz: save %s: %w", m.id, err))
	}
	statePath := filepath.Join(dir, stateFile)
	paused := false
	var written []string
	steps := []step{
		{"quiesce agent", func() error { m.quiesceAgent(ctx); return nil }},
		{"pause", func() error {
			if err := m.vm.Pause(); err != nil {
				return err
			}
			paused = true
			return nil
		}},
		{"remove stale state file", func() error {
			if err := os.Remove(statePath); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
			return nil
		}},
		{"freeze disk", func() error {
			dst := filepath.Join(dir, frozenDiskFile)
			written = append(written, dst)
			return freezeDisk(m.d.hv, m.cfg.Disk, dst)
		}},
		{"save machine state", func() error {
			written = append(written, statePath)
			return m.vm.SaveState(statePath)
		}},
		{"record configuration", func() error {
			p := filepath.Join(dir, machineJSONFile)
			written = append(written, p)
			return writeJSON(p, m.cfg)
		}},
	}
	if opts.Stop {
		steps = append(steps, step{"stop", func() error { paused = false; return m.Stop(ctx) }})
	} else {
		steps = append(steps,
			step{"resume", func() error {
				if err := m.vm.Resume(); err != nil {
					return err
				}
				paused = false
				return nil
			}},
			step{"reconnect to the agent", func() error { return m.connect(ctx) }},
		)
	}
	err := runSteps("save "+m.id, steps)
	if err == nil {
		return snapshotOf(dir, m.cfg, m.image), nil
	}
	for _, p := range written {
		_ = os.Remove(p)
	}
	if paused {
		if rerr := m.vm.Resume(); rerr != nil {
			m.d.log.Warn("vz: resume after a failed save", "id", m.id, "err", rerr)
			return vmpool.Snapshot{}, err
		}
	}
	if !opts.Stop && m.hasNoAgent() {
		if cerr := m.connect(context.WithoutCancel(ctx)); cerr != nil {
			m.d.log.Warn("vz: reconnect after a failed save", "id", m.id, "err", cerr)
		}
	}
	return vmpool.Snapshot{}, err
}

func (m *machine) hasNoAgent() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.client == nil
}

// dialAgent connects to the guest agent's vsock port, retrying with
// exponential backoff while nothing listens yet, until ctx ends or the
// machine stops.
func dialAgent(ctx context.Context, v vm, port uint32) (net.Conn, error) {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval = dialInitialInterval
	b.MaxInterval = dialMaxInterval
	b.MaxElapsedTime = 0 // ctx bounds the retries
	attempts := 0
	var last error
	conn, err := backoff.RetryWithData(func() (net.Conn, error) {
		select {
		case <-v.Done():
			return nil, backoff.Permanent(errdefs.Wrap(errdefs.ErrInternalFailure, errors.New("the machine stopped")))
		default:
		}
		attempts++
		c, err := dialOnce(ctx, v, port)
		if err != nil {
			last = err
		}
		return c, err
	}, backoff.WithContext(b, ctx))
	if err == nil {
		return conn, nil
	}
	if ctx.Err() != nil {
		cerr := fmt.Errorf("no agent on vsock port %d after %d attempts (last error: %v): %w", port, attempts, last, ctx.Err())
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return nil, errdefs.Wrap(errdefs.ErrTimeout, cerr)
		}
		return nil, cerr
	}
	return nil, fmt.Errorf("dial vsock port %d: %w", port, err)
}

// dialOnce makes one vsock dial, bounded by dialAttemptTimeout and ctx. A
// connection that arrives after the attempt was given up is closed.
func dialOnce(ctx context.Context, v vm, port uint32) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		c, err := v.DialVsock(port)
		ch <- result{c, err}
	}()
	timer := time.NewTimer(dialAttemptTimeout)
	defer timer.Stop()
	abandon := func() {
		go func() {
			if r := <-ch; r.c != nil {
				r.c.Close()
			}
		}()
	}
	select {
	case r := <-ch:
		return r.c, r.err
	case <-timer.C:
		abandon()
		return nil, fmt.Errorf("vsock dial to port %d: no answer within %v", port, dialAttemptTimeout)
	case <-ctx.Done():
		abandon()
		return nil, ctx.Err()
	}
}
