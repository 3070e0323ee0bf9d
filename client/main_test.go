package client_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/jail"
	"github.com/firkin-dev/firkin-worker/worker"
)

// testWorker is the embedded worker the examples and tests of this package
// use: embedded NATS on a free loopback port, the QEMU driver, the cached
// test image, a warm pool of one tiny sandbox.
var testWorker *worker.Worker

// TestMain lets the jail processes of the QEMU machines (re-executions of
// the test binary) do their work, then starts one worker for every example
// and test, and stops it at the end.
func TestMain(m *testing.M) {
	jail.Main()
	os.Exit(run(m))
}

func run(m *testing.M) (code int) {
	tb := &mainTB{}
	logs := &syncBuffer{}
	defer func() {
		if r := recover(); r != nil {
			if _, ok := r.(fatal); !ok {
				panic(r)
			}
			fmt.Fprintf(os.Stderr, "client tests: %s\nworker log (tail):\n%s\n", r, tail(logs.String(), 6000))
			code = 1
		}
		tb.cleanup()
	}()
	testenv.RequireQEMU(tb, runtime.GOARCH)
	img := testenv.Image(tb, runtime.GOARCH)
	state, err := os.MkdirTemp("", "firkin-client-test-")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(state) })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	w, err := worker.Start(ctx, worker.Config{
		StateDir:       state,
		NATSListen:     "127.0.0.1:-1",
		ProxyListen:    "127.0.0.1:0",
		AgentBinary:    testenv.AgentBinary(tb, runtime.GOARCH),
		Image:          &img,
		Accel:          "auto",
		Pool:           map[string]int{"tiny": 1},
		WaitTemplates:  true,
		JobConcurrency: 1,
		Logger:         slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		tb.Fatalf("start worker: %v", err)
	}
	tb.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := w.Stop(sctx); err != nil {
			fmt.Fprintf(os.Stderr, "stop worker: %v\n", err)
		}
	})
	testWorker = w
	code = m.Run()
	if code != 0 {
		fmt.Fprintf(os.Stderr, "worker log (tail):\n%s\n", tail(logs.String(), 6000))
	}
	return code
}

// connect returns a client of the test worker on a new connection, as a
// product service makes one:
//
//	nc, err := nats.Connect(url, client.NkeyFile("/var/lib/firkin/client.nk"))
//	c := client.New(nc)
//
// The connection is closed when the test binary ends.
func connect() *client.Client {
	nc, err := nats.Connect(testWorker.NATSURL(), testWorker.ClientOptions()...)
	if err != nil {
		panic(err)
	}
	conns.Lock()
	conns.list = append(conns.list, nc)
	conns.Unlock()
	return client.New(nc)
}

var conns struct {
	sync.Mutex
	list []*nats.Conn
}

// fatal is the panic value of mainTB.Fatal.
type fatal string

// mainTB is the testing.TB that testenv's helpers get in TestMain, where no
// test exists yet: Fatal panics (run recovers and fails the binary) and
// cleanups run when run returns. Only the methods testenv calls are
// implemented; the embedded nil interface supplies the unexported one.
type mainTB struct {
	testing.TB
	mu       sync.Mutex
	cleanups []func()
}

func (t *mainTB) Helper()                           {}
func (t *mainTB) Name() string                      { return "TestMain" }
func (t *mainTB) Output() io.Writer                 { return io.Discard }
func (t *mainTB) Logf(format string, args ...any)   { fmt.Fprintf(os.Stderr, format+"\n", args...) }
func (t *mainTB) Fatal(args ...any)                 { panic(fatal(fmt.Sprint(args...))) }
func (t *mainTB) Fatalf(format string, args ...any) { panic(fatal(fmt.Sprintf(format, args...))) }
func (t *mainTB) Cleanup(f func()) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.cleanups = append(t.cleanups, f)
}

func (t *mainTB) cleanup() {
	conns.Lock()
	for _, nc := range conns.list {
		nc.Close()
	}
	conns.Unlock()
	t.mu.Lock()
	fs := t.cleanups
	t.cleanups = nil
	t.mu.Unlock()
	for i := len(fs) - 1; i >= 0; i-- {
		fs[i]()
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}
