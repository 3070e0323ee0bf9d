package subjects

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

func TestParseEgressEntry(t *testing.T) {
	good := []struct {
		in   string
		want EgressEntry
	}{
		{"1.2.3.4", EgressEntry{Prefix: netip.MustParsePrefix("1.2.3.4/32")}},
		{"10.0.0.0/8", EgressEntry{Prefix: netip.MustParsePrefix("10.0.0.0/8")}},
		{"10.1.2.3/8", EgressEntry{Prefix: netip.MustParsePrefix("10.0.0.0/8")}},
		{"0.0.0.0/0", EgressEntry{Prefix: netip.MustParsePrefix("0.0.0.0/0")}},
		{"::/0", EgressEntry{Prefix: netip.MustParsePrefix("::/0")}},
		{"2001:db8::1", EgressEntry{Prefix: netip.MustParsePrefix("2001:db8::1/128")}},
		{"fd00::/8", EgressEntry{Prefix: netip.MustParsePrefix("fd00::/8")}},
		{"example.com", EgressEntry{Domain: "example.com"}},
		{"Example.COM.", EgressEntry{Domain: "example.com"}},
		{"*.example.com", EgressEntry{Domain: "*.example.com"}},
		{"localhost", EgressEntry{Domain: "localhost"}},
		{"1e100.net", EgressEntry{Domain: "1e100.net"}},
		{"xn--bcher-kva.example", EgressEntry{Domain: "xn--bcher-kva.example"}},
		{"host:8000", EgressEntry{HostPort: 8000}},
		{"host:65535", EgressEntry{HostPort: 65535}},
	}
	for _, tt := range good {
		got, err := ParseEgressEntry(tt.in)
		if err != nil || got != tt.want {
			t.Errorf("ParseEgressEntry(%q) = %+v, %v; want %+v", tt.in, got, err, tt.want)
		}
	}
	bad := []string{
		"", "host:", "host:0", "host:65536", "host:080", "host:+80", "host:x", "host:1:2",
		"1.2.3", "1.2.3.4/33", "256.1.1.1", "1.2.3.4/", "::1/129", "fe80::1%eth0",
		"::ffff:10.0.0.1", "::ffff:0:0/96", "*", "*.", "*.*.example.com", "a..b", ".example.com",
		"-a.example.com", "a-.example.com", "exa_mple.com", "example.com/8", "http://example.com",
		"example.com:443", strings.Repeat("a", 64) + ".com", strings.Repeat("a.", 127) + "com",
		"foo.123", "é.example", "a b", "10.0.0.0/8 ",
	}
	for _, in := range bad {
		_, err := ParseEgressEntry(in)
		if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("ParseEgressEntry(%q) = %v, want invalid argument", in, err)
			continue
		}
		name := in
		if len(name) > 64 {
			name = name[:64] + "..."
		}
		if !strings.Contains(err.Error(), fmt.Sprintf("%q", name)) {
			t.Errorf("ParseEgressEntry(%q): error %q does not name the entry", in, err)
		}
	}
}

func TestEgressPolicyValidate(t *testing.T) {
	var nilPolicy *EgressPolicy
	if err := nilPolicy.Validate(); err != nil {
		t.Errorf("nil policy: %v", err)
	}
	ok := &EgressPolicy{Allow: []string{"host:8000", "10.0.0.1", "*.pypi.org"}, Deny: []string{"0.0.0.0/0", "::/0", "evil.example"}}
	if err := ok.Validate(); err != nil {
		t.Errorf("valid policy: %v", err)
	}
	many := make([]string, MaxEgressEntries+1)
	for i := range many {
		many[i] = fmt.Sprintf("10.0.0.%d", i)
	}
	for _, p := range []EgressPolicy{
		{Deny: []string{"host:8000"}},
		{Allow: many},
		{Deny: many},
		{Allow: []string{"example.com", "bad_name"}},
		{Deny: []string{"1.2.3.4", "1.2.3.4/40"}},
	} {
		if err := p.Validate(); !errors.Is(err, errdefs.ErrInvalidArgument) || CodeOf(err) != CodeInvalidRequest {
			t.Errorf("Validate(%+v) = %v, want invalid_request", p, err)
		}
	}
	var req CreateSandboxRequest
	if err := Decode([]byte(`{"egress":{"allow":["host:8000"],"deny":["10.0.0.0/8"]}}`), &req); err != nil {
		t.Fatal(err)
	}
	if req.Egress == nil || len(req.Egress.Allow) != 1 || req.Egress.Deny[0] != "10.0.0.0/8" {
		t.Errorf("decoded egress %+v", req.Egress)
	}
}

func FuzzParseEgressEntry(f *testing.F) {
	for _, s := range []string{"1.2.3.4", "10.0.0.0/8", "::/0", "example.com", "*.a.b", "host:80", "::ffff:1.2.3.4", "a..b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		e, err := ParseEgressEntry(s)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("unclassified error %v", err)
			}
			return
		}
		set := 0
		if e.Prefix.IsValid() {
			set++
			if e.Prefix != e.Prefix.Masked() || e.Prefix.Addr().Zone() != "" {
				t.Fatalf("%q: prefix %v not masked or has a zone", s, e.Prefix)
			}
		}
		if e.Domain != "" {
			set++
			d := strings.TrimPrefix(e.Domain, "*.")
			if len(d) > 253 || d != strings.ToLower(d) || strings.ContainsAny(d, "*_ /:") {
				t.Fatalf("%q: bad domain %q", s, e.Domain)
			}
			// A parsed domain parses again to itself.
			if again, err := ParseEgressEntry(e.Domain); err != nil || again != e {
				t.Fatalf("%q: domain %q does not round-trip: %v", s, e.Domain, err)
			}
		}
		if e.HostPort != 0 {
			set++
		}
		if set != 1 {
			t.Fatalf("%q: %d kinds set in %+v", s, set, e)
		}
	})
}
