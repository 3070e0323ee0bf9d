package netguard

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

func TestParsePolicy(t *testing.T) {
	p, err := ParsePolicy(&subjects.EgressPolicy{
		Allow: []string{"host:8000", "10.99.0.2", "*.PyPI.org", "host:8000", "10.99.0.2/32", "2001:db8::/32"},
		Deny:  []string{"0.0.0.0/0", "::/0", "evil.example."},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := Policy{
		Allow:        []netip.Prefix{netip.MustParsePrefix("10.99.0.2/32"), netip.MustParsePrefix("2001:db8::/32")},
		Deny:         []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")},
		AllowDomains: []string{"*.pypi.org"},
		DenyDomains:  []string{"evil.example"},
		HostPorts:    []uint16{8000},
	}
	if !equalPolicy(p, want) {
		t.Errorf("ParsePolicy = %+v, want %+v", p, want)
	}
	if p, err := ParsePolicy(nil); err != nil || !p.IsDefault() {
		t.Errorf("ParsePolicy(nil) = %+v, %v; want the default", p, err)
	}
	if p, err := ParsePolicy(&subjects.EgressPolicy{}); err != nil || !p.IsDefault() {
		t.Errorf("ParsePolicy(empty) = %+v, %v; want the default", p, err)
	}
	for _, bad := range []subjects.EgressPolicy{
		{Allow: []string{"10.0.0.0/33"}},
		{Deny: []string{"host:22"}},
		{Allow: []string{"ok.example", "not ok"}},
	} {
		if _, err := ParsePolicy(&bad); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("ParsePolicy(%+v) = %v, want invalid argument", bad, err)
		}
	}
}

func TestPolicyFor(t *testing.T) {
	if p, err := PolicyFor(false, nil); err != nil || !p.Off {
		t.Errorf("PolicyFor(false, nil) = %+v, %v; want Off", p, err)
	}
	if p, err := PolicyFor(false, &subjects.EgressPolicy{}); err != nil || !p.Off {
		t.Errorf("PolicyFor(false, empty) = %+v, %v; want Off", p, err)
	}
	if _, err := PolicyFor(false, &subjects.EgressPolicy{Allow: []string{"1.2.3.4"}}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("PolicyFor(false, allow) = %v, want invalid argument", err)
	}
	if p, err := PolicyFor(true, &subjects.EgressPolicy{Allow: []string{"1.2.3.4"}}); err != nil || p.Off || len(p.Allow) != 1 {
		t.Errorf("PolicyFor(true, allow) = %+v, %v", p, err)
	}
	if _, err := PolicyFor(true, &subjects.EgressPolicy{Allow: []string{"1.2.3.4/99"}}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("PolicyFor(true, bad) = %v, want invalid argument", err)
	}
}

func equalPolicy(a, b Policy) bool {
	return a.Off == b.Off && slices.Equal(a.Allow, b.Allow) && slices.Equal(a.Deny, b.Deny) &&
		slices.Equal(a.AllowDomains, b.AllowDomains) && slices.Equal(a.DenyDomains, b.DenyDomains) &&
		slices.Equal(a.HostPorts, b.HostPorts)
}

func TestFlatten(t *testing.T) {
	// public4 is 0.0.0.0/0 without Internal4.
	const public4 = "1.0.0.0-9.255.255.255 11.0.0.0-100.63.255.255 100.128.0.0-126.255.255.255 128.0.0.0-169.253.255.255 " +
		"169.255.0.0-172.15.255.255 172.32.0.0-191.255.255.255 192.0.1.0-192.167.255.255 192.169.0.0-198.17.255.255 198.20.0.0-223.255.255.255"
	pp := func(s string) []netip.Prefix {
		if s == "" {
			return nil
		}
		return prefixes(strings.Split(s, " ")...)
	}
	tests := []struct {
		allow, deny         string
		is4                 bool
		wantAllow, wantDeny string
	}{
		{"10.99.0.2/32", "", true, "10.99.0.2", ""},
		{"10.0.0.0/8", "10.0.0.0/8", true, "", "10.0.0.0/8"}, // tie: deny
		{"10.1.0.0/16", "10.0.0.0/8", true, "10.1.0.0/16", "10.0.0.0/16 10.2.0.0-10.255.255.255"},
		{"1.2.3.4/32", "0.0.0.0/0", true, "1.2.3.4", "0.0.0.0-1.2.3.3 1.2.3.5-255.255.255.255"},
		// A broad allow opens only the public part of what it covers ...
		{"0.0.0.0/0", "10.0.0.0/8", true, public4, "10.0.0.0/8"},
		{"0.0.0.0/0", "", true, public4, ""},
		{"8.0.0.0/5", "", true, "8.0.0.0/7 11.0.0.0-15.255.255.255", ""},
		{"10.0.0.0/7", "", true, "11.0.0.0/8", ""}, // straddles 10.0.0.0/8
		{"2000::/3", "", false, "2000::/16 2001:1::-2001:ffff:ffff:ffff:ffff:ffff:ffff:ffff 2003::-3fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", ""},
		{"::/0", "::/0", false, "", "::/0"}, // tie: deny, internal or not
		// ... an allow inside one internal prefix opens exactly that.
		{"10.0.0.0/8", "", true, "10.0.0.0/8", ""},
		{"169.254.169.254/32 10.1.2.0/24", "", true, "10.1.2.0/24 169.254.169.254", ""},
		{"0.0.0.0/0 10.1.2.0/24", "10.1.0.0/16", true,
			"1.0.0.0-9.255.255.255 10.1.2.0/24 11.0.0.0-100.63.255.255 100.128.0.0-126.255.255.255 128.0.0.0-169.253.255.255 169.255.0.0-172.15.255.255 172.32.0.0-191.255.255.255 192.0.1.0-192.167.255.255 192.169.0.0-198.17.255.255 198.20.0.0-223.255.255.255",
			"10.1.0.0/23 10.1.3.0-10.1.255.255"},
		{"2001::/32 2002:a00::/24", "", false, "2001::/32 2002:a00::/24", ""},
		{"2001::/31", "", false, "2001:1::/32", ""},             // without Teredo
		{"10.0.0.0/9 10.128.0.0/9", "", true, "10.0.0.0/8", ""}, // adjacent merged
		{"255.255.255.255/32", "255.0.0.0/8", true, "255.255.255.255", "255.0.0.0-255.255.255.254"},
		{"1.2.3.4/32", "::/0", true, "1.2.3.4", ""}, // families apart
		{"1.2.3.4/32", "::/0", false, "", "::/0"},
		{"2001:db8::1/128", "2001:db8::/32", false, "2001:db8::1", "2001:db8:: 2001:db8::2-2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"},
	}
	for _, tt := range tests {
		a, d := flatten(pp(tt.allow), pp(tt.deny), tt.is4)
		if got := strings.ReplaceAll(joinRanges(a), ",", ""); got != tt.wantAllow {
			t.Errorf("flatten(%q, %q, %v) allow = %q, want %q", tt.allow, tt.deny, tt.is4, got, tt.wantAllow)
		}
		if got := strings.ReplaceAll(joinRanges(d), ",", ""); got != tt.wantDeny {
			t.Errorf("flatten(%q, %q, %v) deny = %q, want %q", tt.allow, tt.deny, tt.is4, got, tt.wantDeny)
		}
	}
}

func TestDomainVerdict(t *testing.T) {
	p := Policy{
		AllowDomains: []string{"*.example.com", "api.corp.example", "tie.example"},
		DenyDomains:  []string{"bad.example.com", "*.corp.example", "tie.example", "*.deep.example.com"},
	}
	for name, want := range map[string]verdict{
		"www.example.com":        verdictAllow,
		"a.b.example.com":        verdictAllow,
		"example.com":            verdictNone, // a wildcard needs a label before it
		"bad.example.com":        verdictDeny, // exact beats wildcard
		"x.bad.example.com":      verdictAllow,
		"api.corp.example":       verdictAllow, // exact allow beats wildcard deny
		"other.corp.example":     verdictDeny,
		"tie.example":            verdictDeny, // tie: deny
		"x.deep.example.com":     verdictDeny, // deeper wildcard wins
		"notexample.com":         verdictNone,
		"www.example.com.evil.x": verdictNone,
	} {
		if got := p.domainVerdict(name); got != want {
			t.Errorf("domainVerdict(%q) = %d, want %d", name, got, want)
		}
	}
}

// FuzzParsePolicy checks that every accepted policy is valid, normalized,
// renders a script, and that flatten's ranges are disjoint and agree with a
// longest-prefix match done the slow way (oracleVerdict), at the probe and
// at every edge of a range, an entry and an internal prefix.
func FuzzParsePolicy(f *testing.F) {
	f.Add("10.0.0.0/8 host:80 a.example", "0.0.0.0/0 1.2.3.4 ::/0", "10.1.2.3")
	f.Add("2001:db8::/48 *.x.y", "2001:db8::1 fc00::/7", "2001:db8::1")
	f.Add("0.0.0.0/0 ::/0", "", "169.254.169.254")
	f.Add("2000::/3 169.254.169.254 10.1.2.0/24", "10.1.2.128/25 8.0.0.0/6", "2002::1")
	f.Add("8.0.0.0/5 2001::/31 2001::1", "0.0.0.0/0", "10.0.0.1")
	f.Fuzz(func(t *testing.T, allow, deny, probe string) {
		e := &subjects.EgressPolicy{Allow: strings.Fields(allow), Deny: strings.Fields(deny)}
		p, err := ParsePolicy(e)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("unclassified error %v", err)
			}
			return
		}
		if err := p.validate(); err != nil {
			t.Fatalf("parsed policy invalid: %v", err)
		}
		in := plan(3000000001, 7, p, 5353)
		script := applyScript("firkin_fuzz", 3000000001, p, in, &in)
		if !strings.Contains(script, "jump "+in.chain) {
			t.Fatalf("script does not install the chain:\n%s", script)
		}
		var probes []netip.Addr
		edges := func(from, to netip.Addr) {
			probes = append(probes, from, from.Prev(), to, to.Next())
		}
		if a, err := netip.ParseAddr(probe); err == nil {
			probes = append(probes, a.WithZone("").Unmap())
		}
		for _, pf := range slices.Concat(p.Allow, p.Deny, Internal4, Internal6) {
			edges(pf.Addr(), lastAddr(pf))
		}
		flat := map[bool][2][]addrRange{}
		for _, is4 := range []bool{true, false} {
			ar, dr := flatten(p.Allow, p.Deny, is4)
			flat[is4] = [2][]addrRange{ar, dr}
			for _, r := range slices.Concat(ar, dr) {
				if r.from.Is4() != is4 || r.to.Is4() != is4 || r.to.Less(r.from) {
					t.Fatalf("bad range %v of family is4=%v", r, is4)
				}
				edges(r.from, r.to)
			}
		}
		for _, a := range probes {
			if !a.IsValid() { // Prev of the first or Next of the last address
				continue
			}
			want := oracleVerdict(p, a)
			got := verdictNone
			for i, v := range []verdict{verdictAllow, verdictDeny} {
				for _, r := range flat[a.Is4()][i] {
					if r.from.Compare(a) <= 0 && a.Compare(r.to) <= 0 {
						if got != verdictNone {
							t.Fatalf("%v in two ranges", a)
						}
						got = v
					}
				}
			}
			if got != want {
				t.Fatalf("flatten says %d for %v, longest prefix match says %d", got, a, want)
			}
		}
	})
}

// oracleVerdict is the longest-prefix match of a against p's address
// entries, deny winning a tie, done the slow way. An allow entry counts for
// an address of Internal4/Internal6 only when the entry lies inside one
// internal prefix.
func oracleVerdict(p Policy, a netip.Addr) verdict {
	internalOf := func(pf netip.Prefix) bool { // pf is inside an internal prefix
		for _, in := range slices.Concat(Internal4, Internal6) {
			if in.Bits() <= pf.Bits() && in.Overlaps(pf) {
				return true
			}
		}
		return false
	}
	aInternal := false
	for _, in := range slices.Concat(Internal4, Internal6) {
		aInternal = aInternal || in.Contains(a)
	}
	best, want := -1, verdictNone
	for _, l := range []struct {
		ps []netip.Prefix
		v  verdict
	}{{p.Allow, verdictAllow}, {p.Deny, verdictDeny}} {
		for _, pf := range l.ps {
			if !pf.Contains(a) || l.v == verdictAllow && aInternal && !internalOf(pf) {
				continue
			}
			if pf.Bits() > best || pf.Bits() == best && l.v == verdictDeny {
				best, want = pf.Bits(), l.v
			}
		}
	}
	return want
}
