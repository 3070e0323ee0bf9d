package proxy

import (
	"bufio"
	"bytes"
	"context"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/tokens"
)

const (
	fuzzDomain = "sbx.test"
	fuzzSecret = "fuzz secret of sixteen bytes"
	fuzzGen    = "0123456789abcdef"
)

var fuzzToken = tokens.TrafficToken([]byte(fuzzSecret), "sb1", fuzzGen)

// FuzzServeHTTP sends the proxy any request a client can send (raw bytes
// parsed as the HTTP server parses them). Sandbox sb1 is private with a
// real traffic token, pub is public; the guest is an in-memory HTTP server
// that records what reaches it. Properties: the proxy never panics; nothing
// reaches a private sandbox's guest unless the request carried its token,
// and only on a valid route; what reaches a guest never carries the token
// header; 401/403 answers never echo the token presented.
func FuzzServeHTTP(f *testing.F) {
	for _, s := range []string{
		"GET / HTTP/1.1\r\nHost: 8080-sb1.sbx.test\r\nE2b-Traffic-Access-Token: " + fuzzToken + "\r\n\r\n",
		"GET /x HTTP/1.1\r\nHost: 8080-sb1.sbx.test\r\ne2b-traffic-access-token: " + fuzzToken + "\r\ne2b-traffic-access-token: other\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: 8080-sb1.sbx.test\r\nE2b-Traffic-Access-Token: " + fuzzToken[:63] + "0\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: 8080-sb1.sbx.test\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nE2b-Sandbox-Id: sb1\r\nE2b-Sandbox-Port: 3000\r\nE2b-Traffic-Access-Token: " + fuzzToken + "\r\n\r\n",
		"POST / HTTP/1.1\r\nHost: 80-pub.sbx.test\r\nContent-Length: 3\r\nE2b-Traffic-Access-Token: x\r\n\r\nabc",
		"CONNECT 22-sb1.sbx.test:443 HTTP/1.1\r\nHost: 22-sb1.sbx.test:443\r\nE2b-Traffic-Access-Token: " + fuzzToken + "\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: 0-sb1.sbx.test\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: 8080-sb2.sbx.test\r\nE2b-Traffic-Access-Token: " + fuzzToken + "\r\n\r\n",
		"GET http://8080-sb1.sbx.test/ HTTP/1.1\r\nHost: 8080-pub.sbx.test\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(raw)))
		if err != nil {
			return
		}
		req.RemoteAddr = "127.0.0.1:40000"
		var mu sync.Mutex
		var reached []*http.Request
		var dialed []Route
		guest := func(id string) func(ctx context.Context, port int) (net.Conn, error) {
			return func(ctx context.Context, port int) (net.Conn, error) {
				mu.Lock()
				dialed = append(dialed, Route{SandboxID: id, Port: port})
				mu.Unlock()
				host, g := net.Pipe()
				go func() {
					defer g.Close()
					in, err := http.ReadRequest(bufio.NewReader(g))
					if err != nil {
						return
					}
					mu.Lock()
					reached = append(reached, in)
					mu.Unlock()
					_, _ = g.Write([]byte("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"))
				}()
				return host, nil
			}
		}
		res := ResolverFunc(func(_ context.Context, id string) (Target, error) {
			switch id {
			case "sb1":
				return Target{Dial: guest(id), VerifyToken: func(tok string) bool {
					return tokens.VerifyTraffic([]byte(fuzzSecret), "sb1", fuzzGen, tok)
				}}, nil
			case "pub":
				return Target{Dial: guest(id), Public: true}, nil
			}
			return Target{}, errdefs.Wrap(errdefs.ErrNotFound, errFuzzUnknown)
		})
		s, err := NewServer(res, WithDomain(fuzzDomain), WithLogger(slog.New(slog.DiscardHandler)))
		if err != nil {
			t.Fatal(err)
		}
		defer s.CloseSandbox("sb1")
		defer s.CloseSandbox("pub")
		w := httptest.NewRecorder()
		s.ServeHTTP(w, req)

		presented := req.Header.Get(TrafficTokenHeader)
		mu.Lock()
		defer mu.Unlock()
		for _, d := range dialed {
			if d.Validate() != nil {
				t.Fatalf("dialled invalid route %v", d)
			}
			if d.SandboxID == "sb1" && presented != fuzzToken {
				t.Fatalf("sb1 dialled with token %q: %q", presented, raw)
			}
		}
		for _, in := range reached {
			for k := range in.Header {
				if strings.EqualFold(k, TrafficTokenHeader) {
					t.Fatalf("token header forwarded to the guest: %q", raw)
				}
			}
		}
		if code := w.Code; code == http.StatusUnauthorized || code == http.StatusForbidden {
			if len(dialed) > 0 {
				t.Fatalf("answered %d after dialling %v", code, dialed)
			}
			if len(presented) >= 8 && strings.Contains(w.Body.String(), presented) {
				t.Fatalf("answer %d echoes the token: %q", code, w.Body.String())
			}
		}
	})
}

var errFuzzUnknown = errorString("no such sandbox")

type errorString string

func (e errorString) Error() string { return string(e) }
