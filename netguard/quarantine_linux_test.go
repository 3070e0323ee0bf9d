//go:build linux

package netguard

import (
	"context"
	"errors"
	"os/exec"
	"strings"
	"testing"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// TestQuarantine: a Guard created in quarantine rejects every uid without a
// policy (established connections of the default policy too) while applied
// policies work as usual, Remove drops a uid back into quarantine, and
// EndQuarantine puts the uids without a policy on the default policy.
func TestQuarantine(t *testing.T) {
	h := newTestHost(t)
	ctx := context.Background()
	// The crashed worker's Guard: a connection of a default uid and one
	// of a uid with an allowlist, both open.
	g1, first := newTestGuard(t, "127.0.0.1:53")
	def, listed, removed := first, first+1, first+2
	allowlist := mustPolicy(t, []string{h.pub4.String()}, []string{"0.0.0.0/0", "::/0"})
	if err := g1.Apply(ctx, listed, allowlist); err != nil {
		t.Fatal(err)
	}
	defConn, r := hold(t, def, h.at(h.pub4))
	if !r.OK {
		t.Fatalf("default uid before the crash: %s", r.Err)
	}
	listedConn, r := hold(t, listed, h.at(h.pub4))
	if !r.OK {
		t.Fatalf("allowlisted uid before the crash: %s", r.Err)
	}
	g1.Detach()

	// The restarted worker's Guard, in quarantine.
	g, err := New(ctx, Config{Table: g1.Table(), UIDFirst: first, UIDCount: 100, Upstream: "127.0.0.1:53", Quarantine: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = g.Close(context.Background()) })
	acts := []action{tcp(h.at(h.pub4)), udp(h.at(h.pub4)), tcp(h.at(h.pub6)), tcp(h.at(h.priv4))}
	expect(t, "no policy, quarantined", acts, probe(t, def, acts...), "rejected", "rejected", "rejected", "rejected")
	if r := defConn.ping(t); r.OK {
		t.Error("a default connection of the crashed worker passed the quarantine")
	}
	if err := g.Apply(ctx, listed, allowlist); err != nil {
		t.Fatal(err)
	}
	expect(t, "allowlist, quarantined", acts, probe(t, listed, acts...), "ok", "ok", "rejected", "rejected")
	if r := listedConn.ping(t); !r.OK {
		t.Errorf("an allowed connection of the crashed worker, its policy applied again: %s", r.Err)
	}
	if err := g.Apply(ctx, removed, mustPolicy(t, []string{h.priv4.String()}, nil)); err != nil {
		t.Fatal(err)
	}
	expect(t, "open policy, quarantined", acts, probe(t, removed, acts...), "ok", "ok", "ok", "ok")
	if err := g.Remove(ctx, removed); err != nil {
		t.Fatal(err)
	}
	expect(t, "removed, quarantined", acts, probe(t, removed, acts...), "rejected", "rejected", "rejected", "rejected")

	if err := g.EndQuarantine(ctx); err != nil {
		t.Fatal(err)
	}
	expect(t, "no policy, quarantine ended", acts, probe(t, def, acts...), "ok", "ok", "ok", "rejected")
	expect(t, "removed, quarantine ended", acts, probe(t, removed, acts...), "ok", "ok", "ok", "rejected")
	expect(t, "allowlist, quarantine ended", acts, probe(t, listed, acts...), "ok", "ok", "rejected", "rejected")
	if r := listedConn.ping(t); !r.OK {
		t.Errorf("an allowed connection after the quarantine: %s", r.Err)
	}
	if err := g.EndQuarantine(ctx); err != nil {
		t.Errorf("second EndQuarantine: %v", err)
	}
	if err := g.Remove(ctx, listed); err != nil {
		t.Fatal(err)
	}
	expect(t, "allowlist removed, quarantine ended", acts, probe(t, listed, acts...), "ok", "ok", "ok", "rejected")

	// A quarantined Guard detached stays quarantined; closed, its table goes.
	g3, first3 := newTestGuardConfig(t, Config{Upstream: "127.0.0.1:53", Quarantine: true})
	g3.Detach()
	t.Cleanup(func() { _ = runNft(context.Background(), mustNft(t), deleteTableScript(g3.Table()), false) })
	if err := g3.EndQuarantine(ctx); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("EndQuarantine after Detach = %v, want failed precondition", err)
	}
	expect(t, "detached in quarantine", acts[:1], probe(t, first3, acts[:1]...), "rejected")
	g4, _ := newTestGuardConfig(t, Config{Upstream: "127.0.0.1:53", Quarantine: true})
	if err := g4.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(nftTables(t), "table inet "+g4.Table()+"\n") {
		t.Errorf("table %s left after Close in quarantine", g4.Table())
	}
	if err := g4.EndQuarantine(ctx); err == nil {
		t.Error("EndQuarantine after Close succeeded")
	}
	if out, err := exec.Command(mustNft(t), "list", "chain", "inet", g.Table(), "guest").CombinedOutput(); err != nil || strings.Contains(string(out), "rej") {
		t.Errorf("chain guest after EndQuarantine (%v):\n%s", err, out)
	}
}
