package worker_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/embedded"
	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/worker"
)

// env is one worker under test with a client connected to it.
type env struct {
	t     *testing.T
	w     *worker.Worker
	nc    *nats.Conn
	c     *client.Client
	state string
	logs  *syncWriter
	// stopOnce stops the worker once: in the test (a restart) or at its end.
	stopOnce sync.Once
	stopErr  error
}

// stop stops the worker (once) and closes the client connection; a test
// restarts a worker on the same state directory with startWorker and an
// option setting StateDir.
func (e *env) stop() error {
	e.stopOnce.Do(func() {
		if e.nc != nil {
			e.nc.Close()
		}
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		e.stopErr = e.w.Stop(sctx)
	})
	return e.stopErr
}

type envOption func(*worker.Config)

// startWorker starts a real worker (embedded NATS on a free port, the QEMU
// driver, real images) and stops it when the test ends.
func startWorker(t *testing.T, opts ...envOption) *env {
	t.Helper()
	testenv.RequireQEMU(t, runtime.GOARCH)
	img := testenv.Image(t, runtime.GOARCH)
	state := t.TempDir()
	logs := &syncWriter{}
	cfg := worker.Config{
		StateDir:    state,
		NATSListen:  "127.0.0.1:-1",
		ProxyListen: "127.0.0.1:0",
		AgentBinary: testenv.AgentBinary(t, runtime.GOARCH),
		Image:       &img,
		Accel:       "auto", // the default path: probe KVM, fall back to TCG
		Pool:        map[string]int{},
		// Tests start from a worker whose built-in template snapshot exists,
		// as a running worker is in steady state.
		WaitTemplates: true,
		Logger:        slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	for _, o := range opts {
		o(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	w, err := worker.Start(ctx, cfg)
	if err != nil {
		t.Fatalf("start worker: %v\n%s", err, logs.String())
	}
	e := &env{t: t, w: w, state: cfg.StateDir, logs: logs}
	t.Cleanup(func() {
		if err := e.stop(); err != nil {
			t.Errorf("stop worker: %v", err)
		}
		if t.Failed() {
			t.Logf("worker log (tail):\n%s", tail(logs.String(), 6000))
			dumpConsoles(t, cfg.StateDir)
		}
		// FIRKIN_TEST_WORKER_LOG=<file> appends every worker's whole log
		// (for profiling a path by its timing fields).
		if path := os.Getenv("FIRKIN_TEST_WORKER_LOG"); path != "" {
			if f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600); err == nil {
				_, _ = f.WriteString(logs.String())
				_ = f.Close()
			}
		}
	})
	// The client identity (client.nk), not the worker's own.
	nc, err := nats.Connect(w.NATSURL(), w.ClientOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	e.nc, e.c = nc, client.New(nc)
	return e
}

// clientConn opens another connection with the client identity.
func (e *env) clientConn() *nats.Conn {
	e.t.Helper()
	nc, err := nats.Connect(e.w.NATSURL(), e.w.ClientOptions()...)
	if err != nil {
		e.t.Fatalf("connect as a client: %v", err)
	}
	e.t.Cleanup(nc.Close)
	return nc
}

// workerConn connects with the worker's own identity (worker.nk), which may
// write KV records and publish logs and events: for tests that play a
// writer the client identity is not allowed to be, such as a forged record.
func (e *env) workerConn() *nats.Conn {
	e.t.Helper()
	nc, err := nats.Connect(e.w.NATSURL(), client.NkeyFile(filepath.Join(e.state, worker.WorkerSeedFile)),
		nats.CustomInboxPrefix(embedded.WorkerInboxPrefix))
	if err != nil {
		e.t.Fatalf("connect as the worker: %v", err)
	}
	e.t.Cleanup(nc.Close)
	return nc
}

// serviceConn connects with the worker's service identity (service.nk),
// which may subscribe to every request and discovery subject but publish
// nothing but replies into _INBOX.>.
func (e *env) serviceConn() *nats.Conn {
	e.t.Helper()
	nc, err := nats.Connect(e.w.NATSURL(), client.NkeyFile(filepath.Join(e.state, worker.ServiceSeedFile)))
	if err != nil {
		e.t.Fatalf("connect as the worker's service: %v", err)
	}
	e.t.Cleanup(nc.Close)
	return nc
}

func (e *env) ctx(d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	e.t.Cleanup(cancel)
	return ctx
}

// create makes a sandbox and kills it when the test ends.
func (e *env) create(req subjects.CreateSandboxRequest) subjects.Sandbox {
	e.t.Helper()
	sb, err := e.c.Create(e.ctx(3*time.Minute), req)
	if err != nil {
		e.t.Fatalf("create %+v: %v", req, err)
	}
	e.t.Cleanup(func() {
		err := e.c.Kill(context.Background(), sb.SandboxID)
		if err != nil && subjects.CodeOf(err) != subjects.CodeSandboxNotFound && !errors.Is(err, nats.ErrConnectionClosed) { // closed: the worker was stopped in the test
			e.t.Errorf("kill %s: %v", sb.SandboxID, err)
		}
	})
	return sb
}

// exec runs a command and fails the test on a transport or error reply.
func (e *env) exec(id, command string) subjects.ExecReply {
	e.t.Helper()
	r, err := e.c.Exec(e.ctx(time.Minute), id, subjects.ExecRequest{Command: command})
	if err != nil {
		e.t.Fatalf("exec %q: %v", command, err)
	}
	return r
}

// wantCode checks that err is an error reply with code.
func wantCode(t *testing.T, what string, err error, code subjects.Code) {
	t.Helper()
	if err == nil {
		t.Errorf("%s: succeeded, want error %s", what, code)
		return
	}
	if got := subjects.CodeOf(err); got != code {
		t.Errorf("%s: code %s (%v), want %s", what, got, err, code)
	}
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, d time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	var err error
	for {
		if err = cond(); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still failing after %s: %v", what, d, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// qemuProcesses lists QEMU processes whose command line mentions dir.
func qemuProcesses(dir string) []string {
	var out []string
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		s := strings.ReplaceAll(string(cmdline), "\x00", " ")
		if strings.Contains(s, "qemu-system") && strings.Contains(s, dir) {
			out = append(out, e.Name()+": "+s)
		}
	}
	return out
}

func dumpConsoles(t *testing.T, state string) {
	matches, _ := filepath.Glob(filepath.Join(state, "sandboxes", "*", "console.log"))
	for _, m := range matches {
		data, _ := os.ReadFile(m)
		t.Logf("console %s (tail):\n%s", m, tail(string(data), 2000))
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// syncWriter serialises writes to a buffer shared by the worker's goroutines.
type syncWriter struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncWriter) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// builtWorker is the worker binary the tests that run it as a child
// process share: built once per test binary run, removed after the last
// test.
var builtWorker struct {
	once sync.Once
	dir  string
	bin  string
	err  error
	out  []byte
}

// workerBinary returns the path of the worker binary, building it on first
// use.
func workerBinary(t *testing.T) string {
	t.Helper()
	builtWorker.once.Do(func() {
		builtWorker.dir, builtWorker.err = os.MkdirTemp("", "firkin-worker-bin-")
		if builtWorker.err != nil {
			return
		}
		dir := builtWorker.dir
		worker.AfterTests = append(worker.AfterTests, func() { _ = os.RemoveAll(dir) })
		builtWorker.bin = filepath.Join(builtWorker.dir, "firkin-worker")
		builtWorker.out, builtWorker.err = exec.Command("go", "build", "-o", builtWorker.bin, "../cmd/firkin-worker").CombinedOutput()
	})
	if builtWorker.err != nil {
		t.Fatalf("build worker: %v\n%s", builtWorker.err, builtWorker.out)
	}
	return builtWorker.bin
}
