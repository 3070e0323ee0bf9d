package proxy

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// TestProxyIdleStreamsCapped walks ports 1..300 of one sandbox with
// sequential GETs (each leaves a keep-alive stream behind) and checks that
// idle streams count against the sandbox's cap: every request is served,
// and at most the cap of streams to the guest stays open.
func TestProxyIdleStreamsCapped(t *testing.T) {
	var open, maxOpen atomic.Int64
	guest := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	}))
	guest.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		switch st {
		case http.StateNew:
			n := open.Add(1)
			for m := maxOpen.Load(); n > m && !maxOpen.CompareAndSwap(m, n); m = maxOpen.Load() {
			}
		case http.StateClosed, http.StateHijacked:
			open.Add(-1)
		}
	}
	guest.Start()
	t.Cleanup(guest.Close)
	guestAddr := guest.Listener.Addr().String()

	sbx := newFakeSandboxes()
	// Every guest port of sbx1 reaches the one guest server.
	sbx.set("sbx1", Target{Public: true, Dial: func(ctx context.Context, _ int) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", guestAddr)
	}})
	const maxConns = 4
	s := startProxy(t, sbx, WithMaxConnsPerSandbox(maxConns))
	c := proxyClient(t, s)

	for port := 1; port <= 300; port++ {
		status, body := do(t, c, mustRequest(t, proxyURL(s, port, "sbx1", "/")))
		if status != http.StatusOK || body != "ok" {
			t.Fatalf("GET on port %d: %d %q, want 200 ok", port, status, body)
		}
		if n := s.streams.count("sbx1"); n > maxConns {
			t.Fatalf("after port %d: %d streams to the guest open, want <= %d", port, n, maxConns)
		}
	}
	if n := s.conns.count("sbx1"); n > maxConns {
		t.Errorf("%d tracked streams to the guest after the walk, want <= %d", n, maxConns)
	}
	waitFor(t, "the guest to see the closed streams", 10*time.Second, func() bool { return open.Load() <= maxConns })
	// The guest sees closes asynchronously, so allow slack on the peak (the
	// proxy side was checked exactly above); without the cap it is 300.
	if m := maxOpen.Load(); m > 2*maxConns {
		t.Errorf("the guest had %d streams open at once, want about %d", m, maxConns)
	}

	// Closing the sandbox ends its idle streams and gives their slots back.
	s.CloseSandbox("sbx1")
	if n := s.streams.count("sbx1"); n != 0 {
		t.Errorf("%d stream slots held after CloseSandbox, want 0", n)
	}
	waitFor(t, "the guest to see every stream closed", 10*time.Second, func() bool { return open.Load() == 0 })
}

// TestProxyStreamCapRefuses fills a sandbox's cap with busy streams: a
// CONNECT tunnel and a request in flight hold streams that are not idle, so
// the next stream is refused with 429 instead of closing them.
func TestProxyStreamCapRefuses(t *testing.T) {
	sbx := newFakeSandboxes()
	sbx.add("sbx1", "")
	port := lineServer(t)
	fast := newBackend(t, echoHandler())
	s := startProxy(t, sbx, WithMaxConnsPerSandbox(2))
	c := proxyClient(t, s)

	// An idle keep-alive stream, then a tunnel: the tunnel's stream closes
	// the idle one rather than being refused.
	if status, _ := do(t, c, mustRequest(t, proxyURL(s, fast.port, "sbx1", "/"))); status != http.StatusOK {
		t.Fatalf("GET: %d", status)
	}
	tun1, br1, status := connectTunnel(t, s, "sbx1", port, "")
	if !strings.HasPrefix(status, "HTTP/1.1 200") {
		t.Fatalf("first CONNECT: %q", status)
	}
	echoLine(t, tun1, br1, "one")
	tun2, br2, status := connectTunnel(t, s, "sbx1", port, "")
	if !strings.HasPrefix(status, "HTTP/1.1 200") {
		t.Fatalf("second CONNECT: %q", status)
	}
	echoLine(t, tun2, br2, "two")
	if n := s.streams.count("sbx1"); n != 2 {
		t.Errorf("%d streams open with two tunnels, want 2", n)
	}
	// Both slots are busy tunnels; the in-flight cap refuses a third, and
	// the tunnels still carry data.
	if status, _ := do(t, c, mustRequest(t, proxyURL(s, fast.port, "sbx1", "/"))); status != http.StatusTooManyRequests {
		t.Errorf("GET over the cap: %d, want 429", status)
	}
	echoLine(t, tun1, br1, "still one")
	tun1.Close()
	tun2.Close()
	waitFor(t, "the tunnels' slots to free", 10*time.Second, func() bool { return s.streams.count("sbx1") == 0 })
	if status, _ := do(t, c, mustRequest(t, proxyURL(s, fast.port, "sbx1", "/"))); status != http.StatusOK {
		t.Errorf("GET after the tunnels ended: %d, want 200", status)
	}
}

// TestProxyMaxClientConns checks the cap on client connections: beyond it a
// new connection is not served until another closes.
func TestProxyMaxClientConns(t *testing.T) {
	if _, err := NewServer(newFakeSandboxes(), WithMaxClientConns(0)); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("WithMaxClientConns(0): %v, want ErrInvalidArgument", err)
	}
	sbx := newFakeSandboxes()
	sbx.add("sbx1", "")
	b := newBackend(t, echoHandler())
	s := startProxy(t, sbx, WithMaxClientConns(2))
	addr := s.Addr().String()
	host := Route{SandboxID: "sbx1", Port: b.port}.Host(s.Domain())

	dial := func() net.Conn {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	get := func(c net.Conn, wait time.Duration) (string, error) {
		if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: "+host+"\r\n\r\n"); err != nil {
			return "", err
		}
		if err := c.SetReadDeadline(time.Now().Add(wait)); err != nil {
			return "", err
		}
		return bufio.NewReader(c).ReadString('\n')
	}
	// Two connections, each served once, stay open (keep-alive).
	c1, c2 := dial(), dial()
	for i, c := range []net.Conn{c1, c2} {
		if line, err := get(c, 10*time.Second); err != nil || !strings.HasPrefix(line, "HTTP/1.1 200") {
			t.Fatalf("conn %d: %q, %v", i+1, line, err)
		}
	}
	// A third is accepted by the kernel but not served.
	c3 := dial()
	if line, err := get(c3, 300*time.Millisecond); err == nil || !isTimeout(err) {
		t.Fatalf("third conn over a cap of 2: %q, %v; want no answer", line, err)
	}
	// Once one closes, the third is served.
	c1.Close()
	if err := c3.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(c3).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "HTTP/1.1 200") {
		t.Errorf("third conn after one closed: %q, %v; want 200", line, err)
	}
}
