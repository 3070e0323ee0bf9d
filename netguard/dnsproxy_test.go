package netguard

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// fakeDNS is an authoritative server for the test's names on loopback
// (UDP and TCP, one port), answering A and AAAA with TTL ttl and NXDOMAIN
// for other names; it stands for the upstream resolver.
func fakeDNS(t *testing.T, ttl uint32, records map[string][]netip.Addr) string {
	t.Helper()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := pc.LocalAddr().String()
	ln, err := net.Listen("tcp4", addr)
	if err != nil {
		pc.Close()
		t.Fatal(err)
	}
	h := dns.HandlerFunc(func(w dns.ResponseWriter, req *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(req)
		q := req.Question[0]
		addrs, ok := records[strings.TrimSuffix(strings.ToLower(q.Name), ".")]
		if !ok {
			m.Rcode = dns.RcodeNameError
		}
		for _, a := range addrs {
			hdr := dns.RR_Header{Name: q.Name, Class: dns.ClassINET, Ttl: ttl}
			switch {
			case a.Is4() && q.Qtype == dns.TypeA:
				hdr.Rrtype = dns.TypeA
				m.Answer = append(m.Answer, &dns.A{Hdr: hdr, A: a.AsSlice()})
			case a.Is6() && q.Qtype == dns.TypeAAAA:
				hdr.Rrtype = dns.TypeAAAA
				m.Answer = append(m.Answer, &dns.AAAA{Hdr: hdr, AAAA: a.AsSlice()})
			}
		}
		_ = w.WriteMsg(m)
	})
	for _, srv := range []*dns.Server{{PacketConn: pc, Handler: h}, {Listener: ln, Handler: h}} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		go func() { _ = srv.ActivateAndServe() }()
		<-started
		t.Cleanup(func() { _ = srv.Shutdown() })
	}
	return addr
}

// learned records what a proxy asked to put in the sets.
type learned struct {
	mu   sync.Mutex
	sets map[string][]netip.Addr
	ttl  map[string]time.Duration
	fail bool
}

func (l *learned) learn(_ context.Context, set string, addrs []netip.Addr, timeout time.Duration) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.fail {
		return errors.New("set full")
	}
	l.sets[set] = append(l.sets[set], addrs...)
	l.ttl[set] = timeout
	return nil
}

func (l *learned) get(set string) []netip.Addr {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.sets[set])
}

func TestProxyAnswers(t *testing.T) {
	a := netip.MustParseAddr
	up := fakeDNS(t, 7200, map[string][]netip.Addr{
		"api.allowed.test": {a("10.0.0.7"), a("10.0.0.8"), a("fd00::7")},
		"deny.test":        {a("1.2.3.4"), a("2001:db8::4")},
		"plain.test":       {a("5.6.7.8")},
		"new.allowed.test": {a("9.9.9.9")},
	})
	p := Policy{AllowDomains: []string{"*.allowed.test"}, DenyDomains: []string{"deny.test"}, Deny: prefixes("10.0.0.8/32")}
	l := &learned{sets: map[string][]netip.Addr{}, ttl: map[string]time.Duration{}}
	px, err := startProxy(slog.New(slog.DiscardHandler), up, p, "u1_1", l.learn)
	if err != nil {
		t.Fatal(err)
	}
	defer px.close()
	ask := func(name string, qtype uint16, network string) *dns.Msg {
		t.Helper()
		m := new(dns.Msg)
		m.SetQuestion(dns.Fqdn(name), qtype)
		c := dns.Client{Net: network, Timeout: 3 * time.Second}
		r, _, err := c.Exchange(m, net.JoinHostPort("127.0.0.1", itoa(px.port)))
		if err != nil {
			t.Fatalf("%s %s: %v", network, name, err)
		}
		if r.Id != m.Id {
			t.Fatalf("reply id %d, want %d", r.Id, m.Id)
		}
		return r
	}

	r := ask("API.allowed.test", dns.TypeA, "udp")
	if len(r.Answer) != 2 || r.Answer[0].Header().Ttl != uint32(maxLearnTTL/time.Second) {
		t.Errorf("allowed answer %v: want 2 records with the TTL cut to %v", r.Answer, maxLearnTTL)
	}
	// 10.0.0.8 is denied exactly: the tie goes to deny, it is not learned.
	if got := l.get("u1_1_a4"); !slices.Equal(got, []netip.Addr{a("10.0.0.7")}) || l.ttl["u1_1_a4"] != maxLearnTTL {
		t.Errorf("learned allow4 %v for %v", got, l.ttl["u1_1_a4"])
	}
	if r := ask("api.allowed.test", dns.TypeAAAA, "tcp"); r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
		t.Errorf("AAAA over TCP: %s %v", dns.RcodeToString[r.Rcode], r.Answer)
	}
	if got := l.get("u1_1_a6"); !slices.Equal(got, []netip.Addr{a("fd00::7")}) {
		t.Errorf("learned allow6 %v", got)
	}
	// A repeated answer is not learned again (no nft run).
	ask("api.allowed.test", dns.TypeA, "udp")
	if got := l.get("u1_1_a4"); len(got) != 1 {
		t.Errorf("repeated answer learned again: %v", got)
	}

	r = ask("deny.test", dns.TypeA, "udp")
	if r.Rcode != dns.RcodeNameError || len(r.Answer) != 0 {
		t.Errorf("denied name answered %s %v, want NXDOMAIN", dns.RcodeToString[r.Rcode], r.Answer)
	}
	if got4, got6 := l.get("u1_1_d4"), l.get("u1_1_d6"); !slices.Equal(got4, []netip.Addr{a("1.2.3.4")}) || !slices.Equal(got6, []netip.Addr{a("2001:db8::4")}) {
		t.Errorf("learned deny %v %v", got4, got6)
	}

	r = ask("plain.test", dns.TypeA, "udp")
	if len(r.Answer) != 1 || r.Answer[0].Header().Ttl != 7200 {
		t.Errorf("plain answer %v: want passed through unchanged", r.Answer)
	}
	if len(l.get("u1_1_a4")) != 1 {
		t.Error("a name matching no domain was learned")
	}

	// Learning failed: the guest gets SERVFAIL, not an answer that would
	// not connect.
	l.mu.Lock()
	l.fail = true
	l.mu.Unlock()
	if r := ask("new.allowed.test", dns.TypeA, "udp"); r.Rcode != dns.RcodeServerFailure {
		t.Errorf("learn failure answered %s", dns.RcodeToString[r.Rcode])
	}

	// Malformed queries.
	m := new(dns.Msg)
	m.SetQuestion("a.test.", dns.TypeA)
	m.Question = append(m.Question, m.Question[0])
	if r := px.answer(context.Background(), m, "udp"); r == nil || r.Rcode != dns.RcodeFormatError {
		t.Errorf("two questions: %v", r)
	}
	m.Question = m.Question[:1]
	m.Response = true
	if r := px.answer(context.Background(), m, "udp"); r != nil {
		t.Errorf("a response was answered: %v", r)
	}
	m.Response = false
	m.Opcode = dns.OpcodeUpdate
	if r := px.answer(context.Background(), m, "udp"); r == nil || r.Rcode != dns.RcodeNotImplemented {
		t.Errorf("update: %v", r)
	}
}

func TestProxyUpstreamDown(t *testing.T) {
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := pc.LocalAddr().String()
	pc.Close()
	px, err := startProxy(slog.Default(), dead, Policy{}, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer px.close()
	m := new(dns.Msg)
	m.SetQuestion("x.test.", dns.TypeA)
	if r := px.answer(context.Background(), m, "udp"); r == nil || r.Rcode != dns.RcodeServerFailure {
		t.Errorf("dead upstream: %v", r)
	}
}

func TestResolvConfUpstream(t *testing.T) {
	dir := t.TempDir()
	for content, want := range map[string]string{
		"# x\nsearch a\nnameserver 10.255.255.53\nnameserver 1.1.1.1\n": "10.255.255.53:53",
		"nameserver fd00::1\n": "[fd00::1]:53",
		"nameserver bogus\n":   "127.0.0.1:53",
		"":                     "127.0.0.1:53",
	} {
		path := dir + "/resolv.conf"
		if err := writeFile(path, content); err != nil {
			t.Fatal(err)
		}
		if got := resolvConfUpstream(path); got != want {
			t.Errorf("resolvConfUpstream(%q) = %q, want %q", content, got, want)
		}
	}
	if got := resolvConfUpstream(dir + "/missing"); got != "127.0.0.1:53" {
		t.Errorf("missing resolv.conf: %q", got)
	}
	for in, want := range map[string]string{"1.1.1.1": "1.1.1.1:53", "::1": "[::1]:53", "127.0.0.1:5353": "127.0.0.1:5353"} {
		if got, err := upstreamAddr(in); err != nil || got != want {
			t.Errorf("upstreamAddr(%q) = %q, %v", in, got, err)
		}
	}
	for _, bad := range []string{"", "host", ":53", "1.1.1.1:"} {
		if _, err := upstreamAddr(bad); err == nil {
			t.Errorf("upstreamAddr(%q) accepted", bad)
		}
	}
}

func itoa(port uint16) string { return strconv.Itoa(int(port)) }

func writeFile(path, content string) error { return os.WriteFile(path, []byte(content), 0o644) }
