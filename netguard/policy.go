package netguard

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// Policy is the egress policy of one sandbox. The zero Policy is the
// default: the public internet is reachable, the host, link-local, private
// and reserved ranges are not (see Internal4 and Internal6).
//
// With entries, the most specific matching entry decides (the longest
// prefix; a domain's answers count as single addresses); on a tie deny wins;
// an address no entry matches falls back to the default. An address of
// Internal4 or Internal6 is opened only by an Allow entry that lies inside
// one internal prefix ("10.1.2.0/24", "169.254.169.254/32"): a broader
// Allow entry ("0.0.0.0/0", "2000::/3") covers only the public addresses
// of its range, and an allowed domain's answers never open an internal
// address (a rebinding name could point anywhere). The host's own
// addresses stay closed whatever the entries say, except the HostPorts on
// loopback.
type Policy struct {
	// Off rejects everything ("network": false).
	Off bool
	// Allow and Deny are masked prefixes (an address is a /32 or /128).
	Allow, Deny []netip.Prefix
	// AllowDomains and DenyDomains are lowercase names or "*." and a
	// name, matched against the names the guest resolves.
	AllowDomains, DenyDomains []string
	// HostPorts are host TCP ports the guest may reach on loopback (at
	// 10.0.2.2 inside the guest).
	HostPorts []uint16
}

// ParsePolicy validates the egress member of a create request and returns
// its Policy; a nil one is the default Policy. Errors are invalid arguments
// naming the bad entry.
func ParsePolicy(e *subjects.EgressPolicy) (Policy, error) {
	var p Policy
	if e == nil {
		return p, nil
	}
	if err := e.Validate(); err != nil {
		return Policy{}, err
	}
	for _, l := range []struct {
		entries  []string
		prefixes *[]netip.Prefix
		domains  *[]string
	}{{e.Allow, &p.Allow, &p.AllowDomains}, {e.Deny, &p.Deny, &p.DenyDomains}} {
		for _, s := range l.entries {
			en, err := subjects.ParseEgressEntry(s)
			if err != nil { // Validate checked every entry already
				return Policy{}, err
			}
			switch {
			case en.Prefix.IsValid():
				*l.prefixes = append(*l.prefixes, en.Prefix)
			case en.Domain != "":
				*l.domains = append(*l.domains, en.Domain)
			default:
				p.HostPorts = append(p.HostPorts, en.HostPort)
			}
		}
	}
	p.normalize()
	return p, nil
}

// PolicyFor is the Policy of a create request: Off without network (an
// egress policy with entries is then an invalid argument: it could never
// apply), else ParsePolicy(egress).
func PolicyFor(network bool, egress *subjects.EgressPolicy) (Policy, error) {
	if network {
		return ParsePolicy(egress)
	}
	if egress != nil && (len(egress.Allow) > 0 || len(egress.Deny) > 0) {
		return Policy{}, errdefs.Wrap(errdefs.ErrInvalidArgument, errors.New(`egress: needs "network": true`))
	}
	return Policy{Off: true}, nil
}

// normalize sorts and deduplicates copies of every list, so equal policies
// render the same script and p shares nothing with the caller's Policy.
func (p *Policy) normalize() {
	for _, l := range []*[]netip.Prefix{&p.Allow, &p.Deny} {
		*l = slices.Clone(*l)
		slices.SortFunc(*l, comparePrefix)
		*l = slices.Compact(*l)
	}
	for _, l := range []*[]string{&p.AllowDomains, &p.DenyDomains} {
		*l = slices.Clone(*l)
		slices.Sort(*l)
		*l = slices.Compact(*l)
	}
	p.HostPorts = slices.Clone(p.HostPorts)
	slices.Sort(p.HostPorts)
	p.HostPorts = slices.Compact(p.HostPorts)
}

// equal reports whether p and q are the same normalized policy.
func (p Policy) equal(q Policy) bool {
	return p.Off == q.Off && slices.Equal(p.Allow, q.Allow) && slices.Equal(p.Deny, q.Deny) &&
		slices.Equal(p.AllowDomains, q.AllowDomains) && slices.Equal(p.DenyDomains, q.DenyDomains) &&
		slices.Equal(p.HostPorts, q.HostPorts)
}

// IsDefault reports whether p is the default policy (no entries, not Off).
func (p Policy) IsDefault() bool {
	return !p.Off && len(p.Allow) == 0 && len(p.Deny) == 0 && len(p.AllowDomains) == 0 &&
		len(p.DenyDomains) == 0 && len(p.HostPorts) == 0
}

// hasDomains reports whether the sandbox needs its own DNS proxy.
func (p Policy) hasDomains() bool {
	return !p.Off && (len(p.AllowDomains) > 0 || len(p.DenyDomains) > 0)
}

// validate checks a Policy built by hand (ParsePolicy's are valid).
func (p Policy) validate() error {
	for _, l := range [][]netip.Prefix{p.Allow, p.Deny} {
		for _, pf := range l {
			if !pf.IsValid() || pf != pf.Masked() || pf.Addr().Zone() != "" {
				return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("netguard: prefix %v: want a masked prefix without zone", pf))
			}
		}
	}
	for _, l := range [][]string{p.AllowDomains, p.DenyDomains} {
		for _, d := range l {
			en, err := subjects.ParseEgressEntry(d)
			if err != nil || en.Domain != d {
				return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("netguard: domain %q: want a lowercase domain name", d))
			}
		}
	}
	for _, port := range p.HostPorts {
		if port == 0 {
			return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("netguard: host port 0"))
		}
	}
	return nil
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}

// Internal4 and Internal6 are the destinations every sandbox is refused
// unless an entry of its policy allows them: what an attacker in a guest
// could use to reach the host or the networks around it. The host's own
// addresses (any family, any range) are refused besides, by a fib lookup.
var (
	Internal4 = prefixes(
		"0.0.0.0/8",      // "this network"; 0.0.0.0 reaches the host
		"10.0.0.0/8",     // RFC 1918
		"100.64.0.0/10",  // CGNAT (RFC 6598)
		"127.0.0.0/8",    // loopback
		"169.254.0.0/16", // link-local, cloud metadata
		"172.16.0.0/12",  // RFC 1918
		"192.0.0.0/24",   // IETF protocol assignments (DS-Lite, NAT64 discovery)
		"192.168.0.0/16", // RFC 1918
		"198.18.0.0/15",  // benchmarking, used as internal space
		"224.0.0.0/4",    // multicast
		"240.0.0.0/4",    // reserved and the limited broadcast
	)
	Internal6 = prefixes(
		"::/96",           // unspecified, loopback, IPv4-compatible (sit tunnels)
		"::ffff:0:0/96",   // IPv4-mapped
		"::ffff:0:0:0/96", // IPv4-translated (SIIT)
		"64:ff9b::/96",    // NAT64 well-known prefix
		"64:ff9b:1::/48",  // NAT64 local-use
		"2001::/32",       // Teredo
		"2002::/16",       // 6to4, embeds an IPv4 address
		"fc00::/7",        // unique local (ULA)
		"fe80::/10",       // link-local
		"fec0::/10",       // site-local (deprecated)
		"ff00::/8",        // multicast
	)
)

func prefixes(s ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(s))
	for i, v := range s {
		out[i] = netip.MustParsePrefix(v)
	}
	return out
}

// verdict is what the policy says about a destination.
type verdict int

const (
	verdictNone verdict = iota // no entry matches: the default decides
	verdictAllow
	verdictDeny
)

// addrRange is an inclusive range of addresses of one family.
type addrRange struct{ from, to netip.Addr }

// flatten resolves overlapping allow and deny prefixes of one family (is4)
// into disjoint ranges by longest-prefix match, deny winning a tie, so they
// fit nftables interval sets, which refuse overlaps. Adjacent ranges of one
// verdict are merged; addresses no prefix covers are in neither list.
//
// An allow prefix that does not lie inside one prefix of Internal4 or
// Internal6 covers only the public part of its range: Internal4 and
// Internal6 are subtracted from it (it keeps its own length against the
// other entries). So "0.0.0.0/0" or "2000::/3" opens no internal range,
// while "10.1.2.0/24" or "169.254.169.254/32" opens exactly that.
func flatten(allow, deny []netip.Prefix, is4 bool) (allowR, denyR []addrRange) {
	type entry struct {
		p    netip.Prefix
		deny bool
		// public: the entry covers no address of Internal4/6.
		public bool
	}
	var es []entry
	var bounds []netip.Addr
	addBounds := func(p netip.Prefix) {
		bounds = append(bounds, p.Addr())
		if next := lastAddr(p).Next(); next.IsValid() {
			bounds = append(bounds, next)
		}
	}
	add := func(ps []netip.Prefix, d bool) {
		for _, p := range ps {
			if p.Addr().Is4() != is4 {
				continue
			}
			es = append(es, entry{p, d, !d && !insideInternal(p)})
			addBounds(p)
		}
	}
	add(allow, false)
	add(deny, true)
	// Every range below starts and ends on the boundaries of the internal
	// prefixes too, so each is wholly internal or wholly public.
	for _, p := range internal(is4) {
		addBounds(p)
	}
	slices.SortFunc(bounds, netip.Addr.Compare)
	bounds = slices.Compact(bounds)
	var cur *[]addrRange
	for i, b := range bounds {
		var to netip.Addr
		if i+1 < len(bounds) {
			to = bounds[i+1].Prev()
		} else {
			to = lastAddr(netip.PrefixFrom(b, 0).Masked())
		}
		best, v := -1, verdictNone
		inInternal := isInternal(b)
		for _, e := range es {
			if !e.p.Contains(b) || e.public && inInternal {
				continue
			}
			if e.p.Bits() > best || e.p.Bits() == best && e.deny {
				best = e.p.Bits()
				v = verdictAllow
				if e.deny {
					v = verdictDeny
				}
			}
		}
		switch v {
		case verdictNone:
			cur = nil
			continue
		case verdictAllow:
			cur = &allowR
		case verdictDeny:
			cur = &denyR
		}
		if n := len(*cur); n > 0 && (*cur)[n-1].to.Next() == b {
			(*cur)[n-1].to = to
		} else {
			*cur = append(*cur, addrRange{b, to})
		}
	}
	return allowR, denyR
}

// internal is Internal4 (is4) or Internal6.
func internal(is4 bool) []netip.Prefix {
	if is4 {
		return Internal4
	}
	return Internal6
}

// isInternal reports whether a is in Internal4 or Internal6.
func isInternal(a netip.Addr) bool {
	for _, p := range internal(a.Is4()) {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// insideInternal reports whether all of p lies inside one prefix of
// Internal4 or Internal6: only such an allow entry opens internal addresses.
func insideInternal(p netip.Prefix) bool {
	for _, in := range internal(p.Addr().Is4()) {
		if in.Bits() <= p.Bits() && in.Contains(p.Addr()) {
			return true
		}
	}
	return false
}

// lastAddr is the last address of p.
func lastAddr(p netip.Prefix) netip.Addr {
	p = p.Masked()
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// String renders r for nft: an address, a prefix when r is exactly one, or
// "from-to".
func (r addrRange) String() string {
	if r.from == r.to {
		return r.from.String()
	}
	for bits := 0; bits <= r.from.BitLen(); bits++ {
		p := netip.PrefixFrom(r.from, bits)
		if p.Masked().Addr() == r.from && lastAddr(p) == r.to {
			return p.String()
		}
	}
	return r.from.String() + "-" + r.to.String()
}

// matchDomain returns how specifically a pattern of patterns matches name
// (lowercase, no trailing dot), or -1. An exact pattern beats a wildcard
// over the same suffix, and a deeper wildcard beats a shallower one.
func matchDomain(patterns []string, name string) int {
	best := -1
	for _, pat := range patterns {
		score := -1
		if suffix, ok := strings.CutPrefix(pat, "*."); ok {
			if strings.HasSuffix(name, "."+suffix) {
				score = 2 * (strings.Count(suffix, ".") + 1)
			}
		} else if name == pat {
			score = 2*(strings.Count(pat, ".")+1) + 1
		}
		best = max(best, score)
	}
	return best
}

// domainVerdict is what p says about a resolved name: the most specific
// matching domain decides, deny winning a tie.
func (p Policy) domainVerdict(name string) verdict {
	a, d := matchDomain(p.AllowDomains, name), matchDomain(p.DenyDomains, name)
	switch {
	case d >= 0 && d >= a:
		return verdictDeny
	case a >= 0:
		return verdictAllow
	}
	return verdictNone
}

// deniesExactly reports whether a deny entry is exactly the single address
// a: such an entry ties with an address learned from an allowed domain, and
// deny wins the tie.
func (p Policy) deniesExactly(a netip.Addr) bool {
	return slices.Contains(p.Deny, netip.PrefixFrom(a, a.BitLen()))
}
