package netguard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/miekg/dns"
)

// DNS proxy bounds.
const (
	// minLearnTTL and maxLearnTTL bound how long an answered address stays
	// in a learned set; answers' TTLs above maxLearnTTL are cut to it, so
	// a guest never caches an address longer than the rules know it.
	minLearnTTL = 60 * time.Second
	maxLearnTTL = time.Hour

	upstreamTimeout = 5 * time.Second
	maxInFlight     = 64 // queries answered at once by one proxy
	maxTCPConns     = 16 // TCP connections open at once to one proxy
	maxTCPQueries   = 64 // queries on one TCP connection
	tcpIdle         = 10 * time.Second
)

// learnFunc adds addresses to a learned set of the table with a timeout.
type learnFunc func(ctx context.Context, set string, addrs []netip.Addr, timeout time.Duration) error

// proxy is a DNS forwarder on loopback (127.0.0.1 and ::1, UDP and TCP, one
// port) for the guests of one uid, or the shared one for every uid without
// domains in its policy. The nat chain redirects guests' DNS to it; it
// forwards to the upstream resolver and, for names matching a domain of
// the policy, puts the answered addresses in the uid's learned sets before
// the guest sees them. A name matching a deny domain is answered NXDOMAIN
// (its addresses, resolved anyway, go to the deny sets).
type proxy struct {
	log      *slog.Logger
	upstream string
	policy   Policy
	chain    string    // the uid's chain: learned sets are chain+suffix
	learn    learnFunc // nil for the shared proxy
	port     uint16

	pcs    []net.PacketConn
	lns    []net.Listener
	sem    chan struct{}
	tcp    chan struct{}
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu         sync.Mutex
	learned    map[learnKey]time.Time // what is in the sets, until when
	lastWarn   time.Time
	suppressed int
}

// warnEvery bounds how often one proxy logs a warning: a guest controls
// how many queries fail.
const warnEvery = 10 * time.Second

// warn logs at most once per warnEvery, counting what it left out.
func (px *proxy) warn(msg string, args ...any) {
	px.mu.Lock()
	now := time.Now()
	if now.Sub(px.lastWarn) < warnEvery {
		px.suppressed++
		px.mu.Unlock()
		return
	}
	px.lastWarn = now
	n := px.suppressed
	px.suppressed = 0
	px.mu.Unlock()
	px.log.Warn(msg, append(args, "chain", px.chain, "suppressed_before", n)...)
}

type learnKey struct {
	set  string
	addr netip.Addr
}

// startProxy listens and serves until close.
func startProxy(log *slog.Logger, upstream string, p Policy, chain string, learn learnFunc) (*proxy, error) {
	port, pcs, lns, err := listenLoopback()
	if err != nil {
		return nil, fmt.Errorf("netguard: dns proxy: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	px := &proxy{
		log: log, upstream: upstream, policy: p, chain: chain, learn: learn, port: port,
		pcs: pcs, lns: lns, sem: make(chan struct{}, maxInFlight), tcp: make(chan struct{}, maxTCPConns),
		ctx: ctx, cancel: cancel, learned: map[learnKey]time.Time{},
	}
	for _, pc := range pcs {
		px.wg.Go(func() { px.serveUDP(pc) })
	}
	for _, ln := range lns {
		px.wg.Go(func() { px.serveTCP(ln) })
	}
	return px, nil
}

// close stops the proxy and waits for its goroutines.
func (px *proxy) close() {
	px.cancel()
	for _, pc := range px.pcs {
		pc.Close()
	}
	for _, ln := range px.lns {
		ln.Close()
	}
	px.wg.Wait()
}

// listenLoopback binds UDP and TCP on one free port of 127.0.0.1 and, when
// the host has it, ::1.
func listenLoopback() (uint16, []net.PacketConn, []net.Listener, error) {
	var lastErr error
	for range 20 {
		pc4, err := net.ListenPacket("udp4", "127.0.0.1:0")
		if err != nil {
			return 0, nil, nil, err
		}
		port := pc4.LocalAddr().(*net.UDPAddr).Port
		pcs, lns, err := listenBeside(pc4, port)
		if err == nil {
			return uint16(port), pcs, lns, nil
		}
		if !errors.Is(err, syscall.EADDRINUSE) {
			return 0, nil, nil, err
		}
		lastErr = err // taken on TCP or ::1: try another port
	}
	return 0, nil, nil, fmt.Errorf("no free port for UDP and TCP on loopback: %w", lastErr)
}

// listenBeside binds TCP on 127.0.0.1:port and UDP and TCP on [::1]:port
// beside pc4 (UDP on 127.0.0.1:port). A host without IPv6 loopback gets
// IPv4 only (no IPv6 DNS either). On error it closes everything, pc4 too.
func listenBeside(pc4 net.PacketConn, port int) ([]net.PacketConn, []net.Listener, error) {
	pcs, lns := []net.PacketConn{pc4}, []net.Listener(nil)
	for _, network := range []string{"tcp4", "udp6", "tcp6"} {
		host := "127.0.0.1"
		if strings.HasSuffix(network, "6") {
			host = "::1"
		}
		addr := net.JoinHostPort(host, strconv.Itoa(port))
		var err error
		if strings.HasPrefix(network, "udp") {
			var pc net.PacketConn
			if pc, err = net.ListenPacket(network, addr); err == nil {
				pcs = append(pcs, pc)
			}
		} else {
			var ln net.Listener
			if ln, err = net.Listen(network, addr); err == nil {
				lns = append(lns, ln)
			}
		}
		if err == nil {
			continue
		}
		if network == "udp6" && !errors.Is(err, syscall.EADDRINUSE) {
			return pcs, lns, nil // no IPv6 loopback
		}
		for _, c := range pcs {
			c.Close()
		}
		for _, l := range lns {
			l.Close()
		}
		return nil, nil, err
	}
	return pcs, lns, nil
}

// stopped reports whether a read or accept error means the proxy is
// closing; otherwise it waits a moment (errors like EMFILE repeat at once).
func (px *proxy) stopped(err error) bool {
	if px.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
		return true
	}
	select {
	case <-px.ctx.Done():
		return true
	case <-time.After(100 * time.Millisecond):
		return false
	}
}

func (px *proxy) serveUDP(pc net.PacketConn) {
	buf := make([]byte, dns.MaxMsgSize)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			if px.stopped(err) {
				return
			}
			px.warn("netguard: dns proxy read", "err", err)
			continue
		}
		req := new(dns.Msg)
		if req.Unpack(buf[:n]) != nil {
			continue
		}
		select {
		case px.sem <- struct{}{}:
		default:
			continue // too many queries in flight: drop, the guest retries
		}
		px.wg.Go(func() {
			defer func() { <-px.sem }()
			resp := px.answer(px.ctx, req, "udp")
			if resp == nil {
				return
			}
			resp.Compress = true
			out, err := resp.Pack()
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(out, from)
		})
	}
}

func (px *proxy) serveTCP(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			if px.stopped(err) {
				return
			}
			px.warn("netguard: dns proxy accept", "err", err)
			continue
		}
		select {
		case px.tcp <- struct{}{}:
		default:
			c.Close()
			continue
		}
		px.wg.Go(func() {
			defer func() { <-px.tcp }()
			defer c.Close()
			stop := context.AfterFunc(px.ctx, func() { c.Close() })
			defer stop()
			conn := &dns.Conn{Conn: c}
			for range maxTCPQueries {
				_ = c.SetDeadline(time.Now().Add(tcpIdle))
				req, err := conn.ReadMsg()
				if err != nil {
					return
				}
				select {
				case px.sem <- struct{}{}:
				case <-px.ctx.Done():
					return
				}
				resp := px.answer(px.ctx, req, "tcp")
				<-px.sem
				if resp == nil {
					return
				}
				resp.Compress = true
				if conn.WriteMsg(resp) != nil {
					return
				}
			}
		})
	}
}

// answer handles one query; nil means no reply.
func (px *proxy) answer(ctx context.Context, req *dns.Msg, network string) *dns.Msg {
	if req.Response {
		return nil
	}
	if req.Opcode != dns.OpcodeQuery || len(req.Question) != 1 {
		m := new(dns.Msg)
		m.SetRcode(req, dns.RcodeNotImplemented)
		if len(req.Question) != 1 {
			m.Rcode = dns.RcodeFormatError
		}
		return m
	}
	name := strings.TrimSuffix(strings.ToLower(req.Question[0].Name), ".")
	v := px.policy.domainVerdict(name)
	if v == verdictDeny {
		px.learnDenied(ctx, name)
		m := new(dns.Msg)
		m.SetRcode(req, dns.RcodeNameError)
		m.RecursionAvailable = true
		return m
	}
	c := dns.Client{Net: network, Timeout: upstreamTimeout}
	resp, _, err := c.ExchangeContext(ctx, req, px.upstream)
	if err != nil {
		px.log.Debug("netguard: dns upstream", "upstream", px.upstream, "name", name, "err", err)
		return servfail(req)
	}
	resp.Id = req.Id
	if v == verdictAllow && px.learn != nil {
		clampTTLs(resp)
		if err := px.learnAnswers(ctx, resp.Answer, true); err != nil {
			px.warn("netguard: allow answers of an allowed domain", "name", name, "err", err)
			return servfail(req)
		}
	}
	return resp
}

func servfail(req *dns.Msg) *dns.Msg {
	m := new(dns.Msg)
	m.SetRcode(req, dns.RcodeServerFailure)
	m.RecursionAvailable = true
	return m
}

// clampTTLs cuts the answers' TTLs to maxLearnTTL.
func clampTTLs(m *dns.Msg) {
	for _, rr := range m.Answer {
		if h := rr.Header(); h.Ttl > uint32(maxLearnTTL/time.Second) {
			h.Ttl = uint32(maxLearnTTL / time.Second)
		}
	}
}

// learnDenied resolves name's A and AAAA records and puts them in the deny
// sets (best effort: the guest gets NXDOMAIN anyway).
func (px *proxy) learnDenied(ctx context.Context, name string) {
	if px.learn == nil {
		return
	}
	var rrs []dns.RR
	for _, t := range []uint16{dns.TypeA, dns.TypeAAAA} {
		m := new(dns.Msg)
		m.SetQuestion(dns.Fqdn(name), t)
		c := dns.Client{Net: "udp", Timeout: upstreamTimeout}
		r, _, err := c.ExchangeContext(ctx, m, px.upstream)
		if err != nil {
			continue
		}
		rrs = append(rrs, r.Answer...)
	}
	if err := px.learnAnswers(ctx, rrs, false); err != nil {
		px.warn("netguard: deny answers of a denied domain", "name", name, "err", err)
	}
}

// learnAnswers puts the A and AAAA records of rrs in the allow (or deny)
// sets. An allowed address that a deny entry names exactly is left out
// (a tie, which deny wins).
func (px *proxy) learnAnswers(ctx context.Context, rrs []dns.RR, allow bool) error {
	suffix := [2]string{learnAllow4, learnAllow6}
	if !allow {
		suffix = [2]string{learnDeny4, learnDeny6}
	}
	var v4, v6 []netip.Addr
	var ttl uint32
	for _, rr := range rrs {
		var a netip.Addr
		switch r := rr.(type) {
		case *dns.A:
			a, _ = netip.AddrFromSlice(r.A.To4())
		case *dns.AAAA:
			a, _ = netip.AddrFromSlice(r.AAAA.To16())
		}
		if !a.IsValid() {
			continue
		}
		a = a.Unmap()
		if allow && px.policy.deniesExactly(a) {
			continue
		}
		ttl = max(ttl, rr.Header().Ttl)
		if a.Is4() {
			v4 = append(v4, a)
		} else {
			v6 = append(v6, a)
		}
	}
	timeout := min(max(time.Duration(ttl)*time.Second, minLearnTTL), maxLearnTTL)
	for i, addrs := range [][]netip.Addr{v4, v6} {
		set := px.chain + suffix[i]
		addrs = px.unknown(set, addrs, timeout)
		if len(addrs) == 0 {
			continue
		}
		if err := px.learn(ctx, set, addrs, timeout); err != nil {
			return err
		}
		px.remember(set, addrs, timeout)
	}
	return nil
}

// unknown returns the addresses of addrs that are not in set for at least
// half of timeout more (no nft run for a repeated answer).
func (px *proxy) unknown(set string, addrs []netip.Addr, timeout time.Duration) []netip.Addr {
	px.mu.Lock()
	defer px.mu.Unlock()
	now := time.Now()
	var out []netip.Addr
	for _, a := range addrs {
		if until, ok := px.learned[learnKey{set, a}]; !ok || until.Sub(now) < timeout/2 {
			if !slices.Contains(out, a) {
				out = append(out, a)
			}
		}
	}
	return out
}

func (px *proxy) remember(set string, addrs []netip.Addr, timeout time.Duration) {
	px.mu.Lock()
	defer px.mu.Unlock()
	now := time.Now()
	if len(px.learned) > 2*setElemMax {
		for k, until := range px.learned {
			if until.Before(now) {
				delete(px.learned, k)
			}
		}
	}
	for _, a := range addrs {
		px.learned[learnKey{set, a}] = now.Add(timeout)
	}
}
