package proxy

import (
	"io"
	"net/http"
	"strconv"
	"testing"
)

// TestLocalPort: a WithLocalPort port of a known sandbox is answered by its
// handler with the route in the context, without the traffic token check
// and without dialling the guest; an unknown sandbox is 404 before the
// handler; other ports still go to the guest.
func TestLocalPort(t *testing.T) {
	sbx := newFakeSandboxes()
	sbx.add("priv", "the-token")
	local := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rt, ok := LocalRoute(r.Context())
		if !ok {
			http.Error(w, "no route", http.StatusInternalServerError)
			return
		}
		_, _ = io.WriteString(w, "local "+rt.String())
	})
	s := startProxy(t, sbx, WithLocalPort(49983, local))
	c := proxyClient(t, s)
	get := func(url string, header map[string]string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		for k, v := range header {
			req.Header.Set(k, v)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get(proxyURL(s, 49983, "priv", "/x"), nil); code != 200 || body != "local 49983-priv" {
		t.Errorf("local port of a private sandbox without a token: %d %q, want the handler's answer", code, body)
	}
	if code, body := get("http://"+s.Addr().String()+"/x", map[string]string{"E2b-Sandbox-Id": "priv", "E2b-Sandbox-Port": "49983"}); code != 200 || body != "local 49983-priv" {
		t.Errorf("local port by headers: %d %q", code, body)
	}
	if code, _ := get(proxyURL(s, 49983, "nope", "/x"), nil); code != http.StatusNotFound {
		t.Errorf("local port of an unknown sandbox: %d, want 404", code)
	}
	if code, _ := get(proxyURL(s, 8000, "priv", "/x"), nil); code != http.StatusUnauthorized {
		t.Errorf("another port of a private sandbox without a token: %d, want 401", code)
	}
	if n := sbx.dials.Load(); n != 0 {
		t.Errorf("%d dials to the guest, want none", n)
	}
	if err := WithLocalPort(0, local)(&options{}); err == nil {
		t.Error("local port 0 accepted")
	}
}

// failingLocal is a local port handler that answers unresolved routes
// itself.
type failingLocal struct{ http.HandlerFunc }

func (failingLocal) FailRoute(w http.ResponseWriter, _ *http.Request, rt Route, status int, msg string) {
	w.WriteHeader(http.StatusTeapot)
	_, _ = io.WriteString(w, rt.String()+" "+strconv.Itoa(status)+" "+msg)
}

// TestLocalPortRouteFailer: a local port handler that is a RouteFailer
// answers the requests for an unknown sandbox; other ports keep the
// proxy's 404.
func TestLocalPortRouteFailer(t *testing.T) {
	sbx := newFakeSandboxes()
	sbx.add("pub", "")
	local := failingLocal{func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "local") }}
	s := startProxy(t, sbx, WithLocalPort(49983, local))
	c := proxyClient(t, s)
	get := func(url string) (int, string) {
		t.Helper()
		resp, err := c.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get(proxyURL(s, 49983, "nope", "/x")); code != http.StatusTeapot || body != "49983-nope 404 sandbox nope not found" {
		t.Errorf("local port of an unknown sandbox: %d %q, want the handler's FailRoute", code, body)
	}
	if code, body := get(proxyURL(s, 49983, "pub", "/x")); code != 200 || body != "local" {
		t.Errorf("local port of a known sandbox: %d %q", code, body)
	}
	if code, _ := get(proxyURL(s, 8000, "nope", "/x")); code != http.StatusNotFound {
		t.Errorf("another port of an unknown sandbox: %d, want 404", code)
	}
}
