package proxy

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// seen is what the echo backend reports about a request.
type seen struct {
	Method       string `json:"method"`
	Path         string `json:"path"`
	Host         string `json:"host"`
	Token        string `json:"token"`
	Body         string `json:"body"`
	ForwardedFor string `json:"forwarded_for"`
}

func echoHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(seen{
			Method:       r.Method,
			Path:         r.URL.RequestURI(),
			Host:         r.Host,
			Token:        r.Header.Get(TrafficTokenHeader),
			Body:         string(body),
			ForwardedFor: r.Header.Get("X-Forwarded-For"),
		})
	})
}

// do sends req and returns the status and body.
func do(t *testing.T, c *http.Client, req *http.Request) (int, string) {
	t.Helper()
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read body: %v", err)
	}
	return resp.StatusCode, string(b)
}

func TestProxyByHost(t *testing.T) {
	sbx := newFakeSandboxes()
	sbx.add("sbx1", "")
	be := newBackend(t, echoHandler())
	s := startProxy(t, sbx)
	c := proxyClient(t, s)

	url := proxyURL(s, be.port, "sbx1", "/hello?x=1")
	req, _ := http.NewRequest(http.MethodPost, url, strings.NewReader("ping"))
	status, body := do(t, c, req)
	if status != http.StatusOK {
		t.Fatalf("status %d: %s", status, body)
	}
	var got seen
	if err := json.Unmarshal([]byte(body), &got); err != nil {
		t.Fatal(err)
	}
	wantHost := req.URL.Host
	if got.Method != "POST" || got.Path != "/hello?x=1" || got.Body != "ping" || got.Host != wantHost {
		t.Errorf("backend saw %+v; want POST /hello?x=1 body ping host %s", got, wantHost)
	}
	if got.ForwardedFor != "127.0.0.1" {
		t.Errorf("X-Forwarded-For = %q, want 127.0.0.1", got.ForwardedFor)
	}
}

func TestProxyByHeaders(t *testing.T) {
	sbx := newFakeSandboxes()
	sbx.add("sbx1", "")
	be := newBackend(t, echoHandler())
	s := startProxy(t, sbx)
	c := proxyClient(t, s)

	for _, host := range []string{"127.0.0.1", "localhost"} {
		url := fmt.Sprintf("http://%s:%d/via-headers", host, s.Addr().(*net.TCPAddr).Port)
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		req.Header.Set("e2b-sandbox-id", "sbx1")
		req.Header.Set("e2b-sandbox-port", strconv.Itoa(be.port))
		status, body := do(t, c, req)
		if status != http.StatusOK || !strings.Contains(body, `"path":"/via-headers"`) {
			t.Errorf("host %s: status %d body %s", host, status, body)
		}
	}
}

func TestProxyPrivateSandbox(t *testing.T) {
	const token = "0123456789abcdef0123456789abcdef"
	sbx := newFakeSandboxes()
	sbx.add("priv", token)
	be := newBackend(t, echoHandler())
	s := startProxy(t, sbx)
	c := proxyClient(t, s)
	url := proxyURL(s, be.port, "priv", "/")

	req, _ := http.NewRequest(http.MethodGet, url, nil)
	req.Header.Set("e2b-traffic-access-token", token)
	status, body := do(t, c, req)
	if status != http.StatusOK {
		t.Fatalf("with the token: status %d: %s", status, body)
	}
	var got seen
	if err := json.Unmarshal([]byte(body), &got); err != nil {
		t.Fatal(err)
	}
	if got.Token != "" {
		t.Errorf("the token header reached the guest: %q", got.Token)
	}
}

func TestProxyErrors(t *testing.T) {
	const token = "0123456789abcdef0123456789abcdef"
	sbx := newFakeSandboxes()
	sbx.add("pub", "")
	sbx.add("priv", token)
	be := newBackend(t, echoHandler())
	s := startProxy(t, sbx)
	c := proxyClient(t, s)
	pp := s.Addr().(*net.TCPAddr).Port
	closed := freePort(t)

	tests := []struct {
		name    string
		url     string
		headers map[string]string
		status  int
		body    string
	}{
		{"bad host", fmt.Sprintf("http://abc.localhost:%d/", pp), nil, 400, "bad route"},
		{"bad port in host", fmt.Sprintf("http://99999-pub.localhost:%d/", pp), nil, 400, "bad route"},
		{"bare host, no headers", fmt.Sprintf("http://127.0.0.1:%d/", pp), nil, 400, "e2b-sandbox-id"},
		{"bad port header", fmt.Sprintf("http://127.0.0.1:%d/", pp),
			map[string]string{"e2b-sandbox-id": "pub", "e2b-sandbox-port": "x"}, 400, "bad e2b-sandbox-port"},
		{"unknown sandbox", proxyURL(s, be.port, "nosuch", "/"), nil, 404, "sandbox nosuch not found"},
		{"unknown sandbox by headers", fmt.Sprintf("http://127.0.0.1:%d/", pp),
			map[string]string{"e2b-sandbox-id": "nosuch", "e2b-sandbox-port": "80"}, 404, "sandbox nosuch not found"},
		{"nothing listening", proxyURL(s, closed, "pub", "/"), nil, 502,
			fmt.Sprintf("nothing listening on port %d in sandbox pub", closed)},
		{"private, no token", proxyURL(s, be.port, "priv", "/"), nil, 401, "missing e2b-traffic-access-token"},
		{"private, wrong token", proxyURL(s, be.port, "priv", "/"),
			map[string]string{"e2b-traffic-access-token": "nope"}, 403, "wrong e2b-traffic-access-token"},
		{"private, other sandbox's token", proxyURL(s, be.port, "priv", "/"),
			map[string]string{"e2b-traffic-access-token": strings.ToUpper(token)}, 403, "wrong e2b-traffic-access-token"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := be.requests.Load()
			req, _ := http.NewRequest(http.MethodGet, tt.url, nil)
			for k, v := range tt.headers {
				req.Header.Set(k, v)
			}
			resp, err := c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tt.status || !strings.Contains(string(b), tt.body) {
				t.Errorf("got %d %q; want %d containing %q", resp.StatusCode, b, tt.status, tt.body)
			}
			if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
				t.Errorf("Content-Type = %q, want text/plain", ct)
			}
			if n := be.requests.Load() - before; n != 0 {
				t.Errorf("the guest saw %d requests", n)
			}
		})
	}
	if n := sbx.dials.Load(); n != 1 {
		t.Errorf("guest dialled %d times, want 1 (only the nothing-listening case)", n)
	}
}

func TestProxyServerSentEvents(t *testing.T) {
	sbx := newFakeSandboxes()
	sbx.add("sbx1", "")
	release := make(chan struct{})
	handlerDone := make(chan struct{})
	be := newBackend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer close(handlerDone)
		w.Header().Set("Content-Type", "text/event-stream")
		rc := http.NewResponseController(w)
		for i := range 3 {
			fmt.Fprintf(w, "data: event %d\n\n", i)
			if err := rc.Flush(); err != nil {
				return
			}
			select {
			case <-release:
			case <-r.Context().Done():
				return
			}
		}
	}))
	s := startProxy(t, sbx)
	c := proxyClient(t, s)
	t.Cleanup(func() {
		select {
		case <-release:
		default:
			close(release)
		}
	})

	resp, err := c.Get(proxyURL(s, be.port, "sbx1", "/events"))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	for i := range 3 {
		// Each event arrives while the handler is still blocked: the proxy
		// does not buffer the stream.
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("event %d: %v", i, err)
		}
		if want := fmt.Sprintf("data: event %d\n", i); line != want {
			t.Fatalf("event %d: got %q, want %q", i, line, want)
		}
		if _, err := br.ReadString('\n'); err != nil {
			t.Fatal(err)
		}
		select {
		case <-handlerDone:
			t.Fatalf("handler finished before event %d was read", i)
		default:
		}
		release <- struct{}{}
	}
	if _, err := io.ReadAll(br); err != nil {
		t.Fatal(err)
	}
	<-handlerDone
}

func TestProxyStreamingUpload(t *testing.T) {
	sbx := newFakeSandboxes()
	sbx.add("sbx1", "")
	be := newBackend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, err := io.Copy(h, r.Body)
		if err != nil {
			http.Error(w, err.Error(), 500)
			return
		}
		fmt.Fprintf(w, "%d %x", n, h.Sum(nil))
	}))
	s := startProxy(t, sbx)
	c := proxyClient(t, s)

	// A chunked upload of 16 MiB written while the request is in flight.
	const size = 16 << 20
	pr, pw := io.Pipe()
	want := sha256.New()
	writeErr := make(chan error, 1)
	go func() {
		chunk := make([]byte, 64<<10)
		for i := 0; i < size/len(chunk); i++ {
			for j := range chunk {
				chunk[j] = byte(i + j)
			}
			want.Write(chunk)
			if _, err := pw.Write(chunk); err != nil {
				writeErr <- err
				return
			}
		}
		writeErr <- pw.Close()
	}()
	req, _ := http.NewRequest(http.MethodPut, proxyURL(s, be.port, "sbx1", "/upload"), pr)
	status, body := do(t, c, req)
	if err := <-writeErr; err != nil {
		t.Fatal(err)
	}
	if wantBody := fmt.Sprintf("%d %s", size, hex.EncodeToString(want.Sum(nil))); status != 200 || body != wantBody {
		t.Errorf("got %d %q, want 200 %q", status, body, wantBody)
	}
}

func TestProxyWebSocket(t *testing.T) {
	sbx := newFakeSandboxes()
	sbx.add("sbx1", "")
	be := newBackend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer ws.CloseNow()
		ws.SetReadLimit(2 << 20)
		for {
			typ, msg, err := ws.Read(r.Context())
			if err != nil {
				return
			}
			if err := ws.Write(r.Context(), typ, append([]byte("echo: "), msg...)); err != nil {
				return
			}
		}
	}))
	s := startProxy(t, sbx)
	c := proxyClient(t, s)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	url := strings.Replace(proxyURL(s, be.port, "sbx1", "/ws"), "http://", "ws://", 1)
	ws, _, err := websocket.Dial(ctx, url, &websocket.DialOptions{HTTPClient: c})
	if err != nil {
		t.Fatal(err)
	}
	defer ws.CloseNow()
	for i := range 5 {
		msg := fmt.Sprintf("message %d", i)
		if err := ws.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
			t.Fatal(err)
		}
		typ, got, err := ws.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if typ != websocket.MessageText || string(got) != "echo: "+msg {
			t.Fatalf("got %v %q, want text %q", typ, got, "echo: "+msg)
		}
	}
	big := make([]byte, 1<<20)
	for i := range big {
		big[i] = byte(i)
	}
	ws.SetReadLimit(2 << 20)
	if err := ws.Write(ctx, websocket.MessageBinary, big); err != nil {
		t.Fatal(err)
	}
	if _, got, err := ws.Read(ctx); err != nil || len(got) != len(big)+6 {
		t.Fatalf("binary echo: %d bytes, %v", len(got), err)
	}

	// CloseSandbox ends the WebSocket.
	s.CloseSandbox("sbx1")
	if _, _, err := ws.Read(ctx); err == nil {
		t.Fatal("read after CloseSandbox succeeded")
	} else if ctx.Err() != nil {
		t.Fatal("CloseSandbox did not end the WebSocket")
	}
}

func TestProxyConcurrent(t *testing.T) {
	sbx := newFakeSandboxes()
	sbx.add("sbx1", "")
	be := newBackend(t, echoHandler())
	s := startProxy(t, sbx)
	c := proxyClient(t, s)

	const n = 50
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			path := fmt.Sprintf("/req/%d", i)
			resp, err := c.Get(proxyURL(s, be.port, "sbx1", path))
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			var got seen
			if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
				errs <- err
				return
			}
			if resp.StatusCode != 200 || got.Path != path {
				errs <- fmt.Errorf("request %d: status %d path %q", i, resp.StatusCode, got.Path)
				return
			}
			errs <- nil
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if got := be.requests.Load(); got != n {
		t.Errorf("backend saw %d requests, want %d", got, n)
	}
	// The keep-alive pool keeps at most DefaultMaxIdlePerRoute streams idle.
	waitFor(t, fmt.Sprintf("at most %d streams kept open", DefaultMaxIdlePerRoute), 10*time.Second, func() bool {
		return s.conns.count("sbx1") <= DefaultMaxIdlePerRoute
	})
}

func TestProxyKeepAlive(t *testing.T) {
	for _, tt := range []struct {
		name               string
		opts               []Option
		minDials, maxDials int64
	}{
		// A stream goes back to the pool just after its response is
		// read, so a quick next request may dial once more.
		{"pooled", nil, 1, 3},
		{"one stream per request", []Option{WithMaxIdlePerRoute(0)}, 10, 10},
	} {
		t.Run(tt.name, func(t *testing.T) {
			sbx := newFakeSandboxes()
			sbx.add("sbx1", "")
			be := newBackend(t, echoHandler())
			s := startProxy(t, sbx, tt.opts...)
			c := proxyClient(t, s)
			for range 10 {
				req, _ := http.NewRequest(http.MethodGet, proxyURL(s, be.port, "sbx1", "/"), nil)
				if status, body := do(t, c, req); status != 200 {
					t.Fatalf("status %d: %s", status, body)
				}
			}
			if got := sbx.dials.Load(); got < tt.minDials || got > tt.maxDials {
				t.Errorf("%d guest dials for 10 sequential requests, want %d-%d", got, tt.minDials, tt.maxDials)
			}
		})
	}
}

func TestServerLifecycle(t *testing.T) {
	sbx := newFakeSandboxes()
	s, err := NewServer(sbx, WithLogger(testLogger(t)))
	if err != nil {
		t.Fatal(err)
	}
	if s.Addr() != nil {
		t.Error("Addr before Start is not nil")
	}
	if err := s.Start(context.Background(), "127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background(), "127.0.0.1:0"); err == nil {
		t.Error("second Start succeeded")
	}
	addr := s.Addr().String()
	reply := s.RouteReply(Route{SandboxID: "abc", Port: 3000}, "127.0.0.1:5555")
	if want := "http://3000-abc.localhost:" + strconv.Itoa(s.Addr().(*net.TCPAddr).Port); reply.URL != want {
		t.Errorf("RouteReply URL = %q, want %q", reply.URL, want)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.Shutdown(ctx); err != nil {
		t.Fatalf("second Shutdown: %v", err)
	}
	if c, err := net.Dial("tcp", addr); err == nil {
		c.Close()
		t.Error("proxy still accepts after Shutdown")
	}
}

func TestServerShutdownEndsStreams(t *testing.T) {
	sbx := newFakeSandboxes()
	sbx.add("sbx1", "")
	be := newBackend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/ws" {
			ws, err := websocket.Accept(w, r, nil)
			if err != nil {
				return
			}
			defer ws.CloseNow()
			_, _, _ = ws.Read(r.Context()) // until the proxy closes the stream
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprint(w, "data: first\n\n")
		_ = http.NewResponseController(w).Flush()
		<-r.Context().Done() // an endless stream
	}))
	s, err := NewServer(sbx, WithLogger(testLogger(t)))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background(), "127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	c := proxyClient(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	url := strings.Replace(proxyURL(s, be.port, "sbx1", "/ws"), "http://", "ws://", 1)
	ws, _, err := websocket.Dial(ctx, url, &websocket.DialOptions{HTTPClient: c})
	if err != nil {
		t.Fatal(err)
	}
	defer ws.CloseNow()
	resp, err := c.Get(proxyURL(s, be.port, "sbx1", "/events"))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	if line, err := br.ReadString('\n'); err != nil || line != "data: first\n" {
		t.Fatalf("first event: %q, %v", line, err)
	}

	// The SSE stream holds Shutdown to its deadline; then everything closes.
	sctx, scancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer scancel()
	if err := s.Shutdown(sctx); err == nil {
		t.Error("Shutdown with an endless stream in flight returned no error")
	}
	if _, _, err := ws.Read(ctx); err == nil || ctx.Err() != nil {
		t.Errorf("WebSocket read after Shutdown: %v, want closed", err)
	}
	if _, err := io.ReadAll(br); ctx.Err() != nil {
		t.Errorf("SSE stream still open after Shutdown: %v", err)
	}
}
