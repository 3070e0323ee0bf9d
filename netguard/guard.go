// Package netguard keeps guests off the host and the networks around it.
//
// Each sandbox's QEMU runs as its own unprivileged uid from a per-worker
// range. QEMU's user-mode network (slirp) makes every guest connection an
// ordinary socket of that process in the host's network namespace (the
// guest's 10.0.2.2 is the host's 127.0.0.1, its DNS server 10.0.2.3 is
// forwarded to the host's resolver), so a Guard filters guest egress with
// nftables rules matching the socket's owner (`meta skuid`) on the output
// hook, in one table of its own:
//
//   - By default a uid of the range reaches the public internet and nothing
//     else: the host's own addresses, loopback, link-local, private, CGNAT,
//     ULA, multicast and reserved ranges are rejected (Internal4, Internal6),
//     with a TCP reset or an ICMP admin-prohibited so a connect fails at once.
//   - A Policy (Apply) adds allow and deny entries for one uid: addresses and
//     CIDRs (the most specific entry wins, deny on a tie, before the default
//     blocks), domains (matched on DNS answers: every DNS packet of the range
//     is redirected to a DNS proxy of the Guard, which puts the answered
//     addresses of an allowed domain in the uid's allow set for their TTL, and
//     answers a denied domain NXDOMAIN), and host ports (TCP to loopback).
//     Internal4 and Internal6 open only to an allow entry inside one of
//     their prefixes (a broader one, like 0.0.0.0/0, opens just the public
//     part of its range); an allowed domain opens public addresses only. The
//     host's own addresses stay closed whatever the entries say, except
//     those host ports. Policy{Off: true} rejects everything.
//
// Domain rules are only as good as DNS: a guest resolving over another path
// (DNS over HTTPS, a hard-coded address) is judged by its address alone.
// Every connection carries (as its conntrack mark) the policy that accepted
// it; when a uid's policy changes, its open connections are judged again by
// the new one at their next packet and reset when it denies them, so a warm
// machine's connections do not outlive the default policy when it is
// claimed. The Guard owns the conntrack mark of the range's connections.
// Where the Guard cannot work (Available), run guests with a network that
// cannot reach the host (QEMU restrict=on) instead.
package netguard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// Config configures a Guard.
type Config struct {
	// Table is the name of the Guard's own nftables table (family inet),
	// unique per worker, for example TableName(workerID). A table of that
	// name left by a crashed worker is deleted first.
	Table string
	// UIDFirst and UIDCount are the uid range the guests' QEMU processes
	// run as. UIDFirst is not 0.
	UIDFirst, UIDCount uint32
	// Upstream is the resolver the DNS proxies forward to, "host:port" or an
	// address (port 53); empty means the first nameserver of
	// /etc/resolv.conf (127.0.0.1 without one).
	Upstream string
	// Logger receives warnings; nil means slog.Default().
	Logger *slog.Logger
	// Policies are installed in the same transaction that creates the
	// table: those of sandboxes whose machines outlived a worker restart
	// (see Detach), so they are never without their policy.
	Policies map[uint32]Policy
	// Quarantine makes the new table reject all traffic of every uid of
	// the range without a policy (Policies, Apply), established
	// connections too, until EndQuarantine puts those uids on the default
	// policy. A restarted worker that reattaches its sandboxes one by one
	// (re-applying each one's policy) uses it so that none of them is on
	// the default policy in between.
	Quarantine bool
}

var tableNameRE = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_]{0,63}$`)

// TableName returns the table name for a worker id: "firkin_" and the id
// with every character outside [A-Za-z0-9_] replaced by '_', at most 64
// characters.
func TableName(workerID string) string {
	b := []byte("firkin_" + workerID)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_') {
			b[i] = '_'
		}
	}
	return string(b[:min(len(b), 64)])
}

// Validate checks the configuration.
func (c Config) Validate() error {
	invalid := func(format string, args ...any) error {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("netguard: "+format, args...))
	}
	if !tableNameRE.MatchString(c.Table) {
		return invalid("table name %q: want a letter and up to 63 of [A-Za-z0-9_]", c.Table)
	}
	if c.UIDFirst == 0 || c.UIDCount == 0 || uint64(c.UIDFirst)+uint64(c.UIDCount)-1 >= math.MaxUint32 {
		return invalid("uid range %d+%d: want a non-empty range without 0 and below %d", c.UIDFirst, c.UIDCount, uint32(math.MaxUint32))
	}
	if c.Upstream != "" {
		if _, err := upstreamAddr(c.Upstream); err != nil {
			return invalid("upstream %q: %v", c.Upstream, err)
		}
	}
	for uid, p := range c.Policies {
		if uid < c.UIDFirst || uint64(uid) >= uint64(c.UIDFirst)+uint64(c.UIDCount) {
			return invalid("policy for uid %d outside the range", uid)
		}
		if err := p.validate(); err != nil {
			return err
		}
	}
	return nil
}

// Guard owns one nftables table and the DNS proxies of a uid range.
type Guard struct {
	tbl      table
	nft      string
	upstream string
	log      *slog.Logger
	def      *proxy // the shared DNS proxy of uids without domains

	mu          sync.Mutex // serializes nft runs; guards the fields below
	closed      bool
	quarantined bool // uids without a policy are rejected (Config.Quarantine)
	gen         uint64
	uids        map[uint32]*uidState
}

type uidState struct {
	p     Policy // normalized
	in    installed
	proxy *proxy // nil without domains
}

// New creates the Guard's table (deleting a stale one of the same name)
// with the default rules for the whole uid range (or, with cfg.Quarantine,
// rejecting it) and cfg.Policies, and starts the DNS proxies. Close undoes
// all of it.
func New(ctx context.Context, cfg Config) (*Guard, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	nft, err := findNft()
	if err != nil {
		return nil, err
	}
	upstream := cfg.Upstream
	if upstream == "" {
		upstream = resolvConfUpstream("/etc/resolv.conf")
	}
	upstream, _ = upstreamAddr(upstream)
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	// Generations start at random, so that a connection a previous worker
	// marked (see Detach) hardly ever carries the mark of a new policy.
	g := &Guard{nft: nft, upstream: upstream, log: log, uids: map[uint32]*uidState{}, gen: rand.Uint64N(1 << 32)}
	g.def, err = startProxy(log, upstream, Policy{}, "", nil)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInternalFailure, err)
	}
	g.tbl = table{name: cfg.Table, uidFirst: cfg.UIDFirst, uidLast: cfg.UIDFirst + cfg.UIDCount - 1, defaultDNSPort: g.def.port}
	g.quarantined = cfg.Quarantine
	script := tableScript(g.tbl, cfg.Quarantine)
	fail := func(err error) (*Guard, error) {
		for _, st := range g.uids {
			if st.proxy != nil {
				st.proxy.close()
			}
		}
		g.def.close()
		return nil, err
	}
	for _, uid := range slices.Sorted(maps.Keys(cfg.Policies)) {
		p := cfg.Policies[uid]
		p.normalize()
		if p.IsDefault() {
			continue
		}
		st, s, err := g.prepare(uid, p, nil)
		if err != nil {
			return fail(err)
		}
		g.uids[uid] = st
		script += s
	}
	stale, err := staleTables(ctx, nft, cfg.Table, g.tbl.uidFirst, g.tbl.uidLast)
	if err != nil {
		log.Warn("netguard: cannot list tables to find stale ones", "err", err)
	}
	for _, name := range stale {
		script = deleteTableScript(name) + script
	}
	if err := runNft(ctx, nft, script, false); err != nil {
		return fail(errdefs.Wrap(errdefs.ErrInternalFailure, fmt.Errorf("netguard: create table %s: %w", cfg.Table, err)))
	}
	if len(stale) > 0 {
		log.Info("netguard: removed tables a gone worker left on this uid range", "tables", stale)
	}
	log.Info("netguard: guest egress filtered", "table", cfg.Table, "uids", g.tbl.uidRange(), "dns_upstream", upstream, "policies", len(g.uids), "quarantine", cfg.Quarantine)
	return g, nil
}

// prepare starts uid's DNS proxy when p has domains and returns the state
// and the script that install p as a new generation, replacing old. The
// caller holds g.mu (or owns g alone) and closes st.proxy if the script
// fails.
func (g *Guard) prepare(uid uint32, p Policy, old *installed) (*uidState, string, error) {
	g.gen++
	st := &uidState{p: p}
	if p.hasDomains() {
		px, err := startProxy(g.log, g.upstream, p, chainName(uid, g.gen), g.learn)
		if err != nil {
			return nil, "", errdefs.Wrap(errdefs.ErrInternalFailure, err)
		}
		st.proxy = px
		st.in = plan(uid, g.gen, p, px.port)
	} else {
		st.in = plan(uid, g.gen, p, 0)
	}
	return st, applyScript(g.tbl.name, uid, p, st.in, old), nil
}

// Table returns the name of the Guard's nftables table.
func (g *Guard) Table() string { return g.tbl.name }

// Apply installs p for uid, replacing its previous policy in one
// transaction (a default Policy is Remove; the policy the uid has already
// changes nothing). It starts the uid's DNS proxy when p has domains. The
// uid's open connections are judged by p at their next packet. Invalid policies and uids outside the range are
// errdefs.ErrInvalidArgument.
func (g *Guard) Apply(ctx context.Context, uid uint32, p Policy) error {
	if err := g.checkUID(uid); err != nil {
		return err
	}
	if err := p.validate(); err != nil {
		return err
	}
	p.normalize()
	if p.IsDefault() {
		return g.Remove(ctx, uid)
	}
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return errClosed
	}
	old := g.uids[uid]
	var oldIn *installed
	if old != nil {
		if old.p.equal(p) {
			// Nothing to change: keep the learned addresses and the
			// connections' mark.
			g.mu.Unlock()
			return nil
		}
		oldIn = &old.in
	}
	st, script, err := g.prepare(uid, p, oldIn)
	if err != nil {
		g.mu.Unlock()
		return err
	}
	if err := runNft(ctx, g.nft, script, false); err != nil {
		g.mu.Unlock()
		if st.proxy != nil {
			st.proxy.close()
		}
		return errdefs.Wrap(errdefs.ErrInternalFailure, fmt.Errorf("netguard: apply policy of uid %d: %w", uid, err))
	}
	g.uids[uid] = st
	g.mu.Unlock()
	if old != nil && old.proxy != nil {
		old.proxy.close()
	}
	return nil
}

// Remove puts uid back on the default policy (in quarantine: rejected until
// EndQuarantine) and stops its DNS proxy. A uid without a policy is left as
// it is.
func (g *Guard) Remove(ctx context.Context, uid uint32) error {
	if err := g.checkUID(uid); err != nil {
		return err
	}
	g.mu.Lock()
	old := g.uids[uid]
	if g.closed || old == nil {
		g.mu.Unlock()
		return nil
	}
	if err := runNft(ctx, g.nft, removeScript(g.tbl.name, uid, old.in), false); err != nil {
		g.mu.Unlock()
		return errdefs.Wrap(errdefs.ErrInternalFailure, fmt.Errorf("netguard: remove policy of uid %d: %w", uid, err))
	}
	delete(g.uids, uid)
	g.mu.Unlock()
	if old.proxy != nil {
		old.proxy.close()
	}
	return nil
}

// EndQuarantine ends the quarantine of Config.Quarantine: in one
// transaction, uids without a policy go on the default policy. It does
// nothing when the Guard is not in quarantine (any more); after Close or
// Detach it fails (the table, if left, stays as it is). On an error the
// quarantine goes on.
func (g *Guard) EndQuarantine(ctx context.Context) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return errClosed
	}
	if !g.quarantined {
		return nil
	}
	if err := runNft(ctx, g.nft, endQuarantineScript(g.tbl.name), false); err != nil {
		return errdefs.Wrap(errdefs.ErrInternalFailure, fmt.Errorf("netguard: end quarantine of table %s: %w", g.tbl.name, err))
	}
	g.quarantined = false
	g.log.Info("netguard: quarantine ended; uids without a policy are on the default policy", "table", g.tbl.name)
	return nil
}

// Close deletes the table and stops every DNS proxy. After Close (or
// Detach), Apply and EndQuarantine fail and Remove does nothing; a second
// call returns nil.
func (g *Guard) Close(ctx context.Context) error {
	return g.shut(ctx, true)
}

// Detach stops the DNS proxies but leaves the table in place, for a worker
// that exits while its machines keep running: their traffic stays filtered
// (their DNS fails), a Guard still in quarantine stays so, until the next
// worker's New replaces the table, installing the surviving sandboxes'
// policies with it (Config.Policies) or quarantining the range
// (Config.Quarantine) until they are applied again.
func (g *Guard) Detach() {
	_ = g.shut(context.Background(), false)
}

func (g *Guard) shut(ctx context.Context, deleteTable bool) error {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return nil
	}
	g.closed = true
	var err error
	if deleteTable {
		err = runNft(ctx, g.nft, deleteTableScript(g.tbl.name), false)
	}
	uids := g.uids
	g.uids = nil
	g.mu.Unlock()
	for _, s := range uids {
		if s.proxy != nil {
			s.proxy.close()
		}
	}
	g.def.close()
	if err != nil {
		return errdefs.Wrap(errdefs.ErrInternalFailure, fmt.Errorf("netguard: delete table %s: %w", g.tbl.name, err))
	}
	return nil
}

var errClosed = errdefs.Wrap(errdefs.ErrFailedPrecondition, errors.New("netguard: guard closed"))

func (g *Guard) checkUID(uid uint32) error {
	if uid < g.tbl.uidFirst || uid > g.tbl.uidLast {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("netguard: uid %d outside the range %s", uid, g.tbl.uidRange()))
	}
	return nil
}

// learn adds answered addresses to a learned set (the proxies' learnFunc).
func (g *Guard) learn(ctx context.Context, set string, addrs []netip.Addr, timeout time.Duration) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return errClosed
	}
	return runNft(ctx, g.nft, learnScript(g.tbl.name, set, addrs, timeout), false)
}

// resolvConfUpstream returns the first nameserver of a resolv.conf, or
// 127.0.0.1 (what the C library uses without one).
func resolvConfUpstream(path string) string {
	data, err := os.ReadFile(path)
	if err == nil {
		for line := range strings.Lines(string(data)) {
			f := strings.Fields(line)
			if len(f) >= 2 && f[0] == "nameserver" {
				if a, err := netip.ParseAddr(f[1]); err == nil {
					return net.JoinHostPort(a.String(), "53")
				}
			}
		}
	}
	return "127.0.0.1:53"
}

// upstreamAddr normalizes "addr" or "host:port" to "host:port".
func upstreamAddr(s string) (string, error) {
	if a, err := netip.ParseAddr(s); err == nil {
		return net.JoinHostPort(a.String(), "53"), nil
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil || host == "" || port == "" {
		return "", errors.New(`want "host:port" or an IP address`)
	}
	return s, nil
}
