package proxy

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/tokens"
)

// set registers a sandbox with the given target (its Dial defaults to the
// fake's loopback dial).
func (f *fakeSandboxes) set(id string, t Target) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if t.Dial == nil {
		t.Dial = f.dial
	}
	f.sbx[id] = t
}

// connectTunnel sends a CONNECT for (id, port) through s with the extra
// header lines and returns the conn, its reader and the status line.
func connectTunnel(t *testing.T, s *Server, id string, port int, extra string) (net.Conn, *bufio.Reader, string) {
	t.Helper()
	c, err := net.Dial("tcp", s.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	authority := Route{SandboxID: id, Port: port}.Host(s.Domain()) + ":443"
	if _, err := io.WriteString(c, "CONNECT "+authority+" HTTP/1.1\r\nHost: "+authority+"\r\n"+extra+"\r\n"); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	status, err := br.ReadString('\n')
	if err != nil {
		t.Fatalf("CONNECT %s: %v", authority, err)
	}
	if strings.HasPrefix(status, "HTTP/1.1 200") {
		if blank, err := br.ReadString('\n'); err != nil || blank != "\r\n" {
			t.Fatalf("after the status line: %q, %v", blank, err)
		}
	}
	return c, br, status
}

// echoLine writes line and checks the line server's answer.
func echoLine(t *testing.T, c net.Conn, br *bufio.Reader, line string) {
	t.Helper()
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		t.Fatalf("write %q: %v", line, err)
	}
	if got, err := br.ReadString('\n'); err != nil || got != "echo: "+line+"\n" {
		t.Fatalf("echo of %q: %q, %v", line, got, err)
	}
}

// expectClosed checks that the peer closes c within d (a read ends with
// EOF or a reset, not a timeout).
func expectClosed(t *testing.T, r io.Reader, c net.Conn, d time.Duration, what string) {
	t.Helper()
	if err := c.SetReadDeadline(time.Now().Add(d)); err != nil {
		t.Fatal(err)
	}
	_, err := io.ReadAll(r)
	if isTimeout(err) {
		t.Fatalf("%s: still open after %v", what, d)
	}
}

// TestTokenBoundToGeneration re-creates a sandbox with the same id: the
// first instance's token no longer opens it, over HTTP and CONNECT.
func TestTokenBoundToGeneration(t *testing.T) {
	m, err := tokens.NewMinter([]byte("0123456789abcdef-secret"))
	if err != nil {
		t.Fatal(err)
	}
	sbx := newFakeSandboxes()
	instance := func() string {
		gen, tok := m.MintTraffic("priv")
		sbx.set("priv", Target{VerifyToken: func(presented string) bool { return m.VerifyTraffic("priv", gen, presented) }})
		return tok
	}
	oldTok := instance()
	be := newBackend(t, echoHandler())
	port := lineServer(t)
	s := startProxy(t, sbx)
	c := proxyClient(t, s)
	get := func(tok string) int {
		req, _ := http.NewRequest(http.MethodGet, proxyURL(s, be.port, "priv", "/"), nil)
		if tok != "" {
			req.Header.Set(TrafficTokenHeader, tok)
		}
		status, _ := do(t, c, req)
		return status
	}
	if got := get(oldTok); got != http.StatusOK {
		t.Fatalf("first instance with its token: %d", got)
	}
	sbx.remove("priv")   // killed
	newTok := instance() // created again with the same id
	if newTok == oldTok {
		t.Fatal("the second instance got the first one's token")
	}
	before := be.requests.Load()
	for _, tc := range []struct {
		name   string
		tok    string
		status int
	}{
		{"no token", "", http.StatusUnauthorized},
		{"killed instance's token", oldTok, http.StatusForbidden},
		{"new token", newTok, http.StatusOK},
	} {
		if got := get(tc.tok); got != tc.status {
			t.Errorf("HTTP, %s: %d, want %d", tc.name, got, tc.status)
		}
	}
	if n := be.requests.Load() - before; n != 1 {
		t.Errorf("the guest saw %d requests, want 1 (only with the new token)", n)
	}
	if _, _, status := connectTunnel(t, s, "priv", port, ""); !strings.HasPrefix(status, "HTTP/1.1 401") {
		t.Errorf("CONNECT without token: %q, want 401", status)
	}
	if _, _, status := connectTunnel(t, s, "priv", port, TrafficTokenHeader+": "+oldTok+"\r\n"); !strings.HasPrefix(status, "HTTP/1.1 403") {
		t.Errorf("CONNECT with the killed instance's token: %q, want 403", status)
	}
	conn, br, status := connectTunnel(t, s, "priv", port, TrafficTokenHeader+": "+newTok+"\r\n")
	if !strings.HasPrefix(status, "HTTP/1.1 200") {
		t.Fatalf("CONNECT with the new token: %q, want 200", status)
	}
	echoLine(t, conn, br, "any protocol")

	// A private target without a verifier refuses every token.
	sbx.set("noverify", Target{})
	req, _ := http.NewRequest(http.MethodGet, proxyURL(s, be.port, "noverify", "/"), nil)
	req.Header.Set(TrafficTokenHeader, newTok)
	if status, _ := do(t, c, req); status != http.StatusForbidden {
		t.Errorf("private target with no VerifyToken: %d, want 403", status)
	}
}

// TestTCPRoutePrivate opens a route of a private sandbox: it is recorded
// and counted, but has no listener and the reply no tcp field.
func TestTCPRoutePrivate(t *testing.T) {
	sbx := newFakeSandboxes()
	sbx.add("priv", "tok-0123456789abcdef")
	routes := newTCPRoutes(t, sbx)
	ctx := context.Background()
	port := lineServer(t)

	addr, err := routes.Open(ctx, "priv", port)
	if err != nil || addr != "" {
		t.Fatalf("Open(private) = %q, %v; want no address", addr, err)
	}
	if a, ok := routes.Addr("priv", port); !ok || a != "" {
		t.Errorf("Addr(private) = %q, %v; want an open route without address", a, ok)
	}
	routes.mu.Lock()
	r := routes.routes[Route{SandboxID: "priv", Port: port}]
	routes.mu.Unlock()
	if r == nil || r.ln != nil {
		t.Fatalf("private route %+v: want one with no listener", r)
	}
	b, err := json.Marshal(NewRouteReply(Route{SandboxID: "priv", Port: port}, "localhost", "127.0.0.1:8080", addr))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), `"tcp"`) {
		t.Errorf("route reply of a private sandbox %s has a tcp field", b)
	}

	// A public sandbox's listener binds loopback by default.
	sbx.add("pub", "")
	pubAddr, err := routes.Open(ctx, "pub", port)
	if err != nil {
		t.Fatal(err)
	}
	if host, _, _ := net.SplitHostPort(pubAddr); host != "127.0.0.1" {
		t.Errorf("public route listens on %s, want 127.0.0.1", pubAddr)
	}
	b, _ = json.Marshal(NewRouteReply(Route{SandboxID: "pub", Port: port}, "localhost", "127.0.0.1:8080", pubAddr))
	if !strings.Contains(string(b), `"tcp":"`+pubAddr+`"`) {
		t.Errorf("route reply of a public sandbox %s lacks its tcp address", b)
	}

	// A sandbox that turned private (a new instance with the same id)
	// gets nothing through its old listener.
	sbx.add("pub", "tok-0123456789abcdef")
	c, err := net.Dial("tcp", pubAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, _ = io.WriteString(c, "hello\n")
	expectClosed(t, c, c, 10*time.Second, "raw conn to a private sandbox")
}

// TestTCPRouteCap refuses the route past the cap with capacity_rejected,
// counts private routes too, and frees the room when the sandbox ends.
func TestTCPRouteCap(t *testing.T) {
	sbx := newFakeSandboxes()
	sbx.add("pub", "")
	sbx.add("priv", "tok-0123456789abcdef")
	sbx.add("other", "")
	routes, err := NewTCPRoutes(sbx, WithLogger(testLogger(t)), WithMaxRoutesPerSandbox(3))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { routes.Close() })
	ctx := context.Background()
	for _, id := range []string{"pub", "priv"} {
		for port := 1001; port <= 1003; port++ {
			if _, err := routes.Open(ctx, id, port); err != nil {
				t.Fatalf("%s: route %d of 3: %v", id, port-1000, err)
			}
		}
		if _, err := routes.Open(ctx, id, 1002); err != nil {
			t.Errorf("%s: an open route again: %v", id, err)
		}
		_, err := routes.Open(ctx, id, 1004)
		if !errors.Is(err, errdefs.ErrCapacity) || subjects.CodeOf(err) != subjects.CodeCapacityRejected {
			t.Fatalf("%s: route 4 of 3: %v (code %s), want capacity_rejected", id, err, subjects.CodeOf(err))
		}
		if !strings.Contains(err.Error(), "3 routes") {
			t.Errorf("%s: error %q does not say the cap", id, err)
		}
	}
	if _, err := routes.Open(ctx, "other", 1004); err != nil {
		t.Errorf("another sandbox is held by the cap: %v", err)
	}
	routes.CloseSandbox("pub")
	if _, err := routes.Open(ctx, "pub", 1004); err != nil {
		t.Errorf("after CloseSandbox: %v", err)
	}
}

// TestTCPRouteConnCap closes raw connections past the per-sandbox cap and
// takes new ones when one ends.
func TestTCPRouteConnCap(t *testing.T) {
	sbx := newFakeSandboxes()
	sbx.add("sbx1", "")
	port := lineServer(t)
	routes, err := NewTCPRoutes(sbx, WithLogger(testLogger(t)), WithMaxConnsPerSandbox(2))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { routes.Close() })
	addr, err := routes.Open(context.Background(), "sbx1", port)
	if err != nil {
		t.Fatal(err)
	}
	dial := func() (net.Conn, *bufio.Reader) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if err := c.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
			t.Fatal(err)
		}
		return c, bufio.NewReader(c)
	}
	c1, r1 := dial()
	echoLine(t, c1, r1, "one")
	c2, r2 := dial()
	echoLine(t, c2, r2, "two")
	c3, r3 := dial()
	_, _ = io.WriteString(c3, "three\n")
	expectClosed(t, r3, c3, 10*time.Second, "third conn over a cap of 2")

	c1.Close()
	waitFor(t, "the first conn's slot to free", 10*time.Second, func() bool { return routes.accepted.count("sbx1") < 2 })
	c4, r4 := dial()
	echoLine(t, c4, r4, "four")
	echoLine(t, c2, r2, "two again")
}

// TestProxyConnCap answers 429 past the per-sandbox cap of requests and
// tunnels in flight, without reaching the guest, and serves again when one
// ends.
func TestProxyConnCap(t *testing.T) {
	sbx := newFakeSandboxes()
	sbx.add("sbx1", "")
	sbx.add("other", "")
	release := make(chan struct{})
	var releaseOnce sync.Once
	t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) })
	slow := newBackend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
		io.WriteString(w, "done")
	}))
	fast := newBackend(t, echoHandler())
	port := lineServer(t)
	s := startProxy(t, sbx, WithMaxConnsPerSandbox(2))
	c := proxyClient(t, s)

	// One request and one tunnel in flight fill the cap.
	type result struct {
		status int
		body   string
		err    error
	}
	results := make(chan result, 1)
	go func() {
		resp, err := c.Get(proxyURL(s, slow.port, "sbx1", "/slow"))
		if err != nil {
			results <- result{err: err}
			return
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		results <- result{resp.StatusCode, string(b), err}
	}()
	waitFor(t, "the slow request to reach the guest", 10*time.Second, func() bool { return slow.requests.Load() == 1 })
	tunnel, tr, status := connectTunnel(t, s, "sbx1", port, "")
	if !strings.HasPrefix(status, "HTTP/1.1 200") {
		t.Fatalf("CONNECT within the cap: %q", status)
	}
	echoLine(t, tunnel, tr, "in the tunnel")

	before := fast.requests.Load()
	resp, err := c.Get(proxyURL(s, fast.port, "sbx1", "/"))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusTooManyRequests || !strings.Contains(string(body), "2 connections") {
		t.Errorf("third over a cap of 2: %d %q, want 429 saying the cap", resp.StatusCode, body)
	}
	if fast.requests.Load() != before {
		t.Error("the refused request reached the guest")
	}
	if _, _, status := connectTunnel(t, s, "sbx1", port, ""); !strings.HasPrefix(status, "HTTP/1.1 429") {
		t.Errorf("CONNECT over the cap: %q, want 429", status)
	}
	if status, _ := do(t, c, mustRequest(t, proxyURL(s, fast.port, "other", "/"))); status != http.StatusOK {
		t.Errorf("another sandbox is held by the cap: %d", status)
	}

	releaseOnce.Do(func() { close(release) })
	if r := <-results; r.err != nil || r.status != http.StatusOK || r.body != "done" {
		t.Fatalf("the slow request: %+v", r)
	}
	waitFor(t, "the slow request's slot to free", 10*time.Second, func() bool { return s.inFlight.count("sbx1") < 2 })
	if status, _ := do(t, c, mustRequest(t, proxyURL(s, fast.port, "sbx1", "/"))); status != http.StatusOK {
		t.Errorf("after a request ended: %d, want 200", status)
	}
	tunnel.Close()
	waitFor(t, "the tunnel's slot to free", 10*time.Second, func() bool { return s.inFlight.count("sbx1") == 0 })
}

func mustRequest(t *testing.T, url string) *http.Request {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	return req
}

// TestStreamIdleTimeout closes quiet tunnels, raw conns and event streams
// after the idle timeout, and keeps ones that carry data well past it.
func TestStreamIdleTimeout(t *testing.T) {
	const idle = 300 * time.Millisecond
	const active = 4 * idle // how long the busy streams run
	sbx := newFakeSandboxes()
	sbx.add("sbx1", "")
	port := lineServer(t)
	events := newBackend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		rc := http.NewResponseController(w)
		n := 0
		if r.URL.Path == "/busy" {
			n = int(active / (idle / 4))
		}
		for i := range n {
			fmt.Fprintf(w, "data: %d\n\n", i)
			if rc.Flush() != nil {
				return
			}
			select {
			case <-time.After(idle / 4):
			case <-r.Context().Done():
				return
			}
		}
		fmt.Fprint(w, "data: quiet now\n\n")
		_ = rc.Flush()
		<-r.Context().Done() // quiet until the proxy ends the stream
	}))
	s := startProxy(t, sbx, WithStreamIdleTimeout(idle))
	c := proxyClient(t, s)
	routes, err := NewTCPRoutes(sbx, WithLogger(testLogger(t)), WithStreamIdleTimeout(idle))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { routes.Close() })
	addr, err := routes.Open(context.Background(), "sbx1", port)
	if err != nil {
		t.Fatal(err)
	}

	// keepBusy exchanges lines for longer than the idle timeout, then
	// checks that the quiet conn is closed.
	keepBusy := func(t *testing.T, conn net.Conn, br *bufio.Reader) {
		t.Helper()
		start := time.Now()
		for i := 0; time.Since(start) < active; i++ {
			echoLine(t, conn, br, fmt.Sprintf("line %d", i))
			<-time.After(idle / 4)
		}
		quiet := time.Now()
		expectClosed(t, br, conn, 10*time.Second, "quiet stream")
		if d := time.Since(quiet); d < idle/2 {
			t.Errorf("closed %v after going quiet, before the idle timeout %v", d, idle)
		}
	}
	t.Run("raw TCP", func(t *testing.T) {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		keepBusy(t, conn, bufio.NewReader(conn))
	})
	t.Run("CONNECT tunnel", func(t *testing.T) {
		conn, br, status := connectTunnel(t, s, "sbx1", port, "")
		if !strings.HasPrefix(status, "HTTP/1.1 200") {
			t.Fatalf("CONNECT: %q", status)
		}
		if err := conn.SetDeadline(time.Time{}); err != nil {
			t.Fatal(err)
		}
		keepBusy(t, conn, br)
	})
	t.Run("server-sent events", func(t *testing.T) {
		resp, err := c.Get(proxyURL(s, events.port, "sbx1", "/busy"))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		br := bufio.NewReader(resp.Body)
		start := time.Now()
		var last string
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				t.Fatalf("busy stream cut after %v (last %q): %v", time.Since(start), last, err)
			}
			if line == "data: quiet now\n" {
				break
			}
			if line != "\n" {
				last = line
			}
		}
		if d := time.Since(start); d < active*3/4 {
			t.Fatalf("busy stream ran %v, want about %v", d, active)
		}
		done := make(chan error, 1)
		go func() { _, err := io.ReadAll(br); done <- err }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("quiet event stream still open 10s after going quiet")
		}
	})
}

// TestReadHeaderTimeout closes a client that does not finish its headers.
func TestReadHeaderTimeout(t *testing.T) {
	s := startProxy(t, newFakeSandboxes(), WithReadHeaderTimeout(200*time.Millisecond))
	c, err := net.Dial("tcp", s.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: 80-sbx1.localhost\r\n"); err != nil {
		t.Fatal(err)
	}
	expectClosed(t, c, c, 10*time.Second, "a request with unfinished headers")
}
