package proxy

import (
	"errors"
	"net/http"
	"strings"
	"testing"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

func TestParseHost(t *testing.T) {
	tests := []struct {
		host, domain string
		want         Route
		ok           bool
		wantErr      bool
	}{
		{host: "3000-abc.localhost", domain: "localhost", want: Route{"abc", 3000}, ok: true},
		{host: "3000-abc.localhost:8080", domain: "localhost", want: Route{"abc", 3000}, ok: true},
		{host: "3000-ABC.LocalHost.", domain: "localhost", want: Route{"abc", 3000}, ok: true},
		{host: "80-a-b-c.sbx.example.com", domain: "sbx.example.com", want: Route{"a-b-c", 80}, ok: true},
		{host: "65535-x.example.com", domain: "example.com.", want: Route{"x", 65535}, ok: true},
		{host: "1-0.localhost", domain: "localhost", want: Route{"0", 1}, ok: true},
		// Not a route name: the caller falls back to the headers.
		{host: "", domain: "localhost"},
		{host: "localhost", domain: "localhost"},
		{host: "localhost:8080", domain: "localhost"},
		{host: "127.0.0.1:8080", domain: "localhost"},
		{host: "127.0.0.1", domain: "localhost"},
		{host: "[::1]:8080", domain: "localhost"},
		{host: "[::1]", domain: "localhost"},
		{host: "::1", domain: "localhost"},
		{host: "example.com", domain: "example.com"},
		{host: "3000-abc.other.org", domain: "example.com"},
		{host: "3000-abc.notlocalhost", domain: "localhost"},
		// Malformed route names under the domain.
		{host: "abc.localhost", domain: "localhost", wantErr: true},
		{host: "-abc.localhost", domain: "localhost", wantErr: true},
		{host: "0-abc.localhost", domain: "localhost", wantErr: true},
		{host: "03000-abc.localhost", domain: "localhost", wantErr: true},
		{host: "65536-abc.localhost", domain: "localhost", wantErr: true},
		{host: "123456-abc.localhost", domain: "localhost", wantErr: true},
		{host: "+80-abc.localhost", domain: "localhost", wantErr: true},
		{host: "3000-.localhost", domain: "localhost", wantErr: true},
		{host: "3000--abc.localhost", domain: "localhost", wantErr: true},
		{host: "3000-ab_c.localhost", domain: "localhost", wantErr: true},
		{host: "3000-abc.x.localhost", domain: "localhost", wantErr: true},
		{host: "3000-" + strings.Repeat("a", 64) + ".localhost", domain: "localhost", wantErr: true},
		{host: "3000-abc.localhost:http", domain: "localhost", wantErr: true},
		{host: "[::1", domain: "localhost", wantErr: true},
		{host: "[::1]x", domain: "localhost", wantErr: true},
	}
	for _, tt := range tests {
		got, ok, err := ParseHost(tt.host, tt.domain)
		if tt.wantErr {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("ParseHost(%q, %q) = %v, %v, %v; want ErrInvalidArgument", tt.host, tt.domain, got, ok, err)
			}
			continue
		}
		if err != nil || ok != tt.ok || got != tt.want {
			t.Errorf("ParseHost(%q, %q) = %v, %v, %v; want %v, %v", tt.host, tt.domain, got, ok, err, tt.want, tt.ok)
		}
	}
}

func TestRouteFromHeaders(t *testing.T) {
	tests := []struct {
		id, port string
		want     Route
		wantErr  bool
	}{
		{id: "abc", port: "3000", want: Route{"abc", 3000}},
		{id: "", port: "3000", wantErr: true},
		{id: "abc", port: "", wantErr: true},
		{id: "ABC", port: "3000", wantErr: true},
		{id: "abc", port: "0", wantErr: true},
		{id: "abc", port: "70000", wantErr: true},
		{id: "abc", port: "3000 ", wantErr: true},
		{id: "../etc", port: "3000", wantErr: true},
	}
	for _, tt := range tests {
		h := http.Header{}
		if tt.id != "" {
			h.Set("e2b-sandbox-id", tt.id)
		}
		if tt.port != "" {
			h.Set("e2b-sandbox-port", tt.port)
		}
		got, err := RouteFromHeaders(h)
		if tt.wantErr {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("RouteFromHeaders(%q, %q) = %v, %v; want ErrInvalidArgument", tt.id, tt.port, got, err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("RouteFromHeaders(%q, %q) = %v, %v; want %v", tt.id, tt.port, got, err, tt.want)
		}
	}
}

func TestNewRouteReply(t *testing.T) {
	rt := Route{SandboxID: "abc", Port: 3000}
	got := NewRouteReply(rt, "localhost", "127.0.0.1:8080", "127.0.0.1:41234")
	want := subjects.RouteReply{
		SandboxID: "abc",
		Port:      3000,
		Host:      "3000-abc.localhost",
		URL:       "http://3000-abc.localhost:8080",
		TCP:       "127.0.0.1:41234",
	}
	if got != want {
		t.Errorf("NewRouteReply = %+v, want %+v", got, want)
	}
	if got := NewRouteReply(rt, "e2b.example", "[::]:80", ""); got.URL != "http://3000-abc.e2b.example" {
		t.Errorf("URL on port 80 = %q", got.URL)
	}
}

func TestOptionsValidate(t *testing.T) {
	r := newFakeSandboxes()
	if _, err := NewServer(nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("nil resolver: %v", err)
	}
	_, err := NewServer(r, WithDomain("bad_domain"), WithDialTimeout(0), WithMaxIdlePerRoute(-1))
	if !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("bad options: %v", err)
	}
	for _, want := range []string{"bad_domain", "dial timeout", "max idle"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("joined error %q does not mention %q", err, want)
		}
	}
	s, err := NewServer(r, WithDomain("Sbx.Example.COM."))
	if err != nil || s.Domain() != "sbx.example.com" {
		t.Errorf("domain = %q, %v", s.Domain(), err)
	}
	if _, err := NewTCPRoutes(r, WithTCPHost("not an ip")); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("bad tcp host: %v", err)
	}
}

// FuzzParseHost checks that ParseHost never panics, that what it accepts is
// a valid route, and that a route's own host name parses back to it.
func FuzzParseHost(f *testing.F) {
	for _, seed := range []struct{ host, domain string }{
		{"3000-abc.localhost", "localhost"},
		{"3000-abc.localhost:8080", "localhost"},
		{"3000-ABC.LocalHost.", "localhost"},
		{"80-a-b-c.sbx.example.com", "sbx.example.com"},
		{"[::1]:8080", "localhost"},
		{"127.0.0.1", "localhost"},
		{"03000-abc.localhost", "localhost"},
		{"65536-abc.localhost", "localhost"},
		{"3000-abc.x.localhost", "localhost"},
		{"[::1", "localhost"},
		{":", ""},
		{"-.", "."},
	} {
		f.Add(seed.host, seed.domain)
	}
	f.Fuzz(func(t *testing.T, host, domain string) {
		rt, ok, err := ParseHost(host, domain)
		if err != nil {
			if ok || !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("ParseHost(%q, %q): ok=%v err=%v: want an ErrInvalidArgument error with ok=false", host, domain, ok, err)
			}
			return
		}
		if !ok {
			if rt != (Route{}) {
				t.Fatalf("ParseHost(%q, %q) = %v with ok=false", host, domain, rt)
			}
			return
		}
		if err := rt.Validate(); err != nil {
			t.Fatalf("ParseHost(%q, %q) accepted an invalid route %v: %v", host, domain, rt, err)
		}
		d := strings.TrimSuffix(strings.ToLower(domain), ".")
		back, ok, err := ParseHost(rt.Host(d), d)
		if err != nil || !ok || back != rt {
			t.Fatalf("round trip of %v via %q = %v, %v, %v", rt, rt.Host(d), back, ok, err)
		}
	})
}
