//go:build linux

package netguard

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/subjects"
)

// rejectedFast is how quickly a blocked connection must fail: rules reject
// (TCP reset, ICMP admin-prohibited), they never drop into a timeout.
const rejectedFast = time.Second

// newTestGuard creates a Guard with a unique table over a uid range of its
// own (far from the ranges real workers use), with the fake resolver as
// upstream; it is closed with the test.
func newTestGuard(t *testing.T, upstream string) (*Guard, uint32) {
	t.Helper()
	return newTestGuardConfig(t, Config{Upstream: upstream})
}

// newTestGuardConfig is newTestGuard with cfg (its Table, uid range and
// Logger are set here).
func newTestGuardConfig(t *testing.T, cfg Config) (*Guard, uint32) {
	t.Helper()
	if err := Available(context.Background()); err != nil {
		t.Fatalf("netguard tests need root and nftables (apt-get install nftables): %v", err)
	}
	first := uint32(3000000000 + rand.IntN(1000000)*1000)
	cfg.Table = fmt.Sprintf("firkin_test_%08x", rand.Uint32())
	cfg.UIDFirst, cfg.UIDCount = first, 100
	cfg.Logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	g, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = g.Close(context.Background()) })
	return g, first
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// expect checks results against want: "ok" (reached), "rejected" (failed
// within rejectedFast).
func expect(t *testing.T, who string, acts []action, res []result, want ...string) {
	t.Helper()
	for i, a := range acts {
		r := res[i]
		what := fmt.Sprintf("%s: %s %s%s", who, a.Op, a.Addr, a.Name)
		switch want[i] {
		case "ok":
			if !r.OK {
				t.Errorf("%s: want reached, got %s", what, r.Err)
			}
		case "rejected":
			if r.OK {
				t.Errorf("%s: want rejected, reached it", what)
			} else if r.Elapsed > rejectedFast {
				t.Errorf("%s: rejected only after %v (%s), want within %v", what, r.Elapsed, r.Err, rejectedFast)
			}
		default:
			panic(want[i])
		}
	}
}

func tcp(addr string) action { return action{Op: "tcp", Addr: addr} }
func udp(addr string) action { return action{Op: "udp", Addr: addr} }

func TestGuard(t *testing.T) {
	h := newTestHost(t)
	upstream := fakeDNS(t, 30, map[string][]netip.Addr{
		"allowed.test":    {h.pub4, h.pub6},
		"other.test":      {h.priv4},
		"plain.test":      {h.pub4},
		"denied.test":     {h.pub4},
		"www.wild.test":   {h.pub4},
		"www.rebind.test": {h.ll4, h.priv4, h.hostLL4, h.ula6},
	})
	// Host services a guest must never reach: loopback (like the worker's
	// NATS and proxy) and every address of the host (bound to any).
	lo4 := echoListener(t, "127.0.0.1:0").Addr().(*net.TCPAddr).Port
	lo4b := echoListener(t, "127.0.0.1:0").Addr().(*net.TCPAddr).Port
	lo6 := echoListener(t, "[::1]:0").Addr().(*net.TCPAddr).Port
	anyPort := echoListener(t, ":0").Addr().(*net.TCPAddr).Port
	loop4 := func(port int) string { return fmt.Sprintf("127.0.0.1:%d", port) }
	dnsAt := h.priv4.String() + ":53" // redirected to the Guard's proxy before it leaves

	// A table of someone else's that Close must leave alone.
	sentinel := fmt.Sprintf("firkin_test_sentinel_%08x", rand.Uint32())
	if err := runNft(context.Background(), mustNft(t), "table inet "+sentinel+" {\n\tchain c {\n\t}\n}\n", false); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = runNft(context.Background(), mustNft(t), deleteTableScript(sentinel), false) })
	g, first := newTestGuard(t, upstream)
	if !strings.Contains(nftTables(t), "table inet "+g.Table()+"\n") {
		t.Fatalf("table %s not created", g.Table())
	}
	ctx := context.Background()
	uid := func(i uint32) uint32 { return first + i }

	t.Run("default policy", func(t *testing.T) {
		acts := []action{
			tcp(loop4(lo4)), tcp(fmt.Sprintf("[::1]:%d", lo6)), tcp(fmt.Sprintf("0.0.0.0:%d", lo4)), tcp(fmt.Sprintf("[::]:%d", anyPort)),
			tcp(netip.AddrPortFrom(h.hostPriv4, uint16(anyPort)).String()), tcp(netip.AddrPortFrom(h.hostLL4, uint16(anyPort)).String()),
			tcp(h.at(h.priv4)), tcp(h.at(h.ll4)), tcp(h.at(h.ula6)), udp(h.at(h.priv4)), udp(h.at(h.ll4)),
			tcp(h.at(h.pub4)), tcp(h.at(h.pub6)), udp(h.at(h.pub4)),
			{Op: "dns", Server: dnsAt, Name: "other.test"},
		}
		res := probe(t, uid(0), acts...)
		expect(t, "default", acts, res,
			"rejected", "rejected", "rejected", "rejected",
			"rejected", "rejected",
			"rejected", "rejected", "rejected", "rejected", "rejected",
			"ok", "ok", "ok",
			"ok")
		if a := res[len(res)-1].Addrs; len(a) != 1 || a[0] != h.priv4.String() {
			t.Errorf("DNS through the shared proxy answered %v, want [%v]", a, h.priv4)
		}
		// Root and a uid just outside the range are not filtered.
		for _, who := range []uint32{first - 1, first + 100} {
			acts := []action{tcp(h.at(h.priv4)), tcp(loop4(lo4))}
			expect(t, fmt.Sprint("uid ", who), acts, probe(t, who, acts...), "ok", "ok")
		}
		if r := probeOne(tcp(h.at(h.ll4))); !r.OK {
			t.Errorf("root: %s", r.Err)
		}
	})

	t.Run("allow CIDR", func(t *testing.T) {
		if err := g.Apply(ctx, uid(1), mustPolicy(t, []string{"10.231.0.0/16"}, nil)); err != nil {
			t.Fatal(err)
		}
		acts := []action{tcp(h.at(h.priv4)), udp(h.at(h.priv4)), tcp(netip.AddrPortFrom(h.hostPriv4, uint16(anyPort)).String()), tcp(h.at(h.ll4)), tcp(h.at(h.pub4))}
		// The host's own address in the allowed CIDR stays closed.
		expect(t, "allow", acts, probe(t, uid(1), acts...), "ok", "ok", "rejected", "rejected", "ok")
	})

	t.Run("most specific wins, deny on a tie", func(t *testing.T) {
		llNet := netip.PrefixFrom(h.ll4, 30).Masked().String()
		err := g.Apply(ctx, uid(2), mustPolicy(t,
			[]string{"10.231.0.0/16", "169.254.0.0/16", h.pub4.String()},
			[]string{"10.231.0.0/16", llNet, "203.0.113.0/24"}))
		if err != nil {
			t.Fatal(err)
		}
		acts := []action{tcp(h.at(h.priv4)), tcp(h.at(h.ll4)), tcp(h.at(h.pub4))}
		expect(t, "allow+deny", acts, probe(t, uid(2), acts...), "rejected", "rejected", "ok")
	})

	t.Run("broad allow", func(t *testing.T) {
		// A broad allow opens only the public part of what it covers: not
		// the private, link-local or ULA addresses, nor the host's own.
		if err := g.Apply(ctx, uid(13), mustPolicy(t, []string{"0.0.0.0/0", "::/0"}, nil)); err != nil {
			t.Fatal(err)
		}
		hostPriv := tcp(netip.AddrPortFrom(h.hostPriv4, uint16(anyPort)).String())
		acts := []action{tcp(h.at(h.priv4)), udp(h.at(h.priv4)), tcp(h.at(h.ll4)), udp(h.at(h.ll4)), tcp(h.at(h.ula6)), hostPriv,
			tcp(h.at(h.pub4)), udp(h.at(h.pub4)), tcp(h.at(h.pub6))}
		expect(t, "broad allow", acts, probe(t, uid(13), acts...),
			"rejected", "rejected", "rejected", "rejected", "rejected", "rejected", "ok", "ok", "ok")
		// An allow of an internal address beside it still opens that one.
		err := g.Apply(ctx, uid(14), mustPolicy(t, []string{"0.0.0.0/0", "::/0", h.priv4.String(), h.ula6.String()}, nil))
		if err != nil {
			t.Fatal(err)
		}
		acts = []action{tcp(h.at(h.priv4)), tcp(h.at(h.ula6)), tcp(h.at(h.ll4)), hostPriv, tcp(h.at(h.pub4))}
		expect(t, "broad allow and /32", acts, probe(t, uid(14), acts...), "ok", "ok", "rejected", "rejected", "ok")
	})

	t.Run("allowlist", func(t *testing.T) {
		if err := g.Apply(ctx, uid(3), mustPolicy(t, []string{h.priv4.String(), h.ula6.String()}, []string{"0.0.0.0/0", "::/0"})); err != nil {
			t.Fatal(err)
		}
		acts := []action{tcp(h.at(h.priv4)), tcp(h.at(h.ula6)), tcp(h.at(h.pub4)), tcp(h.at(h.pub6)), udp(h.at(h.pub4)), tcp(h.at(h.ll4)), tcp(loop4(lo4)),
			{Op: "dns", Server: dnsAt, Name: "other.test"}}
		expect(t, "allowlist", acts, probe(t, uid(3), acts...), "ok", "ok", "rejected", "rejected", "rejected", "rejected", "rejected", "ok")
	})

	t.Run("host port", func(t *testing.T) {
		if err := g.Apply(ctx, uid(4), mustPolicy(t, []string{fmt.Sprintf("host:%d", lo4)}, nil)); err != nil {
			t.Fatal(err)
		}
		acts := []action{tcp(loop4(lo4)), tcp(loop4(lo4b)), tcp(fmt.Sprintf("[::1]:%d", lo6)), tcp(netip.AddrPortFrom(h.hostPriv4, uint16(anyPort)).String())}
		expect(t, "host port", acts, probe(t, uid(4), acts...), "ok", "rejected", "rejected", "rejected")
		// Only for that uid.
		acts = acts[:1]
		expect(t, "other uid", acts, probe(t, uid(5), acts...), "rejected")
	})

	t.Run("off", func(t *testing.T) {
		if err := g.Apply(ctx, uid(6), Policy{Off: true}); err != nil {
			t.Fatal(err)
		}
		acts := []action{tcp(h.at(h.pub4)), tcp(h.at(h.pub6)), udp(h.at(h.pub4)), tcp(loop4(lo4)), {Op: "dns", Server: dnsAt, Name: "other.test"}}
		res := probe(t, uid(6), acts...)
		expect(t, "off", acts[:4], res[:4], "rejected", "rejected", "rejected", "rejected")
		if res[4].OK {
			t.Errorf("off: DNS answered %v", res[4])
		}
	})

	t.Run("allowed domain", func(t *testing.T) {
		// An allowlist of one domain, which answers the test host's public
		// addresses: only the learned answer can open them.
		p := mustPolicy(t, []string{"allowed.test"}, []string{"0.0.0.0/0", "::/0"})
		if err := g.Apply(ctx, uid(7), p); err != nil {
			t.Fatal(err)
		}
		acts := []action{tcp(h.at(h.pub4)), tcp(h.at(h.pub6)),
			{Op: "dns", Server: dnsAt, Name: "plain.test"}, tcp(h.at(h.pub4)), // same address, name not allowed
			{Op: "dns", Server: dnsAt, Name: "allowed.test"}, {Op: "dns", Server: "[" + h.ula6.String() + "]:53", Name: "allowed.test", AAAA: true},
			tcp(h.at(h.pub4)), udp(h.at(h.pub4)), tcp(h.at(h.pub6)), tcp(h.at(h.priv4))}
		res := probe(t, uid(7), acts...)
		expect(t, "allowed domain", acts, res, "rejected", "rejected", "ok", "rejected", "ok", "ok", "ok", "ok", "ok", "rejected")
		if a := res[4].Addrs; len(a) != 1 || a[0] != h.pub4.String() {
			t.Errorf("allowed.test A = %v, want [%v]", a, h.pub4)
		}
		// Another uid with the same policy did not learn it.
		if err := g.Apply(ctx, uid(8), p); err != nil {
			t.Fatal(err)
		}
		acts = []action{tcp(h.at(h.pub4))}
		expect(t, "other uid", acts, probe(t, uid(8), acts...), "rejected")
	})

	t.Run("allowed domain answering internal addresses", func(t *testing.T) {
		// A rebinding name: its answers (link-local, private, the host's
		// own, ULA) go into the learned set, and the rules still refuse them.
		u := uid(12)
		if err := g.Apply(ctx, u, mustPolicy(t, []string{"*.rebind.test"}, nil)); err != nil {
			t.Fatal(err)
		}
		hostLL := tcp(netip.AddrPortFrom(h.hostLL4, uint16(anyPort)).String())
		resolve := []action{{Op: "dns", Server: dnsAt, Name: "www.rebind.test"}, {Op: "dns", Server: dnsAt, Name: "www.rebind.test", AAAA: true}}
		acts := append(resolve, tcp(h.at(h.ll4)), udp(h.at(h.ll4)), tcp(h.at(h.priv4)), hostLL, tcp(h.at(h.ula6)))
		res := probe(t, u, acts...)
		expect(t, "rebinding", acts, res, "ok", "ok", "rejected", "rejected", "rejected", "rejected", "rejected")
		if len(res[0].Addrs) != 3 || len(res[1].Addrs) != 1 {
			t.Errorf("www.rebind.test answered %v and %v", res[0].Addrs, res[1].Addrs)
		}
		if set := nftSet(t, g.Table(), learnedSet(g, u, learnAllow4)); !strings.Contains(set, h.ll4.String()) {
			t.Errorf("learned set without %v (the rules, not the proxy, must refuse it):\n%s", h.ll4, set)
		}
		// An address entry opens what it covers (not the host's own address).
		llNet := netip.PrefixFrom(h.ll4, 30).Masked().String()
		if err := g.Apply(ctx, u, mustPolicy(t, []string{"*.rebind.test", llNet}, nil)); err != nil {
			t.Fatal(err)
		}
		acts = append(resolve, tcp(h.at(h.ll4)), tcp(h.at(h.priv4)), hostLL, tcp(h.at(h.ula6)))
		expect(t, "rebinding, CIDR allowed", acts, probe(t, u, acts...), "ok", "ok", "ok", "rejected", "rejected", "rejected")
	})

	t.Run("denied domain", func(t *testing.T) {
		// denied.test answers the test host's public address, open by default.
		if err := g.Apply(ctx, uid(9), mustPolicy(t, []string{h.pub4.String()}, []string{"denied.test"})); err != nil {
			t.Fatal(err)
		}
		acts := []action{tcp(h.at(h.pub4)), {Op: "dns", Server: dnsAt, Name: "denied.test"}, tcp(h.at(h.pub4)), tcp(h.at(h.pub6))}
		res := probe(t, uid(9), acts...)
		// Learned from the answer (a single address) the deny ties with the
		// explicit allow of that address, and deny wins.
		expect(t, "denied domain", acts, res, "ok", "ok", "rejected", "ok")
		if res[1].Rcode != "NXDOMAIN" || len(res[1].Addrs) != 0 {
			t.Errorf("denied.test answered %s %v, want NXDOMAIN", res[1].Rcode, res[1].Addrs)
		}
	})

	t.Run("wildcard allowlist", func(t *testing.T) {
		if err := g.Apply(ctx, uid(10), mustPolicy(t, []string{"*.wild.test"}, []string{"0.0.0.0/0", "::/0"})); err != nil {
			t.Fatal(err)
		}
		// Over TCP this time.
		acts := []action{tcp(h.at(h.pub4)), {Op: "dns", Server: dnsAt, Name: "www.wild.test", TCP: true}, tcp(h.at(h.pub4)), tcp(h.at(h.pub6))}
		expect(t, "wildcard", acts, probe(t, uid(10), acts...), "rejected", "ok", "ok", "rejected")
	})

	t.Run("replace and remove", func(t *testing.T) {
		u := uid(11)
		acts := []action{tcp(h.at(h.priv4)), tcp(h.at(h.pub4))}
		if err := g.Apply(ctx, u, mustPolicy(t, []string{h.priv4.String(), "allowed.test"}, nil)); err != nil {
			t.Fatal(err)
		}
		expect(t, "allowed", acts, probe(t, u, acts...), "ok", "ok")
		if err := g.Apply(ctx, u, Policy{Off: true}); err != nil {
			t.Fatal(err)
		}
		expect(t, "replaced by off", acts, probe(t, u, acts...), "rejected", "rejected")
		if err := g.Remove(ctx, u); err != nil {
			t.Fatal(err)
		}
		expect(t, "removed", acts, probe(t, u, acts...), "rejected", "ok")
		if err := g.Remove(ctx, u); err != nil {
			t.Errorf("second Remove: %v", err)
		}
		if err := g.Apply(ctx, first+100, Policy{Off: true}); err == nil {
			t.Error("Apply to a uid outside the range succeeded")
		}
	})

	// Close removes the table and the proxies, and nothing else.
	proxyPort := g.def.port
	if err := g.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if c, err := net.Dial("tcp", loop4(int(proxyPort))); err == nil {
		c.Close()
		t.Errorf("DNS proxy port %d still open after Close", proxyPort)
	}
	if after := nftTables(t); strings.Contains(after, "table inet "+g.Table()+"\n") || !strings.Contains(after, "table inet "+sentinel+"\n") {
		t.Errorf("tables after Close (want %s gone, %s kept):\n%s", g.Table(), sentinel, after)
	}
	if err := g.Close(ctx); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := g.Apply(ctx, uid(1), Policy{Off: true}); err == nil {
		t.Error("Apply after Close succeeded")
	}
}

// TestPolicyChangeJudgesOpenConnections: a connection opened under one
// policy is judged by the next at its next packet; one the new policy (or
// the same one applied again) allows keeps working.
func TestPolicyChangeJudgesOpenConnections(t *testing.T) {
	h := newTestHost(t)
	upstream := fakeDNS(t, 300, map[string][]netip.Addr{"allowed.test": {h.pub4}})
	g, first := newTestGuard(t, upstream)
	ctx := context.Background()
	ok := func(what string, r result) {
		t.Helper()
		if !r.OK {
			t.Errorf("%s: %s", what, r.Err)
		}
	}
	failed := func(what string, r result) {
		t.Helper()
		if r.OK {
			t.Errorf("%s: still delivered", what)
		} else {
			t.Logf("%s: %s after %v", what, r.Err, r.Elapsed)
		}
	}
	apply := func(uid uint32, p Policy) {
		t.Helper()
		if err := g.Apply(ctx, uid, p); err != nil {
			t.Fatal(err)
		}
	}

	// A warm machine's connection (default policy), then a policy denying it.
	c, r := hold(t, first, h.at(h.pub4))
	ok("default", r)
	ok("default, again", c.ping(t))
	apply(first, mustPolicy(t, nil, []string{h.pub4.String()}))
	failed("after a denying Apply", c.ping(t))
	c, r = hold(t, first+1, h.at(h.pub6))
	ok("default v6", r)
	apply(first+1, Policy{Off: true})
	failed("after Apply off", c.ping(t))

	// A policy allowing it: the same again, another allowing it, the
	// default (which denies the private address).
	u := first + 2
	apply(u, mustPolicy(t, []string{h.priv4.String()}, nil))
	c, r = hold(t, u, h.at(h.priv4))
	ok("allowed", r)
	apply(u, mustPolicy(t, []string{h.priv4.String()}, nil))
	ok("after the same Apply", c.ping(t))
	apply(u, mustPolicy(t, []string{h.priv4.String(), h.pub4.String()}, nil))
	ok("after an allowing Apply", c.ping(t))
	if err := g.Remove(ctx, u); err != nil {
		t.Fatal(err)
	}
	failed("after Remove", c.ping(t))

	// A connection opened through a learned address outlives the address
	// (a long download) and the same policy applied again.
	u = first + 3
	p := mustPolicy(t, []string{"allowed.test"}, []string{"0.0.0.0/0"})
	apply(u, p)
	acts := []action{{Op: "dns", Server: h.pub4.String() + ":53", Name: "allowed.test"}}
	expect(t, "resolve", acts, probe(t, u, acts...), "ok")
	c, r = hold(t, u, h.at(h.pub4))
	ok("learned", r)
	set := learnedSet(g, u, learnAllow4)
	if err := runNft(ctx, mustNft(t), fmt.Sprintf("delete element inet %s %s { %s }\n", g.Table(), set, h.pub4), false); err != nil {
		t.Fatal(err)
	}
	ok("learned address expired", c.ping(t))
	apply(u, p)
	ok("after the same Apply", c.ping(t))
	if s := learnedSet(g, u, learnAllow4); s != set {
		t.Errorf("the same Apply replaced %s by %s", set, s)
	}
	if _, r := hold(t, u, h.at(h.pub4)); r.OK {
		t.Error("new connection to an expired learned address reached it")
	}
}

// learnedSet names uid's learned set with suffix.
func learnedSet(g *Guard, uid uint32, suffix string) string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.uids[uid].in.chain + suffix
}

// nftSet lists a set of the table.
func nftSet(t *testing.T, tbl, set string) string {
	t.Helper()
	out, err := exec.Command(mustNft(t), "list", "set", "inet", tbl, set).CombinedOutput()
	if err != nil {
		t.Fatalf("nft list set: %v: %s", err, out)
	}
	return string(out)
}

// TestDetachAndRestart: a worker exiting with its machines running leaves
// them filtered (Detach), and the next worker's New installs their policies
// with the table.
func TestDetachAndRestart(t *testing.T) {
	h := newTestHost(t)
	g1, first := newTestGuard(t, "127.0.0.1:53")
	off, open := first+1, first+2
	if err := g1.Apply(context.Background(), off, Policy{Off: true}); err != nil {
		t.Fatal(err)
	}
	if err := g1.Apply(context.Background(), open, mustPolicy(t, []string{h.priv4.String(), "allowed.test"}, nil)); err != nil {
		t.Fatal(err)
	}
	acts := []action{tcp(h.at(h.pub4)), tcp(h.at(h.priv4))}
	expect(t, "off", acts, probe(t, off, acts...), "rejected", "rejected")
	g1.Detach()
	expect(t, "off, detached", acts, probe(t, off, acts...), "rejected", "rejected")
	expect(t, "open, detached", acts, probe(t, open, acts...), "ok", "ok")
	if err := g1.Apply(context.Background(), first+4, Policy{Off: true}); err == nil {
		t.Error("Apply after Detach succeeded")
	}

	g2, err := New(context.Background(), Config{
		Table: g1.Table(), UIDFirst: first, UIDCount: 100, Upstream: "127.0.0.1:53",
		Policies: map[uint32]Policy{off: {Off: true}, open: mustPolicy(t, []string{h.priv4.String()}, nil), first + 3: {}},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer g2.Close(context.Background())
	expect(t, "off, restarted", acts, probe(t, off, acts...), "rejected", "rejected")
	expect(t, "open, restarted", acts, probe(t, open, acts...), "ok", "ok")
	expect(t, "default, restarted", acts, probe(t, first+3, acts...), "ok", "rejected")
	if err := g2.Remove(context.Background(), off); err != nil {
		t.Fatal(err)
	}
	expect(t, "off removed", acts, probe(t, off, acts...), "ok", "rejected")
	if _, err := New(context.Background(), Config{Table: "firkin_x", UIDFirst: first, UIDCount: 1, Policies: map[uint32]Policy{first + 1: {Off: true}}}); err == nil {
		t.Error("New accepted a policy for a uid outside the range")
	}
}

// TestAvailableNotRoot: without root, Available says why.
func TestAvailableNotRoot(t *testing.T) {
	if err := Available(context.Background()); err != nil {
		t.Fatalf("netguard tests need root and nftables (apt-get install nftables): %v", err)
	}
	res := probe(t, 3999999999, action{Op: "available"})
	if res[0].OK || !strings.Contains(res[0].Err, "not root") {
		t.Errorf("Available as uid 3999999999 = %q, want a not-root error", res[0].Err)
	}
}

// TestNewReplacesStaleTable: a table left by a crashed worker (same name,
// any content) is replaced, and the Guard works.
func TestNewReplacesStaleTable(t *testing.T) {
	name := fmt.Sprintf("firkin_test_%08x", rand.Uint32())
	stale := "table inet " + name + " {\n\tchain orphan {\n\t\ttype filter hook output priority 0; policy accept;\n\t\tmeta skuid 3999999999 drop\n\t}\n}\n"
	if err := runNft(context.Background(), mustNft(t), stale, false); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = runNft(context.Background(), mustNft(t), deleteTableScript(name), false) })
	g, err := New(context.Background(), Config{Table: name, UIDFirst: 3999999000, UIDCount: 10, Upstream: "127.0.0.1:53"})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close(context.Background())
	out, err := exec.Command(mustNft(t), "list", "table", "inet", name).CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if strings.Contains(string(out), "orphan") || !strings.Contains(string(out), "chain guest") {
		t.Errorf("table after New:\n%s", out)
	}
}

func mustPolicy(t *testing.T, allow, deny []string) Policy {
	t.Helper()
	p, err := ParsePolicy(&subjects.EgressPolicy{Allow: allow, Deny: deny})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func mustNft(t *testing.T) string {
	t.Helper()
	nft, err := findNft()
	if err != nil {
		t.Fatal(err)
	}
	return nft
}

// nftTables lists the host's tables.
func nftTables(t *testing.T) string {
	t.Helper()
	out, err := exec.Command(mustNft(t), "list", "tables").CombinedOutput()
	if err != nil {
		t.Fatalf("nft list tables: %v: %s", err, out)
	}
	return string(out)
}

// TestStaleTablesOfTheRangeRemoved: a table another (gone) guard left on an
// overlapping uid range is removed by New, whatever its name; a table on
// another range is left alone.
func TestStaleTablesOfTheRangeRemoved(t *testing.T) {
	ctx := context.Background()
	first := uint32(3500000000 + rand.IntN(100000)*1000)
	newGuard := func(first uint32) *Guard {
		t.Helper()
		g, err := New(ctx, Config{Table: fmt.Sprintf("firkin_test_%08x", rand.Uint32()), UIDFirst: first, UIDCount: 100, Upstream: "127.0.0.1:53"})
		if err != nil {
			t.Fatal(err)
		}
		return g
	}
	gone := newGuard(first)
	gone.Detach() // a killed worker: its table stays
	other := newGuard(first + 500)
	t.Cleanup(func() { _ = other.Close(ctx) })
	t.Cleanup(func() { _ = exec.Command(mustNft(t), "delete", "table", "inet", gone.Table()).Run() })

	taker := newGuard(first + 50) // overlaps gone's range
	t.Cleanup(func() { _ = taker.Close(ctx) })
	tables := nftTables(t)
	if strings.Contains(tables, gone.Table()+"\n") {
		t.Errorf("the stale table %s on an overlapping range is still there:\n%s", gone.Table(), tables)
	}
	for _, keep := range []string{other.Table(), taker.Table()} {
		if !strings.Contains(tables, keep+"\n") {
			t.Errorf("table %s is gone:\n%s", keep, tables)
		}
	}
}
