package netguard

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// The nftables script is built here, as text for `nft -f -`, by pure
// functions (golden-tested). One table of family inet per Guard holds:
//
//	chain output (filter hook output)  packets of sockets owned by a uid of the
//	                                   range jump to guest; nothing else is touched
//	chain guest    a uid with a policy jumps to its chain through the uid_chain
//	               verdict map; else established connections of the default
//	               policy (conntrack mark 0) pass, and the rest is marked 0 and
//	               judged by head, then tail (in quarantine: else rej, until
//	               endQuarantineScript rewrites the chain)
//	chain head     DNS redirected to a proxy of the Guard passes; any other DNS,
//	               the host's own addresses (fib), loopback are rejected
//	chain tail     Internal4/Internal6 are rejected, the rest accepted
//	chain u<uid>_<gen>  one policy: established connections carrying its mark
//	               pass; the rest is marked and judged: host ports, head,
//	               learned deny, learned allow (outside Internal4/Internal6
//	               only), the flattened deny and allow entries, tail
//	chain rej      marks the connection rejected; tcp reset, else icmpx
//	               admin-prohibited: a blocked connect fails at once
//	chain dns (nat hook output)  DNS (udp/tcp port 53) of the range is
//	               redirected to loopback: to the uid's own proxy port (uid_dns
//	               map), else to the shared default proxy
//
// The conntrack mark of a connection is the policy generation that last
// accepted one of its packets: 0 for the default policy, genMark(gen) for a
// policy chain, markRejected once rejected. Only a connection whose mark is
// the uid's current one skips judgment, so a policy change re-judges every
// open connection of the uid at its next packet (and resets it when the new
// policy denies it), while within one policy a long connection outlives the
// learned address that opened it.
//
// Rules match positively on `meta skuid`: packets without a socket (the
// resets and ICMP errors that reject itself sends) are never filtered.

// table is what the table-wide script needs.
type table struct {
	name           string
	uidFirst       uint32
	uidLast        uint32
	defaultDNSPort uint16
}

func (t table) uidRange() string {
	if t.uidFirst == t.uidLast {
		return strconv.FormatUint(uint64(t.uidFirst), 10)
	}
	return fmt.Sprintf("%d-%d", t.uidFirst, t.uidLast)
}

// setElemMax bounds each learned-address set.
const setElemMax = 4096

// tableScript creates the table, first deleting a stale one of the same name
// (a crashed worker's), in one transaction. In quarantine, chain guest
// rejects every uid without a policy chain (see writeGuest).
func tableScript(t table, quarantine bool) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	w("add table inet %s", t.name)
	w("delete table inet %s", t.name)
	w("table inet %s {", t.name)
	w("\tset dns_ports {\n\t\ttype inet_service\n\t\telements = { %d }\n\t}", t.defaultDNSPort)
	w("\tmap uid_dns {\n\t\ttype uid : inet_service\n\t}")
	w("\tmap uid_chain {\n\t\ttype uid : verdict\n\t}")
	w("\tset internal4 {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { %s }\n\t}", joinPrefixes(Internal4))
	w("\tset internal6 {\n\t\ttype ipv6_addr\n\t\tflags interval\n\t\telements = { %s }\n\t}", joinPrefixes(Internal6))
	w("\tchain rej {")
	w("\t\tct mark set %#x", markRejected)
	w("\t\tmeta l4proto tcp reject with tcp reset")
	w("\t\treject with icmpx type admin-prohibited")
	w("\t}")
	w("\tchain head {")
	w("\t\tmeta l4proto { tcp, udp } th dport @dns_ports ct status dnat ip daddr 127.0.0.1 accept")
	w("\t\tmeta l4proto { tcp, udp } th dport @dns_ports ct status dnat ip6 daddr ::1 accept")
	w("\t\tmeta l4proto { tcp, udp } th dport 53 jump rej")
	w("\t\tfib daddr type { local, broadcast, multicast } jump rej")
	w("\t\tip daddr 127.0.0.0/8 jump rej")
	w("\t\tip6 daddr ::1 jump rej")
	w("\t}")
	w("\tchain tail {")
	w("\t\tip daddr @internal4 jump rej")
	w("\t\tip6 daddr @internal6 jump rej")
	w("\t\taccept")
	w("\t}")
	writeGuest(w, quarantine)
	w("\tchain output {")
	w("\t\ttype filter hook output priority 0; policy accept;")
	w("\t\tmeta skuid %s jump guest", t.uidRange())
	w("\t}")
	w("\tchain dns {")
	w("\t\ttype nat hook output priority -100; policy accept;")
	w("\t\tmeta skuid %s meta l4proto { tcp, udp } th dport 53 redirect to :meta skuid map @uid_dns", t.uidRange())
	w("\t\tmeta skuid %s meta l4proto { tcp, udp } th dport 53 redirect to :%d", t.uidRange(), t.defaultDNSPort)
	w("\t}")
	w("}")
	return b.String()
}

// writeGuest writes chain guest: a uid with a policy jumps to its chain;
// the others take the default path (established connections of the default
// policy pass, the rest is marked 0 and judged by head, then tail), or in
// quarantine are rejected, established connections too: so a connection the
// previous worker accepted under the default policy is reset at its next
// packet rather than passing before the uid's own policy is back.
func writeGuest(w func(string, ...any), quarantine bool) {
	w("\tchain guest {")
	w("\t\tmeta skuid vmap @uid_chain")
	if quarantine {
		w("\t\tjump rej")
	} else {
		w("\t\tct state established ct mark %#x accept", markDefault)
		w("\t\tct mark set %#x", markDefault)
		w("\t\tjump head")
		w("\t\tjump tail")
	}
	w("\t}")
}

// endQuarantineScript puts the default path back in chain guest, in one
// transaction: no packet sees the chain empty.
func endQuarantineScript(tbl string) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	w("flush chain inet %s guest", tbl)
	w("table inet %s {", tbl)
	writeGuest(w, false)
	w("}")
	return b.String()
}

// installed is what an applied policy put in the table.
type installed struct {
	chain   string
	mark    uint32   // the conntrack mark of connections the chain accepts
	sets    []string // the learned sets, empty without domains
	dnsPort uint16   // the uid's own DNS proxy port, 0 without domains
}

// Learned-set suffixes: addresses answered for allowed and denied domains.
const (
	learnAllow4 = "_a4"
	learnAllow6 = "_a6"
	learnDeny4  = "_d4"
	learnDeny6  = "_d6"
)

// Conntrack marks (see the comment at the top): markDefault for the
// default policy, markRejected for a rejected connection, genMark(gen) for
// a policy chain, never either of the other two.
const (
	markDefault  uint32 = 0
	markRejected uint32 = 0xffffffff
)

// genMark is the conntrack mark of generation gen: unique among 2^32-2
// consecutive generations.
func genMark(gen uint64) uint32 { return uint32(gen%(1<<32-2)) + 1 }

// chainName names the chain of generation gen of uid's policy.
func chainName(uid uint32, gen uint64) string { return fmt.Sprintf("u%d_%d", uid, gen) }

// plan names what applying p as generation gen for uid will install.
func plan(uid uint32, gen uint64, p Policy, dnsPort uint16) installed {
	in := installed{chain: chainName(uid, gen), mark: genMark(gen)}
	if p.hasDomains() {
		for _, s := range []string{learnAllow4, learnAllow6, learnDeny4, learnDeny6} {
			in.sets = append(in.sets, in.chain+s)
		}
		in.dnsPort = dnsPort
	}
	return in
}

// applyScript installs p for uid as in (from plan) and, in the same
// transaction, removes old (nil when the uid had no policy).
func applyScript(tbl string, uid uint32, p Policy, in installed, old *installed) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	w("table inet %s {", tbl)
	for _, s := range in.sets {
		typ := "ipv4_addr"
		if strings.HasSuffix(s, "6") {
			typ = "ipv6_addr"
		}
		w("\tset %s {\n\t\ttype %s\n\t\tflags timeout\n\t\tsize %d\n\t}", s, typ, setElemMax)
	}
	w("\tchain %s {", in.chain)
	if p.Off {
		w("\t\tjump rej")
	} else {
		w("\t\tct state established ct mark %#x accept", in.mark)
		w("\t\tct mark set %#x", in.mark)
		if len(p.HostPorts) > 0 {
			ports := make([]string, len(p.HostPorts))
			for i, port := range p.HostPorts {
				ports[i] = strconv.Itoa(int(port))
			}
			w("\t\tip daddr 127.0.0.1 tcp dport { %s } accept", strings.Join(ports, ", "))
			w("\t\tip6 daddr ::1 tcp dport { %s } accept", strings.Join(ports, ", "))
		}
		w("\t\tjump head")
		if len(in.sets) > 0 {
			w("\t\tip daddr @%s%s jump rej", in.chain, learnDeny4)
			w("\t\tip6 daddr @%s%s jump rej", in.chain, learnDeny6)
			// A learned address never opens an internal one: only
			// address entries can (see Policy).
			w("\t\tip daddr @%s%s ip daddr != @internal4 accept", in.chain, learnAllow4)
			w("\t\tip6 daddr @%s%s ip6 daddr != @internal6 accept", in.chain, learnAllow6)
		}
		for _, fam := range []struct {
			is4 bool
			kw  string
		}{{true, "ip"}, {false, "ip6"}} {
			allow, deny := flatten(p.Allow, p.Deny, fam.is4)
			if len(deny) > 0 {
				w("\t\t%s daddr { %s } jump rej", fam.kw, joinRanges(deny))
			}
			if len(allow) > 0 {
				w("\t\t%s daddr { %s } accept", fam.kw, joinRanges(allow))
			}
		}
		w("\t\tjump tail")
	}
	w("\t}")
	w("}")
	if old != nil {
		unmapUID(w, tbl, uid, *old)
	}
	w("add element inet %s uid_chain { %d : jump %s }", tbl, uid, in.chain)
	if in.dnsPort != 0 {
		w("add element inet %s uid_dns { %d : %d }", tbl, uid, in.dnsPort)
		w("add element inet %s dns_ports { %d }", tbl, in.dnsPort)
	}
	if old != nil {
		dropInstalled(w, tbl, *old)
	}
	return b.String()
}

// removeScript removes what applyScript installed for uid.
func removeScript(tbl string, uid uint32, old installed) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	unmapUID(w, tbl, uid, old)
	dropInstalled(w, tbl, old)
	return b.String()
}

// unmapUID deletes uid's elements of the maps (and old's DNS port), which
// point at what old installed.
func unmapUID(w func(string, ...any), tbl string, uid uint32, old installed) {
	w("delete element inet %s uid_chain { %d }", tbl, uid)
	if old.dnsPort != 0 {
		w("delete element inet %s uid_dns { %d }", tbl, uid)
		w("delete element inet %s dns_ports { %d }", tbl, old.dnsPort)
	}
}

func dropInstalled(w func(string, ...any), tbl string, old installed) {
	w("flush chain inet %s %s", tbl, old.chain)
	w("delete chain inet %s %s", tbl, old.chain)
	for _, s := range old.sets {
		w("delete set inet %s %s", tbl, s)
	}
}

// learnScript adds addrs to a learned set with a fresh timeout each: an
// element already there is deleted and added again, since adding an
// existing element keeps its old expiry.
func learnScript(tbl, set string, addrs []netip.Addr, timeout time.Duration) string {
	if len(addrs) == 0 {
		return ""
	}
	plain := make([]string, len(addrs))
	timed := make([]string, len(addrs))
	secs := int64(timeout / time.Second)
	for i, a := range addrs {
		plain[i] = a.String()
		timed[i] = fmt.Sprintf("%s timeout %ds", a, secs)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "add element inet %s %s { %s }\n", tbl, set, strings.Join(timed, ", "))
	fmt.Fprintf(&b, "delete element inet %s %s { %s }\n", tbl, set, strings.Join(plain, ", "))
	fmt.Fprintf(&b, "add element inet %s %s { %s }\n", tbl, set, strings.Join(timed, ", "))
	return b.String()
}

// deleteTableScript deletes the table (and nothing else).
func deleteTableScript(tbl string) string {
	return fmt.Sprintf("delete table inet %s\n", tbl)
}

func joinPrefixes(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ", ")
}

func joinRanges(rs []addrRange) string {
	s := make([]string, len(rs))
	for i, r := range rs {
		s[i] = r.String()
	}
	return strings.Join(s, ", ")
}
