package subjects

import (
	"net/netip"
	"strconv"
	"strings"
)

// EgressPolicy is the "egress" member of a create request: where a guest may
// and may not connect. Entries are IPv4 or IPv6 addresses or CIDRs, domain
// names ("example.com" matches that name, "*.example.com" its subdomains;
// domains are matched on the DNS answers the guest gets) and, in Allow only,
// "host:PORT" (the guest may reach that TCP port of the host at 10.0.2.2,
// for development set-ups). The most specific matching entry decides; on a
// tie deny wins. Without a matching entry, the public internet is reachable
// and the host, link-local and private ranges are not.
type EgressPolicy struct {
	Allow []string `json:"allow,omitempty"`
	Deny  []string `json:"deny,omitempty"`
}

// MaxEgressEntries bounds each of the allow and deny lists.
const MaxEgressEntries = 64

// EgressEntry is one parsed entry of an egress policy: exactly one of
// Prefix (valid), Domain (non-empty) or HostPort (non-zero) is set.
type EgressEntry struct {
	// Prefix is an address (a /32 or /128 prefix) or a CIDR, masked.
	Prefix netip.Prefix
	// Domain is a lowercase name without a trailing dot, or "*." and such
	// a name.
	Domain string
	// HostPort is the host TCP port of a "host:PORT" entry.
	HostPort uint16
}

// Validate checks every entry; the first bad one is an invalid argument
// naming it.
func (p *EgressPolicy) Validate() error {
	if p == nil {
		return nil
	}
	for _, l := range []struct {
		name    string
		entries []string
	}{{"allow", p.Allow}, {"deny", p.Deny}} {
		if len(l.entries) > MaxEgressEntries {
			return invalid("egress.%s: %d entries, at most %d", l.name, len(l.entries), MaxEgressEntries)
		}
		for _, s := range l.entries {
			e, err := ParseEgressEntry(s)
			if err != nil {
				return invalid("egress.%s: %v", l.name, err)
			}
			if e.HostPort != 0 && l.name == "deny" {
				return invalid("egress.deny: entry %q: host:PORT is allow-only (the host is always denied)", s)
			}
		}
	}
	return nil
}

// ParseEgressEntry parses one allow or deny entry. Errors name the entry.
func ParseEgressEntry(s string) (EgressEntry, error) {
	bad := func(why string) (EgressEntry, error) {
		if len(s) > 64 {
			s = s[:64] + "..."
		}
		return EgressEntry{}, invalid("entry %q: %s", s, why)
	}
	if s == "" {
		return bad("empty")
	}
	if len(s) > 260 {
		return bad("longer than 260 characters")
	}
	if rest, ok := strings.CutPrefix(s, "host:"); ok {
		port, err := strconv.ParseUint(rest, 10, 16)
		if err != nil || port == 0 || rest[0] == '0' || rest[0] == '+' {
			return bad("want host:PORT with PORT 1-65535")
		}
		return EgressEntry{HostPort: uint16(port)}, nil
	}
	if strings.Contains(s, ":") || looksNumeric(s) {
		return parseAddrEntry(s, bad)
	}
	name := strings.ToLower(strings.TrimSuffix(s, "."))
	if why := checkDomain(strings.TrimPrefix(name, "*.")); why != "" {
		return bad(why)
	}
	return EgressEntry{Domain: name}, nil
}

// looksNumeric reports whether s is made of digits, dots and a slash: an
// IPv4 address or CIDR (or a broken one), never a domain.
func looksNumeric(s string) bool {
	return strings.Trim(s, "0123456789./") == ""
}

func parseAddrEntry(s string, bad func(string) (EgressEntry, error)) (EgressEntry, error) {
	if strings.Contains(s, "%") {
		return bad("addresses with a zone are not allowed")
	}
	var pfx netip.Prefix
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return bad("not an IP address or CIDR")
		}
		pfx = p.Masked()
	} else {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return bad("not an IP address or CIDR")
		}
		pfx = netip.PrefixFrom(a, a.BitLen())
	}
	if pfx.Addr().Is4In6() && pfx.Bits() >= 96 {
		return bad("IPv4-mapped IPv6 address: write the IPv4 form")
	}
	return EgressEntry{Prefix: pfx}, nil
}

// checkDomain checks a lowercase name without "*." and trailing dot: LDH
// labels of 1-63 characters not starting or ending with a hyphen, at most 253
// characters, the last label not all digits. It returns why not, or "".
func checkDomain(name string) string {
	if name == "" {
		return "empty domain name"
	}
	if len(name) > 253 {
		return "domain name longer than 253 characters"
	}
	labels := strings.Split(name, ".")
	for _, l := range labels {
		if l == "" || len(l) > 63 {
			return "want domain labels of 1-63 characters"
		}
		if l[0] == '-' || l[len(l)-1] == '-' {
			return "a domain label may not start or end with '-'"
		}
		for _, c := range []byte(l) {
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
				return "want an IP address, a CIDR, a domain name of letters, digits and '-' (optionally starting with \"*.\"), or host:PORT"
			}
		}
	}
	if strings.Trim(labels[len(labels)-1], "0123456789") == "" {
		return "the last label of a domain name may not be all digits"
	}
	return ""
}
