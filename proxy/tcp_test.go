package proxy

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// lineServer is a loopback line protocol server: it answers each line with
// "echo: <line>" and, when the client half-closes, with "bye" before it
// closes.
func lineServer(t *testing.T) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]struct{}{}
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = struct{}{}
			mu.Unlock()
			wg.Go(func() {
				defer c.Close()
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					if _, err := io.WriteString(c, "echo: "+sc.Text()+"\n"); err != nil {
						return
					}
				}
				if sc.Err() == nil {
					_, _ = io.WriteString(c, "bye\n")
				}
			})
		}
	})
	return ln.Addr().(*net.TCPAddr).Port
}

func newTCPRoutes(t *testing.T, r Resolver) *TCPRoutes {
	routes, err := NewTCPRoutes(r, WithLogger(testLogger(t)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { routes.Close() })
	return routes
}

func TestTCPRoute(t *testing.T) {
	sbx := newFakeSandboxes()
	sbx.add("sbx1", "")
	port := lineServer(t)
	routes := newTCPRoutes(t, sbx)
	ctx := context.Background()

	addr, err := routes.Open(ctx, "sbx1", port)
	if err != nil {
		t.Fatal(err)
	}
	if host, _, _ := net.SplitHostPort(addr); host != "127.0.0.1" {
		t.Errorf("route listens on %s, want 127.0.0.1", addr)
	}
	again, err := routes.Open(ctx, "sbx1", port)
	if err != nil || again != addr {
		t.Errorf("second Open = %q, %v; want %q", again, err, addr)
	}
	if got := routes.Ports("sbx1"); len(got) != 1 || got[0] != port {
		t.Errorf("Ports(sbx1) = %v, want [%d]", got, port)
	}
	if got := routes.Ports("sbx2"); len(got) != 0 {
		t.Errorf("Ports(sbx2) = %v, want none", got)
	}

	// A line protocol both ways, then a half-close passed on to the guest.
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	for _, line := range []string{"hello", "world"} {
		if _, err := io.WriteString(c, line+"\n"); err != nil {
			t.Fatal(err)
		}
		got, err := br.ReadString('\n')
		if err != nil || got != "echo: "+line+"\n" {
			t.Fatalf("got %q, %v", got, err)
		}
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if rest, err := io.ReadAll(br); err != nil || string(rest) != "bye\n" {
		t.Fatalf("after half-close: %q, %v; want bye", rest, err)
	}

	// CloseSandbox ends live conns and the listener.
	live, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	lr := bufio.NewReader(live)
	if _, err := io.WriteString(live, "still here\n"); err != nil {
		t.Fatal(err)
	}
	if got, err := lr.ReadString('\n'); err != nil || got != "echo: still here\n" {
		t.Fatalf("got %q, %v", got, err)
	}
	routes.CloseSandbox("sbx1")
	if err := live.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := lr.ReadString('\n'); err == nil || isTimeout(err) {
		t.Fatalf("read after CloseSandbox: %v, want the conn closed", err)
	}
	if c, err := net.Dial("tcp", addr); err == nil {
		c.Close()
		t.Error("route still accepts after CloseSandbox")
	}
	if _, ok := routes.Addr("sbx1", port); ok {
		t.Error("route still listed after CloseSandbox")
	}
	waitFor(t, "conns to close", 10*time.Second, func() bool { return routes.conns.count("sbx1") == 0 })
}

// isTimeout reports a read deadline that passed.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func TestTCPRouteErrors(t *testing.T) {
	sbx := newFakeSandboxes()
	sbx.add("sbx1", "")
	routes := newTCPRoutes(t, sbx)
	ctx := context.Background()

	if _, err := routes.Open(ctx, "nosuch", 22); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("unknown sandbox: %v, want ErrNotFound", err)
	}
	if _, err := routes.Open(ctx, "sbx1", 0); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("port 0: %v, want ErrInvalidArgument", err)
	}
	if _, err := routes.Open(ctx, "Bad/Id", 22); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("bad id: %v, want ErrInvalidArgument", err)
	}

	// Nothing listening on the guest port: the client's conn is closed.
	addr, err := routes.Open(ctx, "sbx1", freePort(t))
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil || isTimeout(err) {
		t.Errorf("read from a route with no guest listener: %d, %v; want the conn closed", n, err)
	}

	// A sandbox that went away without CloseSandbox: its routes close at the
	// next connection.
	port := lineServer(t)
	addr, err = routes.Open(ctx, "sbx1", port)
	if err != nil {
		t.Fatal(err)
	}
	sbx.remove("sbx1")
	if c, err := net.Dial("tcp", addr); err == nil {
		c.Close()
	}
	waitFor(t, "the gone sandbox's route to close", 10*time.Second, func() bool {
		_, ok := routes.Addr("sbx1", port)
		return !ok
	})

	if err := routes.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := routes.Open(ctx, "sbx1", port); err == nil {
		t.Error("Open after Close succeeded")
	}
}

func TestTCPRouteConcurrentOpen(t *testing.T) {
	sbx := newFakeSandboxes()
	sbx.add("sbx1", "")
	port := lineServer(t)
	routes := newTCPRoutes(t, sbx)

	const n = 10
	addrs := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { addrs[i], errs[i] = routes.Open(context.Background(), "sbx1", port) })
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil || addrs[i] != addrs[0] {
			t.Fatalf("open %d: %q, %v; want %q", i, addrs[i], errs[i], addrs[0])
		}
	}
}

func TestProxyConnect(t *testing.T) {
	const token = "0123456789abcdef0123456789abcdef"
	sbx := newFakeSandboxes()
	sbx.add("sbx1", "")
	sbx.add("priv", token)
	port := lineServer(t)
	s := startProxy(t, sbx)

	connect := func(t *testing.T, id, extra, early string) (net.Conn, *bufio.Reader, string) {
		c, err := net.Dial("tcp", s.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if err := c.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
			t.Fatal(err)
		}
		authority := Route{SandboxID: id, Port: port}.Host(s.Domain()) + ":443"
		req := "CONNECT " + authority + " HTTP/1.1\r\nHost: " + authority + "\r\n" + extra + "\r\n" + early
		if _, err := io.WriteString(c, req); err != nil {
			t.Fatal(err)
		}
		br := bufio.NewReader(c)
		status, err := br.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		return c, br, status
	}

	t.Run("tunnel", func(t *testing.T) {
		c, br, status := connect(t, "sbx1", "", "early\n")
		if status != "HTTP/1.1 200 Connection Established\r\n" {
			t.Fatalf("status line %q", status)
		}
		if blank, err := br.ReadString('\n'); err != nil || blank != "\r\n" {
			t.Fatalf("after the status line: %q, %v", blank, err)
		}
		if got, err := br.ReadString('\n'); err != nil || got != "echo: early\n" {
			t.Fatalf("early bytes: %q, %v", got, err)
		}
		if _, err := io.WriteString(c, "late\n"); err != nil {
			t.Fatal(err)
		}
		if got, err := br.ReadString('\n'); err != nil || got != "echo: late\n" {
			t.Fatalf("got %q, %v", got, err)
		}
		s.CloseSandbox("sbx1")
		if _, err := br.ReadString('\n'); err == nil || isTimeout(err) {
			t.Fatalf("read after CloseSandbox: %v, want the tunnel closed", err)
		}
	})
	t.Run("private without token", func(t *testing.T) {
		before := sbx.dials.Load()
		_, _, status := connect(t, "priv", "", "")
		if !strings.HasPrefix(status, "HTTP/1.1 401") {
			t.Fatalf("status line %q, want 401", status)
		}
		if sbx.dials.Load() != before {
			t.Error("the guest was dialled")
		}
	})
	t.Run("private with token", func(t *testing.T) {
		_, _, status := connect(t, "priv", "e2b-traffic-access-token: "+token+"\r\n", "")
		if !strings.HasPrefix(status, "HTTP/1.1 200") {
			t.Fatalf("status line %q, want 200", status)
		}
	})
}

// closingResolver resolves through sbx, running hook once on the first
// Resolve, before answering.
type closingResolver struct {
	sbx  *fakeSandboxes
	hook func()
	ran  atomic.Bool
}

func (r *closingResolver) Resolve(ctx context.Context, id string) (Target, error) {
	tgt, err := r.sbx.Resolve(ctx, id)
	if r.ran.CompareAndSwap(false, true) && r.hook != nil {
		r.hook()
	}
	return tgt, err
}

// TestTCPRouteOpenRacesClose runs CloseSandbox while Open resolves: the
// resolved sandbox has ended, so no listener may stay behind for it.
func TestTCPRouteOpenRacesClose(t *testing.T) {
	port := lineServer(t)

	t.Run("sandbox gone", func(t *testing.T) {
		sbx := newFakeSandboxes()
		sbx.add("sbx1", "")
		r := &closingResolver{sbx: sbx}
		routes := newTCPRoutes(t, r)
		r.hook = func() {
			sbx.remove("sbx1")
			routes.CloseSandbox("sbx1")
		}
		addr, err := routes.Open(context.Background(), "sbx1", port)
		if !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("Open racing CloseSandbox: %q, %v; want ErrNotFound", addr, err)
		}
		if a, ok := routes.Addr("sbx1", port); ok {
			t.Errorf("a route of the ended sandbox stayed open at %q", a)
		}
	})

	t.Run("new sandbox, same id", func(t *testing.T) {
		sbx := newFakeSandboxes()
		sbx.add("sbx1", "")
		r := &closingResolver{sbx: sbx}
		routes := newTCPRoutes(t, r)
		// The old sandbox ends and a private one takes its id: the route
		// must be the new sandbox's, with no raw listener.
		r.hook = func() {
			routes.CloseSandbox("sbx1")
			sbx.add("sbx1", "0123456789abcdef0123456789abcdef")
		}
		addr, err := routes.Open(context.Background(), "sbx1", port)
		if err != nil || addr != "" {
			t.Errorf("Open racing a replaced sandbox: %q, %v; want no listener", addr, err)
		}
		if a, ok := routes.Addr("sbx1", port); !ok || a != "" {
			t.Errorf("route after the race: %q, %v; want open without a listener", a, ok)
		}
	})
}
