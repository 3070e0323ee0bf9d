package proxy

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/tokens"
)

// fakeSandboxes is a Resolver whose sandboxes' "guest ports" are ports on
// the host's loopback: Target.Dial(port) dials 127.0.0.1:port, standing in
// for the agent's dial inside the guest.
type fakeSandboxes struct {
	mu    sync.Mutex
	sbx   map[string]Target
	dials atomic.Int64
}

func newFakeSandboxes() *fakeSandboxes {
	return &fakeSandboxes{sbx: make(map[string]Target)}
}

// add registers a sandbox; token "" makes it public.
func (f *fakeSandboxes) add(id, token string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	verify := func(tok string) bool { return tokens.Equal(tok, token) }
	f.sbx[id] = Target{Dial: f.dial, Public: token == "", VerifyToken: verify}
}

func (f *fakeSandboxes) remove(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.sbx, id)
}

func (f *fakeSandboxes) dial(ctx context.Context, port int) (net.Conn, error) {
	f.dials.Add(1)
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrProtocol, fmt.Errorf("fake guest dial: %w", err))
	}
	return c, nil
}

func (f *fakeSandboxes) Resolve(_ context.Context, id string) (Target, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	t, ok := f.sbx[id]
	if !ok {
		return Target{}, errdefs.Wrap(errdefs.ErrNotFound, fmt.Errorf("sandbox %s not found", id))
	}
	return t, nil
}

// testLogger discards below warnings... unless -v: then debug goes to the test log.
func testLogger(t testing.TB) *slog.Logger {
	if !testing.Verbose() {
		return slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return slog.New(slog.NewTextHandler(tbWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tbWriter struct{ t testing.TB }

func (w tbWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

// backend is a loopback HTTP server standing in for a program in the guest.
type backend struct {
	*httptest.Server
	port     int
	requests atomic.Int64
}

// newBackend serves h on 127.0.0.1 and counts requests.
func newBackend(t testing.TB, h http.Handler) *backend {
	b := &backend{}
	b.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b.requests.Add(1)
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(b.Close)
	b.port = b.Listener.Addr().(*net.TCPAddr).Port
	return b
}

// startProxy starts a Server on 127.0.0.1:0 and shuts it down at cleanup.
func startProxy(t testing.TB, r Resolver, opts ...Option) *Server {
	t.Helper()
	opts = append([]Option{WithLogger(testLogger(t))}, opts...)
	s, err := NewServer(r, opts...)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background(), "127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	return s
}

// proxyClient is an HTTP client that sends every request to the proxy,
// whatever the URL's host (like curl --resolve '*:port:127.0.0.1').
func proxyClient(t testing.TB, s *Server) *http.Client {
	addr := s.Addr().String()
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		},
		MaxIdleConnsPerHost: 64,
		DisableCompression:  true,
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}
}

// proxyURL is the URL of path on route (port, id) through s.
func proxyURL(s *Server, port int, id, path string) string {
	return "http://" + Route{SandboxID: id, Port: port}.Host(s.Domain()) + ":" +
		strconv.Itoa(s.Addr().(*net.TCPAddr).Port) + path
}

// freePort returns a loopback port with nothing listening on it.
func freePort(t testing.TB) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	return port
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
