package netguard

import (
	"context"
	"encoding/hex"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// fuzzProxy is a proxy for the rules of one uid, not listening: the fuzz
// targets call its answer handling directly. What it asks to learn is
// recorded in l.
func fuzzProxy(upstream string, l *learned) *proxy {
	p := Policy{
		AllowDomains: []string{"*.allowed.test", "exact.test"},
		DenyDomains:  []string{"*.deny.test", "bad.allowed.test"},
		Deny:         prefixes("10.0.0.8/32", "2001:db8::8/128"),
	}
	return &proxy{log: slog.New(slog.DiscardHandler), upstream: upstream, policy: p, chain: "u1_1", learn: l.learn,
		learned: map[learnKey]time.Time{}}
}

func newLearned() *learned {
	return &learned{sets: map[string][]netip.Addr{}, ttl: map[string]time.Duration{}}
}

// answerAddrs returns the A and AAAA addresses in rrs, unmapped.
func answerAddrs(rrs []dns.RR) map[netip.Addr]bool {
	out := map[netip.Addr]bool{}
	for _, rr := range rrs {
		var a netip.Addr
		switch r := rr.(type) {
		case *dns.A:
			a, _ = netip.AddrFromSlice(r.A.To4())
		case *dns.AAAA:
			a, _ = netip.AddrFromSlice(r.AAAA.To16())
		}
		if a.IsValid() {
			out[a.Unmap()] = true
		}
	}
	return out
}

// checkLearned holds what l recorded to the answer's addresses: each set is
// one of the chain's learned sets and of one address family, each address
// was in the answer and is not denied exactly when learned as allowed, and
// each timeout is within the learn bounds.
func checkLearned(t *testing.T, px *proxy, l *learned, answered map[netip.Addr]bool, allow bool) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	for set, addrs := range l.sets {
		suffix, ok := strings.CutPrefix(set, px.chain)
		var want4 bool
		switch {
		case ok && allow && suffix == learnAllow4, ok && !allow && suffix == learnDeny4:
			want4 = true
		case ok && allow && suffix == learnAllow6, ok && !allow && suffix == learnDeny6:
		default:
			t.Fatalf("learned into set %q (allow %v)", set, allow)
		}
		seen := map[netip.Addr]bool{}
		for _, a := range addrs {
			if !answered[a] || a.Is4() != want4 || a.Is4In6() || a.Zone() != "" || seen[a] {
				t.Fatalf("learned %v into %q from an answer of %v", a, set, answered)
			}
			if allow && px.policy.deniesExactly(a) {
				t.Fatalf("learned %v, which is denied exactly, as allowed", a)
			}
			seen[a] = true
		}
		if ttl := l.ttl[set]; ttl < minLearnTTL || ttl > maxLearnTTL {
			t.Fatalf("set %q learned for %v", set, ttl)
		}
	}
}

func packed(t testing.TB, m *dns.Msg) []byte {
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// upstreamSeeds are answers a resolver could give, packed.
func upstreamSeeds(f *testing.F) {
	m := new(dns.Msg)
	m.SetQuestion("api.allowed.test.", dns.TypeA)
	m.Response = true
	hdr := func(t uint16, ttl uint32) dns.RR_Header {
		return dns.RR_Header{Name: "api.allowed.test.", Rrtype: t, Class: dns.ClassINET, Ttl: ttl}
	}
	m.Answer = []dns.RR{
		&dns.A{Hdr: hdr(dns.TypeA, 7200), A: net.IPv4(10, 0, 0, 7)},
		&dns.A{Hdr: hdr(dns.TypeA, 1), A: net.IPv4(10, 0, 0, 8)},
		&dns.AAAA{Hdr: hdr(dns.TypeAAAA, 0xffffffff), AAAA: net.ParseIP("::ffff:1.2.3.4")},
		&dns.AAAA{Hdr: hdr(dns.TypeAAAA, 30), AAAA: net.ParseIP("fd00::7")},
		&dns.CNAME{Hdr: hdr(dns.TypeCNAME, 30), Target: "x.allowed.test."},
	}
	f.Add(packed(f, m), true)
	f.Add(packed(f, m), false)
	m.Answer = []dns.RR{&dns.A{Hdr: hdr(dns.TypeA, 60), A: net.IPv4(10, 0, 0, 7)}, &dns.A{Hdr: hdr(dns.TypeA, 60), A: net.IPv4(10, 0, 0, 7)}}
	f.Add(packed(f, m), true)
	f.Add([]byte{}, true)
}

// FuzzUpstreamAnswer feeds the proxy an upstream's reply, as the DNS
// client unpacks it, for an allowed and for a denied name: TTLs are cut to
// the learn bound, and what is learned is only the answer's A and AAAA
// addresses, each in its family's set, an exactly denied one never as
// allowed. The reply the guest gets still packs (or fails cleanly).
func FuzzUpstreamAnswer(f *testing.F) {
	upstreamSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte, allow bool) {
		m := new(dns.Msg)
		if m.Unpack(data) != nil {
			return
		}
		l := newLearned()
		px := fuzzProxy("127.0.0.1:1", l)
		clampTTLs(m)
		for _, rr := range m.Answer {
			if rr.Header().Ttl > uint32(maxLearnTTL/time.Second) {
				t.Fatalf("TTL %d passed on", rr.Header().Ttl)
			}
		}
		if err := px.learnAnswers(context.Background(), m.Answer, allow); err != nil {
			t.Fatalf("learnAnswers: %v", err)
		}
		checkLearned(t, px, l, answerAddrs(m.Answer), allow)
		_, _ = m.Pack()
	})
}

// fuzzUpstream is a resolver on loopback answering every A question with
// 10.0.0.7 and 10.0.0.8 and every AAAA with fd00::7, for the life of the
// fuzz process.
func fuzzUpstream(f *testing.F) string {
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	h := dns.HandlerFunc(func(w dns.ResponseWriter, req *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(req)
		for _, q := range req.Question {
			hdr := dns.RR_Header{Name: q.Name, Rrtype: q.Qtype, Class: dns.ClassINET, Ttl: 300}
			switch q.Qtype {
			case dns.TypeA:
				m.Answer = append(m.Answer, &dns.A{Hdr: hdr, A: net.IPv4(10, 0, 0, 7)}, &dns.A{Hdr: hdr, A: net.IPv4(10, 0, 0, 8)})
			case dns.TypeAAAA:
				m.Answer = append(m.Answer, &dns.AAAA{Hdr: hdr, AAAA: net.ParseIP("fd00::7")})
			}
		}
		_ = w.WriteMsg(m)
	})
	srv := &dns.Server{PacketConn: pc, Handler: h}
	started := make(chan struct{})
	srv.NotifyStartedFunc = func() { close(started) }
	go func() { _ = srv.ActivateAndServe() }()
	<-started
	f.Cleanup(func() { _ = srv.Shutdown() })
	return pc.LocalAddr().String()
}

// FuzzGuestQuery feeds the proxy a query as a guest sends it (any bytes
// that unpack as a DNS message): no panic; a response, a non-query or a
// message without exactly one question is not forwarded (nothing learned);
// the reply carries the query's id; a name under a deny domain is answered
// NXDOMAIN without addresses; addresses are learned as allowed only for a
// name under an allow domain, and then within the rules of checkLearned.
func FuzzGuestQuery(f *testing.F) {
	for _, q := range []struct {
		name  string
		qtype uint16
	}{
		{"api.allowed.test.", dns.TypeA}, {"API.Allowed.Test.", dns.TypeAAAA}, {"x.deny.test.", dns.TypeA},
		{"bad.allowed.test.", dns.TypeA}, {"plain.test.", dns.TypeA}, {"exact.test.", dns.TypeANY},
		{"a\\.b.allowed.test.", dns.TypeA}, {".", dns.TypeA},
	} {
		m := new(dns.Msg)
		m.SetQuestion(q.name, q.qtype)
		f.Add(packed(f, m))
	}
	two := new(dns.Msg)
	two.SetQuestion("api.allowed.test.", dns.TypeA)
	two.Question = append(two.Question, two.Question[0])
	f.Add(packed(f, two))
	b, _ := hex.DecodeString("abcd81800001000000000000")
	f.Add(b)
	up := fuzzUpstream(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		req := new(dns.Msg)
		if req.Unpack(data) != nil {
			return
		}
		l := newLearned()
		px := fuzzProxy(up, l)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		resp := px.answer(ctx, req, "udp")
		if req.Response {
			if resp != nil {
				t.Fatalf("answered a response")
			}
			return
		}
		if resp == nil {
			t.Fatalf("no reply to %v", req)
		}
		if resp.Id != req.Id {
			t.Fatalf("reply id %d to query %d", resp.Id, req.Id)
		}
		if req.Opcode != dns.OpcodeQuery || len(req.Question) != 1 {
			if resp.Rcode == dns.RcodeSuccess || len(resp.Answer) > 0 || len(l.sets) > 0 {
				t.Fatalf("malformed query answered: %v", resp)
			}
			return
		}
		name := strings.TrimSuffix(strings.ToLower(req.Question[0].Name), ".")
		switch px.policy.domainVerdict(name) {
		case verdictDeny:
			if resp.Rcode != dns.RcodeNameError || len(resp.Answer) > 0 {
				t.Fatalf("denied %q answered %v", name, resp)
			}
			checkLearned(t, px, l, map[netip.Addr]bool{netip.MustParseAddr("10.0.0.7"): true, netip.MustParseAddr("10.0.0.8"): true, netip.MustParseAddr("fd00::7"): true}, false)
		case verdictAllow:
			checkLearned(t, px, l, answerAddrs(resp.Answer), true)
		default:
			if len(l.sets) > 0 {
				t.Fatalf("learned %v for %q, which no domain names", l.sets, name)
			}
		}
	})
}
