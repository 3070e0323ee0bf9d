package qemu

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/firkin-dev/firkin-worker/agent"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/internal/procstat"
	"github.com/firkin-dev/firkin-worker/jail"
	"github.com/firkin-dev/firkin-worker/vmpool"
	"github.com/firkin-dev/firkin-worker/vmpool/qemu/qmp"
)

// File names inside a machine's directory.
const (
	consoleFile = "console.log"
	qemuLogFile = "qemu.log" // QEMU's own stdout and stderr
	stateFile   = "machine.json"
	memFile     = "mem"
	agentSock   = "agent.sock"
	qmpSock     = "qmp.sock"
)

// Machine is one QEMU process with a connected agent.
type Machine struct {
	d   *Driver
	log *slog.Logger

	id, dir string
	sockDir string // short directory holding the sockets; "" when in dir
	binary  string
	args    []string
	cfg     vmConfig
	image   vmpool.Image
	pid     int
	started uint64 // process start time (clock ticks since boot) against pid reuse
	done    chan struct{}
	kill    func() error
	console *consoleLog  // nil for a machine of an older worker (file console)
	uid     uint32       // QEMU's uid; 0 when not confined
	gid     uint32       // its group (the range's)
	cgroup  *jail.Cgroup // nil when not limited

	// mu guards what Save changes and what Stop tears down.
	mu        sync.Mutex
	qmp       *qmp.Client
	agentConn net.Conn
	agent     *agent.Client
	top       string // path of the top (writable) overlay
	topNode   string
	layer     int   // depth of the top overlay in the disk chain (1 on the base)
	diskSize  int64 // virtual size of the root disk
	saving    bool

	stopping atomic.Bool // Stop (or a failed start) is ending the process

	opMu     sync.Mutex // serialises Save and Stop
	stopped  bool
	stopErr  error
	released bool
}

// Machines are started in the background and check their guest's boot.
var _ interface {
	vmpool.Foregrounder
	vmpool.BootChecker
} = (*Machine)(nil)

// machineState is what machine.json holds: enough for Reattach.
type machineState struct {
	ID        string       `json:"id"`
	Dir       string       `json:"dir"`
	SockDir   string       `json:"sock_dir,omitempty"`
	PID       int          `json:"pid"`
	StartTime uint64       `json:"start_time"`
	Binary    string       `json:"binary"`
	Args      []string     `json:"args"`
	Config    vmConfig     `json:"config"`
	Image     vmpool.Image `json:"image"`
	Top       string       `json:"top"`
	TopNode   string       `json:"top_node"`
	Layer     int          `json:"layer"`
	DiskSize  int64        `json:"disk_size"`
	Created   time.Time    `json:"created"`
	UID       uint32       `json:"uid,omitempty"`    // QEMU's uid when confined
	GID       uint32       `json:"gid,omitempty"`    // and its group
	Cgroup    []string     `json:"cgroup,omitempty"` // its cgroup directories
	// Starting marks a machine whose start had not finished: written as
	// soon as QEMU runs (when machines outlive the worker), so that a
	// worker that died before the machine was up has the next one stop it
	// rather than leave it running with nobody to answer for it.
	Starting bool `json:"starting,omitempty"`
}

// ID returns the machine's id.
func (m *Machine) ID() string { return m.id }

// Dir returns the machine's private directory.
func (m *Machine) Dir() string { return m.dir }

// PID returns the QEMU process id.
func (m *Machine) PID() int { return m.pid }

// Accel returns the accelerator the machine runs on ("kvm" or "tcg").
func (m *Machine) Accel() string { return m.cfg.Accel }

// OutdatedBoot says why the machine's guest kernel runs with other arguments
// than this driver boots with now ("" when it does not): a machine restored
// from a snapshot keeps the command line its guest booted with, so a
// template saved by an older driver misses newer settings (the idle ones in
// idleArgs) until it is rebuilt. The worker rebuilds such built-in
// templates at start.
func (m *Machine) OutdatedBoot() string {
	return outdatedBoot(m.cfg.Append, kernelArgs(m.cfg.Arch, m.cfg.Accel, m.cfg.Network))
}

func outdatedBoot(booted, now string) string {
	if booted == now {
		return ""
	}
	return fmt.Sprintf("guest kernel command line %q, this driver boots with %q", booted, now)
}

// Done is closed when the QEMU process has exited.
func (m *Machine) Done() <-chan struct{} { return m.done }

// ConsoleTail returns the last n bytes of the guest console.
func (m *Machine) ConsoleTail(n int64) string { return consoleTail(m.cfg.Console, n) }

func (m *Machine) client() (*agent.Client, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.agent == nil {
		what := "stopped"
		if m.saving {
			what = "being saved"
		}
		return nil, errdefs.Wrap(errdefs.ErrFailedPrecondition, fmt.Errorf("qemu: machine %s is %s", m.id, what))
	}
	return m.agent, nil
}

// Init re-initialises identity, env, clock and entropy in the guest.
func (m *Machine) Init(ctx context.Context, req agent.InitRequest) error {
	c, err := m.client()
	if err != nil {
		return err
	}
	return c.Init(ctx, req)
}

// Exec runs a command in the guest.
func (m *Machine) Exec(ctx context.Context, req agent.ExecRequest, out agent.OutputFunc) (agent.ExecResult, error) {
	c, err := m.client()
	if err != nil {
		return agent.ExecResult{}, err
	}
	return c.Exec(ctx, req, out)
}

// DialGuest opens a TCP stream to port on the guest's loopback.
func (m *Machine) DialGuest(ctx context.Context, port int) (net.Conn, error) {
	c, err := m.client()
	if err != nil {
		return nil, err
	}
	return c.DialGuest(ctx, port)
}

// Ping checks that the agent answers.
func (m *Machine) Ping(ctx context.Context) error {
	c, err := m.client()
	if err != nil {
		return err
	}
	return c.Ping(ctx)
}

// Agent returns the current agent session (for what the Machine interface
// does not carry, like files).
func (m *Machine) Agent() (*agent.Client, error) { return m.client() }

// Release lets go of the machine without stopping it: the agent session and
// QMP are closed, QEMU keeps running, and another Driver (a restarted worker)
// can Reattach to its directory.
func (m *Machine) Release() error {
	m.opMu.Lock()
	defer m.opMu.Unlock()
	if m.stopped || m.released {
		return nil
	}
	m.released = true
	m.stopping.Store(true) // its exit is someone else's business now
	m.closeConns()
	m.console.close() // QEMU reconnects to whoever listens next (Reattach)
	return nil
}

// closeConns closes the agent session and QMP (not the process).
func (m *Machine) closeConns() {
	m.mu.Lock()
	c, conn, q := m.agent, m.agentConn, m.qmp
	m.agent, m.agentConn, m.qmp = nil, nil, nil
	m.mu.Unlock()
	if conn != nil {
		_ = conn.Close() // first, so that Client.Close does not wait on a quiesce
	}
	if c != nil {
		_ = c.Close()
	}
	if q != nil {
		_ = q.Close()
	}
}

// Stop stops QEMU (QMP quit, SIGKILL after the driver's stop timeout or
// when ctx ends) and removes the machine's directory. It is idempotent.
func (m *Machine) Stop(ctx context.Context) error {
	m.opMu.Lock()
	defer m.opMu.Unlock()
	return m.stopLocked(ctx)
}

func (m *Machine) stopLocked(ctx context.Context) error {
	if m.stopped {
		return m.stopErr
	}
	m.stopped = true
	m.stopping.Store(true)
	start := time.Now()
	m.mu.Lock()
	q := m.qmp
	m.mu.Unlock()
	select {
	case <-m.done:
	default:
		if q != nil {
			qctx, cancel := context.WithTimeout(ctx, time.Second)
			_, _ = q.Execute(qctx, "quit", nil) // the reply may race QEMU's exit
			cancel()
		}
		t := time.NewTimer(m.d.cfg.StopTimeout)
		select {
		case <-m.done:
		case <-t.C:
			m.log.Warn("qemu did not quit in time; killing it", "timeout", m.d.cfg.StopTimeout)
		case <-ctx.Done():
		}
		t.Stop()
		select {
		case <-m.done:
		default:
			_ = m.kill()
			<-m.done
		}
	}
	m.console.wait(consoleDrain)
	m.console.close()
	m.closeConns()
	var errs []error
	if err := m.releaseConfinement(); err != nil {
		errs = append(errs, err)
	}
	if m.sockDir != "" {
		if err := os.RemoveAll(m.sockDir); err != nil {
			errs = append(errs, err)
		}
	}
	if err := os.RemoveAll(m.dir); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		m.stopErr = fmt.Errorf("qemu: stop %s: %w", m.id, err)
	}
	m.log.Debug("machine stopped", "elapsed", time.Since(start).Round(time.Millisecond))
	return m.stopErr
}

// state returns what machine.json records.
func (m *Machine) state() machineState {
	m.mu.Lock()
	defer m.mu.Unlock()
	return machineState{ID: m.id, Dir: m.dir, SockDir: m.sockDir, PID: m.pid, StartTime: m.started,
		Binary: m.binary, Args: m.args, Config: m.cfg, Image: m.image,
		Top: m.top, TopNode: m.topNode, Layer: m.layer, DiskSize: m.diskSize, Created: time.Now().UTC(),
		UID: m.uid, GID: m.gid, Cgroup: m.Cgroup()}
}

func (m *Machine) saveState() error {
	return writeJSON(filepath.Join(m.dir, stateFile), m.state())
}

// undo is a stack of cleanups, run once in reverse order when a later step
// fails.
type undo struct {
	log   *slog.Logger
	steps []func() error
	names []string
}

func (u *undo) add(name string, fn func() error) {
	u.names = append(u.names, name)
	u.steps = append(u.steps, fn)
}

func (u *undo) run() {
	for i := len(u.steps) - 1; i >= 0; i-- {
		if err := u.steps[i](); err != nil {
			u.log.Warn("undo failed", "step", u.names[i], "err", err)
		}
	}
	u.steps, u.names = nil, nil
}

// stepError names the step that failed and carries the console's tail.
func stepError(op, id, step string, err error, console, qemuLog string) error {
	var b strings.Builder
	fmt.Fprintf(&b, "qemu: %s %s: %s: %v", op, id, step, err)
	if t := strings.TrimSpace(tail(qemuLog, 2048)); t != "" {
		fmt.Fprintf(&b, "\nqemu output:\n%s", t)
	}
	if t := strings.TrimSpace(consoleTail(console, 3000)); t != "" {
		fmt.Fprintf(&b, "\nconsole tail:\n%s", t)
	}
	if errors.Is(err, syscall.ENOSPC) || strings.Contains(err.Error(), "No space left on device") {
		err = errdefs.Wrap(errdefs.ErrDiskPressure, err)
	}
	return &opError{msg: b.String(), err: err}
}

// opError is a failed step: its message has the context, its chain the cause.
type opError struct {
	msg string
	err error
}

func (e *opError) Error() string { return e.msg }
func (e *opError) Unwrap() error { return e.err }

// launch is a machine being started (boot, restore or probe).
type launch struct {
	op    string // "boot", "restore", "probe"
	id    string
	dir   string
	cfg   vmConfig
	image vmpool.Image
	// setup runs after QMP and the agent channel are connected and before
	// the agent handshake (a restore loads its state here).
	setup func(ctx context.Context, m *Machine) error
	// agentTimeout, when set, bounds the agent connection separately (probe).
	agentTimeout time.Duration
	diskSize     int64
	depth        int  // of cfg.Disk in the disk chain
	background   bool // a small CPU share until Foreground
}

// prepareDir creates the machine directory (which must not exist, or be
// empty) and picks socket paths, making a short socket directory when dir is
// too long. The returned cleanup removes both.
func (d *Driver) prepareDir(id, dir string) (sockDir string, cleanup func() error, err error) {
	if !filepath.IsAbs(dir) {
		return "", nil, invalid("qemu: machine dir %q is not absolute", dir)
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return "", nil, err
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		if !errors.Is(err, os.ErrExist) {
			return "", nil, err
		}
		ents, rerr := os.ReadDir(dir)
		if rerr != nil {
			return "", nil, rerr
		}
		if len(ents) > 0 {
			return "", nil, errdefs.Wrap(errdefs.ErrConflict, fmt.Errorf("qemu: machine dir %s exists and is not empty", dir))
		}
	}
	cleanup = func() error { return os.RemoveAll(dir) }
	// A confined QEMU makes its sockets in a directory of its own, inside
	// the socket directory (see ownFiles).
	if len(filepath.Join(dir, consoleSock)) > maxSocketLen || d.confinesUIDs() { // the longest socket name
		s, err := os.MkdirTemp(d.cfg.SocketDir, "m-")
		if err != nil {
			_ = cleanup()
			return "", nil, err
		}
		sockDir = s
		cleanup = func() error { return errors.Join(os.RemoveAll(s), os.RemoveAll(dir)) }
	}
	return sockDir, cleanup, nil
}

func randomMAC() string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return fmt.Sprintf("52:54:00:%02x:%02x:%02x", b[0], b[1], b[2])
}

// start runs the ordered steps of a launch: validate, start QEMU, connect
// QMP and the agent channel, the setup hook (or cont), the agent handshake,
// ping. On failure everything done
// so far is undone, and the error names the step and has the console tail.
func (d *Driver) start(ctx context.Context, l *launch, u *undo) (*Machine, error) {
	if l.cfg.Network && d.restrictNet.Load() {
		l.cfg.NetOff = true
	}
	log := d.log.With("machine", l.id)
	sockDir := filepath.Dir(l.cfg.ConsoleSock) // QEMU's own sockets may be a level below
	if sockDir == l.dir {
		sockDir = ""
	}
	m := &Machine{d: d, log: log, id: l.id, dir: l.dir, sockDir: sockDir, cfg: l.cfg, image: l.image,
		done: make(chan struct{}), top: l.cfg.Disk, topNode: l.cfg.Node, diskSize: l.diskSize, layer: l.depth}
	qemuLog := filepath.Join(l.dir, qemuLogFile)
	fail := func(step string, err error) (*Machine, error) {
		select {
		case <-m.done: // what the guest said last is on its way into the log
			m.console.wait(consoleDrain)
		default:
		}
		e := stepError(l.op, l.id, step, err, l.cfg.Console, qemuLog)
		u.run()
		return nil, e
	}

	args, err := l.cfg.args()
	if err != nil {
		return fail("command line", err)
	}
	bin, err := d.binary(l.cfg.Arch)
	if err != nil {
		return fail("command line", err)
	}
	m.binary, m.args = bin, args

	// The disk files QEMU gets as descriptors, opened here: QEMU needs no
	// permission on them (nor sees them in its jail).
	files, err := openInherited(l.cfg.inherited())
	if err != nil {
		return fail("open disk layers", err)
	}
	defer closeFiles(files) // QEMU has its own copies once started

	// The process: not tied to ctx, the machine lives until Stop. When
	// confined it starts as a jail (see confine.go) that execs QEMU: the
	// same pid.
	extra := files // fds QEMU inherits as firstInheritedFD, …
	cmd, err := d.command(m, l, u, bin, args, extra)
	if err != nil {
		return fail("confine", err)
	}
	// The console socket listens before QEMU starts and connects; only
	// QEMU's connection is taken (its pid is known once it started).
	if m.console, err = listenConsole(l.cfg.ConsoleSock, l.cfg.Console, d.cfg.ConsoleCap, m.gid, m.done, log); err != nil {
		return fail("listen console", err)
	}
	u.add("close console", func() error { m.console.close(); return nil })
	logf, err := os.OpenFile(qemuLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fail("start qemu", err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	t0 := time.Now()
	err = cmd.Start()
	logf.Close()
	if err != nil {
		return fail("start qemu", errdefs.Wrap(errdefs.ErrUnsupported, err))
	}
	m.pid = cmd.Process.Pid
	m.started, _ = startTime(m.pid)
	m.console.expect(m.pid)
	m.kill = cmd.Process.Kill
	go func() {
		err := cmd.Wait()
		if !m.stopping.Load() {
			log.Warn("qemu exited by itself", "pid", m.pid, "status", err, "console_tail", consoleTail(l.cfg.Console, 600))
		}
		close(m.done)
	}()
	u.add("kill qemu", func() error {
		m.stopping.Store(true)
		_ = cmd.Process.Kill()
		<-m.done
		return nil
	})
	log.Debug("qemu started", "pid", m.pid, "args", strings.Join(args, " "))
	if d.cfg.KeepOnExit {
		st := m.state()
		st.Starting = true
		if err := writeJSON(filepath.Join(m.dir, stateFile), st); err != nil {
			return fail("write machine.json", err)
		}
	}

	q, err := dialQMP(ctx, l.cfg.QMP, m.pid, m.done)
	if err != nil {
		return fail("connect qmp", err)
	}
	m.qmp = q
	u.add("close qmp", q.Close)

	m.console.waitConnected(ctx, consoleConnect, m.done)

	actx := ctx
	if l.agentTimeout > 0 {
		var cancel context.CancelFunc
		actx, cancel = context.WithTimeout(ctx, l.agentTimeout)
		defer cancel()
	}
	// The agent channel is connected before the guest runs. A restored
	// guest was saved with its port connected; when the new QEMU finds no
	// host on it after the load, it tells the guest its host went away,
	// and the guest's driver may report that only after the hello of the
	// host that connects next (virtio-serial handles "host connected" in a
	// work queue), which ended the new session before its first call.
	conn, err := dialUnix(actx, l.cfg.Agent, m.pid, m.done)
	if err != nil {
		return fail("connect agent", err)
	}
	u.add("close agent channel", conn.Close)
	if l.setup != nil {
		if err := l.setup(ctx, m); err != nil {
			return fail("load state", err)
		}
		if afterLoad != nil {
			afterLoad()
		}
	} else if _, err := q.Execute(ctx, "cont", nil); err != nil { // started with -S
		return fail("start guest", err)
	}
	c, err := connectAgent(actx, conn, m.done)
	if err != nil {
		return fail("agent handshake", err)
	}
	u.add("close agent session", c.Close)
	if err := c.Ping(actx); err != nil {
		return fail("ping agent", err)
	}
	m.agentConn, m.agent = conn, c
	log.Info("machine up", "op", l.op, "accel", l.cfg.Accel, "pid", m.pid, "elapsed", time.Since(t0).Round(time.Millisecond))
	if err := m.saveState(); err != nil {
		return fail("write machine.json", err)
	}
	return m, nil
}

// afterLoad, when set (by tests), runs between a restore's state load and
// its agent handshake.
var afterLoad func()

// connectAgent runs agent.Connect, giving up early when QEMU exits.
func connectAgent(ctx context.Context, conn net.Conn, exited <-chan struct{}) (*agent.Client, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	go func() {
		select {
		case <-exited:
			cancel(errdefs.Wrap(errdefs.ErrFailedPrecondition, errors.New("qemu exited")))
		case <-ctx.Done():
		}
	}()
	c, err := agent.Connect(ctx, conn)
	if err != nil {
		if cause := context.Cause(ctx); cause != nil && cause != ctx.Err() {
			return nil, fmt.Errorf("%w (%v)", cause, err)
		}
		return nil, err
	}
	return c, nil
}

// dialUnix connects to the unix socket at path, waiting for QEMU (process
// pid) to make it. The socket must be pid's: a confined QEMU owns the
// directory its sockets are in and could put a link to another machine's
// socket there.
func dialUnix(ctx context.Context, path string, pid int, exited <-chan struct{}) (net.Conn, error) {
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		c, err := net.Dial("unix", path)
		if err == nil {
			if err := checkPeer(c, pid); err != nil {
				c.Close()
				return nil, errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("%s: %w", filepath.Base(path), err))
			}
			return c, nil
		}
		select {
		case <-exited:
			return nil, errdefs.Wrap(errdefs.ErrFailedPrecondition, fmt.Errorf("qemu exited before %s was ready", filepath.Base(path)))
		case <-ctx.Done():
			return nil, errdefs.Wrap(errdefs.ErrTimeout, fmt.Errorf("dial %s: %w (%v)", path, ctx.Err(), err))
		case <-tick.C:
		}
	}
}

func dialQMP(ctx context.Context, path string, pid int, exited <-chan struct{}) (*qmp.Client, error) {
	conn, err := dialUnix(ctx, path, pid, exited)
	if err != nil {
		return nil, err
	}
	return qmp.Connect(ctx, conn)
}

// startTime returns the start time of pid (clock ticks after boot).
func startTime(pid int) (uint64, error) {
	st, err := procstat.Read(pid)
	return st.StartTime, err
}
