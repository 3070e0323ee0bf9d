package backend

import (
	"context"
	"errors"
	"fmt"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// Egress applies sandboxes' network policies to their machines (the worker
// wires package netguard here). Until Apply, a machine has the default
// policy: the public internet, nothing on the host or in internal ranges.
type Egress interface {
	// Apply gives machine m the policy of a sandbox: with network false
	// nothing at all, else p (nil means the default), replacing what m had.
	Apply(ctx context.Context, m vmpool.Machine, network bool, p *subjects.EgressPolicy) error
	// Remove drops what Apply installed for m (m is stopped or about to be).
	Remove(ctx context.Context, m vmpool.Machine) error
}

// checkEgress validates a create's network settings against what this
// worker can enforce.
func (b *Backend) checkEgress(network bool, p *subjects.EgressPolicy) error {
	if p == nil || len(p.Allow)+len(p.Deny) == 0 {
		return nil
	}
	if !network {
		return invalid("egress: the sandbox has no network (network:false)")
	}
	if err := p.Validate(); err != nil {
		return err
	}
	for _, raw := range p.Allow {
		if e, err := subjects.ParseEgressEntry(raw); err == nil && e.HostPort != 0 &&
			(b.cfg.HostPortAllowed == nil || !b.cfg.HostPortAllowed(int(e.HostPort))) {
			return invalid("egress: %q: this worker opens no such host port to sandboxes (its operator lists them with --egress-host-ports; the worker's own NATS and proxy ports are never open)", raw)
		}
	}
	if b.cfg.Egress == nil {
		return errdefs.Wrap(errdefs.ErrUnsupported, errors.New("egress: this worker cannot enforce egress policies (it needs root, nftables and confined QEMU processes; see its start-up log)"))
	}
	return nil
}

// applyEgress installs a sandbox's policy on its machine.
func (b *Backend) applyEgress(ctx context.Context, id string, m vmpool.Machine, network bool, p *subjects.EgressPolicy) error {
	if b.cfg.Egress == nil {
		return nil
	}
	if err := b.cfg.Egress.Apply(ctx, m, network, p); err != nil {
		return fmt.Errorf("sandbox %s: apply network policy: %w", id, err)
	}
	return nil
}

// removeEgress drops a machine's policy, logging a failure.
func (b *Backend) removeEgress(ctx context.Context, id string, m vmpool.Machine) {
	if b.cfg.Egress == nil {
		return
	}
	if err := b.cfg.Egress.Remove(ctx, m); err != nil {
		b.log.Warn("remove network policy", "sandbox", id, "err", err)
	}
}
