package worker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/firkin-dev/firkin-worker/backend"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/netguard"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// egressGuard gives sandboxes their network policies with package netguard,
// keyed by the uid each machine's QEMU runs as.
type egressGuard struct{ g *netguard.Guard }

// Apply installs the policy of a sandbox on m.
func (e egressGuard) Apply(ctx context.Context, m vmpool.Machine, network bool, p *subjects.EgressPolicy) error {
	c, ok := m.(vmpool.Confined)
	if !ok {
		return errdefs.Wrap(errdefs.ErrUnsupported, fmt.Errorf("machine %s runs under no uid of its own: no network policy can hold it", m.ID()))
	}
	pol, err := netguard.PolicyFor(network, p)
	if err != nil {
		return err
	}
	return e.g.Apply(ctx, c.UID(), pol)
}

// Remove drops what Apply installed for m.
func (e egressGuard) Remove(ctx context.Context, m vmpool.Machine) error {
	c, ok := m.(vmpool.Confined)
	if !ok {
		return nil
	}
	return e.g.Remove(ctx, c.UID())
}

// uidRanger is a driver whose machines run under uids of one range.
type uidRanger interface {
	UIDRange() (first, count uint32, ok bool)
}

// startGuard starts the network guard over the driver's uid range, in
// quarantine (every uid rejected until its policy is applied) until
// endQuarantine: machines a crashed worker left running get their policies
// back only as recovery reattaches them. It returns nil, and why, when
// guests cannot be filtered on this host; the driver then keeps every guest
// off the network (QEMU restrict=on).
func (w *Worker) startGuard(ctx context.Context, driver vmpool.Driver) (*netguard.Guard, error) {
	r, ok := driver.(uidRanger)
	if !ok {
		return nil, errors.New("the driver runs machines under no uid of their own")
	}
	first, count, ok := r.UIDRange()
	if !ok {
		return nil, errors.New("machines are not confined (the worker is not root, or the host does not allow it)")
	}
	if err := netguard.Available(ctx); err != nil {
		return nil, err
	}
	return netguard.New(ctx, netguard.Config{
		// Named after the uid range, not the worker: a worker that takes
		// over a range (its last owner crashed and its machines are gone)
		// replaces the table the last owner left, whose rules would
		// otherwise still judge the new machines that get those uids.
		Table:    netguard.TableName(fmt.Sprintf("u%d", first)),
		UIDFirst: first,
		UIDCount: count,
		Upstream: w.cfg.DNSUpstream,
		Logger:   w.log.With("component", "netguard"),
		// Until recovery has re-applied the policies of the sandboxes
		// it reattaches (backend.Start), none may be on the default one.
		Quarantine: true,
	})
}

// endQuarantine puts the uids without a policy on the default policy, once
// recovery has re-applied the reattached sandboxes' policies. On failure
// they stay rejected (guests without a policy get no network), which is
// logged as an error.
func (w *Worker) endQuarantine(ctx context.Context) {
	if w.guard == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := w.guard.EndQuarantine(ctx); err != nil {
		w.log.Error("guest network quarantine not ended: sandboxes on the default network policy get no network", "err", err)
	}
}

// startNetwork starts the network guard, or, where guests cannot be
// filtered, makes the driver keep them off the network: never an open
// network that reaches the host.
func (w *Worker) startNetwork(ctx context.Context, driver vmpool.Driver) {
	g, err := w.startGuard(ctx, driver)
	if err == nil {
		w.guard = g
		w.log.Info("guest network filtered", "table", g.Table())
		return
	}
	if r, ok := driver.(interface{ RestrictNetwork() }); ok {
		r.RestrictNetwork()
		w.log.Warn("guest traffic cannot be filtered on this host; guests get no outbound network (QEMU restrict=on)", "why", err)
		return
	}
	w.log.Warn("guest traffic cannot be filtered with this driver; its NAT network is not isolated from the host", "driver", driver.Name(), "why", err)
}

// egress is what the backend applies policies with (nil without a guard).
func (w *Worker) egress() backend.Egress {
	if w.guard == nil {
		return nil
	}
	return egressGuard{w.guard}
}

// closeGuard removes the guard's rules (the machines it filtered are stopped).
func (w *Worker) closeGuard() error {
	if w.guard == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := w.guard.Close(ctx)
	w.guard = nil
	return err
}

// hostPortAllowed says whether egress "host:PORT" may open port: the
// operator listed it (--egress-host-ports) and it is none of the worker's
// own ports.
func (w *Worker) hostPortAllowed(port int) bool {
	if !w.hostPorts.contains(port) {
		return false
	}
	for _, own := range w.ownPorts() {
		if own == port {
			return false
		}
	}
	return true
}

// portSet is a list of port ranges.
type portSet [][2]int

func (s portSet) contains(p int) bool {
	for _, r := range s {
		if p >= r[0] && p <= r[1] {
			return true
		}
	}
	return false
}

// parsePortSet parses "8000,3000-3010" (empty: no port).
func parsePortSet(spec string) (portSet, error) {
	var set portSet
	for _, part := range strings.Split(spec, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		lo, hi, isRange := strings.Cut(part, "-")
		a, err1 := strconv.Atoi(lo)
		b := a
		var err2 error
		if isRange {
			b, err2 = strconv.Atoi(hi)
		}
		if err1 != nil || err2 != nil || a < 1 || b > 65535 || a > b {
			return nil, fmt.Errorf("--egress-host-ports: %q: want a port or a range of ports in 1..65535", part)
		}
		set = append(set, [2]int{a, b})
	}
	return set, nil
}

// ownPorts are the worker's own listening ports on the host (the embedded
// NATS server's, the proxy's and the metrics endpoint's): no egress
// "host:PORT" entry opens them.
func (w *Worker) ownPorts() []int {
	var ports []int
	if w.srv != nil { // nil when the worker joined an external server
		if u, err := url.Parse(w.srv.ClientURL()); err == nil {
			if n, err := strconv.Atoi(u.Port()); err == nil && n > 0 {
				ports = append(ports, n)
			}
		}
	}
	if w.rt.http != nil {
		if t, ok := w.rt.http.Addr().(*net.TCPAddr); ok && t.Port > 0 {
			ports = append(ports, t.Port)
		}
	}
	if w.metricsAddr != "" {
		if _, p, err := net.SplitHostPort(w.metricsAddr); err == nil {
			if n, err := strconv.Atoi(p); err == nil && n > 0 {
				ports = append(ports, n)
			}
		}
	}
	return ports
}
