//go:build unix

package proxy

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/internal/socketpair"

	"github.com/coder/websocket"
	"github.com/firkin-dev/firkin-worker/agent"
	"github.com/firkin-dev/firkin-worker/errdefs"
)

// agentTarget runs a real guest agent (no VM: the agent's server in this
// process on one end of a socket pair, like the virtio port) and returns a
// Target whose Dial is the agent client's DialGuest, exactly as the runtime
// wires it. The "guest's" loopback is the host's here.
func agentTarget(t testing.TB) Target {
	t.Helper()
	host, guest := socketpair.New(t)

	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = (&agent.Server{}).Serve(ctx, guest)
	}()
	cctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer ccancel()
	client, err := agent.Connect(cctx, host)
	if err != nil {
		cancel()
		t.Fatalf("agent connect: %v", err)
	}
	t.Cleanup(func() {
		client.Close()
		cancel()
		host.Close()
		guest.Close()
		<-served
	})
	return Target{Dial: client.DialGuest, Public: true}
}

func TestProxyThroughAgent(t *testing.T) {
	target := agentTarget(t)
	resolver := ResolverFunc(func(_ context.Context, id string) (Target, error) {
		if id != "sbx1" {
			return Target{}, errdefs.Wrap(errdefs.ErrNotFound, errors.New("no such sandbox"))
		}
		return target, nil
	})
	mux := http.NewServeMux()
	mux.Handle("/echo", echoHandler())
	mux.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		ws, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer ws.CloseNow()
		for {
			typ, msg, err := ws.Read(r.Context())
			if err != nil {
				return
			}
			if err := ws.Write(r.Context(), typ, msg); err != nil {
				return
			}
		}
	})
	be := newBackend(t, mux)
	s := startProxy(t, resolver)
	c := proxyClient(t, s)

	t.Run("http", func(t *testing.T) {
		for i := range 3 {
			req, _ := http.NewRequest(http.MethodPost, proxyURL(s, be.port, "sbx1", "/echo"), strings.NewReader("body"))
			status, body := do(t, c, req)
			var got seen
			if err := json.Unmarshal([]byte(body), &got); status != 200 || err != nil || got.Body != "body" {
				t.Fatalf("request %d: %d %q", i, status, body)
			}
		}
	})
	t.Run("nothing listening", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodGet, proxyURL(s, freePort(t), "sbx1", "/"), nil)
		if status, body := do(t, c, req); status != 502 || !strings.Contains(body, "nothing listening") {
			t.Fatalf("got %d %q, want 502", status, body)
		}
	})
	t.Run("websocket", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		url := strings.Replace(proxyURL(s, be.port, "sbx1", "/ws"), "http://", "ws://", 1)
		ws, _, err := websocket.Dial(ctx, url, &websocket.DialOptions{HTTPClient: c})
		if err != nil {
			t.Fatal(err)
		}
		defer ws.CloseNow()
		if err := ws.Write(ctx, websocket.MessageText, []byte("hi")); err != nil {
			t.Fatal(err)
		}
		if _, got, err := ws.Read(ctx); err != nil || string(got) != "hi" {
			t.Fatalf("echo: %q, %v", got, err)
		}
		_ = ws.Close(websocket.StatusNormalClosure, "")
	})
	t.Run("tcp route with half-close", func(t *testing.T) {
		routes := newTCPRoutes(t, resolver)
		addr, err := routes.Open(context.Background(), "sbx1", lineServer(t))
		if err != nil {
			t.Fatal(err)
		}
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if err := conn.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(conn, "one\ntwo\n"); err != nil {
			t.Fatal(err)
		}
		if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		all, err := io.ReadAll(bufio.NewReader(conn))
		if err != nil || string(all) != "echo: one\necho: two\nbye\n" {
			t.Fatalf("got %q, %v", all, err)
		}
	})
}

// BenchmarkProxyThroughAgent is BenchmarkProxy's "proxy" case with the
// guest streams going through a real agent channel (in process, no VM).
func BenchmarkProxyThroughAgent(b *testing.B) {
	target := agentTarget(b)
	resolver := ResolverFunc(func(context.Context, string) (Target, error) { return target, nil })
	be := newBackend(b, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "ok")
	}))
	for _, c := range []struct {
		name string
		opts []Option
	}{
		{"pooled", nil},
		{"no-keepalive", []Option{WithMaxIdlePerRoute(0)}},
	} {
		b.Run(c.name, func(b *testing.B) {
			s := startProxy(b, resolver, c.opts...)
			client := proxyClient(b, s)
			url := proxyURL(s, be.port, "sbx1", "/")
			lat := make([]time.Duration, 0, b.N)
			start := time.Now()
			for b.Loop() {
				t0 := time.Now()
				get(b, client, url)
				lat = append(lat, time.Since(t0))
			}
			report(b, start, lat)
		})
	}
}
