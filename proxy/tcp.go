package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// TCPRoutes keeps the routes of each sandbox, at most
// WithMaxRoutesPerSandbox of them, and for a public sandbox a raw TCP host
// listener per route whose connections are piped to the guest port,
// whatever the protocol (ssh, postgres, redis). A raw listener carries no
// token check, so a private sandbox never gets one: its routes are reached
// through the Server (HTTP, or CONNECT for any protocol) with the token.
// Listeners bind to loopback unless WithTCPHost says otherwise; each
// sandbox has at most WithMaxConnsPerSandbox raw connections open, and one
// idle for the stream idle timeout is closed.
type TCPRoutes struct {
	resolver Resolver
	opts     options
	log      *slog.Logger
	ctx      context.Context // ends at Close; bounds dials
	cancel   context.CancelFunc
	conns    connSet      // client and guest conns, by sandbox
	accepted sandboxLimit // accepted client conns open, by sandbox (freed on close)
	wg       sync.WaitGroup

	mu     sync.Mutex
	closed bool
	closes uint64 // CloseSandbox calls so far; Open checks none ran while it resolved
	routes map[Route]*tcpRoute
}

// openTries bounds how often Open resolves a sandbox again because
// CloseSandbox ran while it resolved.
const openTries = 3

// tcpRoute is one open route; ln is nil for a private sandbox's route.
type tcpRoute struct {
	route Route
	ln    net.Listener
}

// addr is the listener's address, empty without a listener.
func (r *tcpRoute) addr() string {
	if r.ln == nil {
		return ""
	}
	return r.ln.Addr().String()
}

// NewTCPRoutes makes an empty set of raw routes that finds sandboxes through
// r. It takes WithTCPHost, WithDialTimeout, WithMaxRoutesPerSandbox,
// WithMaxConnsPerSandbox, WithStreamIdleTimeout and WithLogger.
func NewTCPRoutes(r Resolver, opts ...Option) (*TCPRoutes, error) {
	if r == nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, errors.New("proxy: tcp routes: nil resolver"))
	}
	o, err := buildOptions("tcp routes", opts)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	t := &TCPRoutes{
		resolver: r,
		opts:     o,
		log:      o.log.With("component", "proxy-tcp"),
		ctx:      ctx,
		cancel:   cancel,
		routes:   make(map[Route]*tcpRoute),
	}
	t.conns.idle = o.streamIdleTimeout
	t.accepted.max = o.maxConnsPerSandbox
	return t, nil
}

// Open opens a route to a guest port. For a public sandbox it exposes the
// port on a host listener and returns its address (host:port); for a
// private one it records the route and returns "" (no listener: the
// sandbox is reached through the proxy with its token). It is idempotent: a
// route already open returns its address. The sandbox must resolve
// (errdefs.ErrNotFound otherwise); ctx bounds that check. A sandbox with
// the most routes already gets an errdefs.ErrCapacity error.
//
// When a CloseSandbox runs while Open resolves, the answer may be of a
// sandbox that has ended, so Open resolves again (the id may name a new
// sandbox by then); after openTries such races it fails with
// errdefs.ErrConflict.
func (t *TCPRoutes) Open(ctx context.Context, sandboxID string, port int) (string, error) {
	rt := Route{SandboxID: sandboxID, Port: port}
	if err := rt.Validate(); err != nil {
		return "", err
	}
	for range openTries {
		if addr, ok := t.Addr(sandboxID, port); ok {
			return addr, nil
		}
		t.mu.Lock()
		closes := t.closes
		t.mu.Unlock()
		target, err := t.resolver.Resolve(ctx, sandboxID)
		if err != nil {
			return "", fmt.Errorf("proxy: open tcp route %s: %w", rt, err)
		}
		addr, ok, err := t.open(ctx, rt, target, closes)
		if ok || err != nil {
			return addr, err
		}
	}
	return "", errdefs.Wrap(errdefs.ErrConflict,
		fmt.Errorf("proxy: open tcp route %s: sandboxes kept closing while it was opened; try again", rt))
}

// open adds the route for a sandbox resolved to target, unless a
// CloseSandbox ran since t.closes was closes: then ok is false.
func (t *TCPRoutes) open(ctx context.Context, rt Route, target Target, closes uint64) (addr string, ok bool, err error) {
	sandboxID, port := rt.SandboxID, rt.Port
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return "", true, errdefs.Wrap(errdefs.ErrFailedPrecondition, fmt.Errorf("proxy: open tcp route %s: closed", rt))
	}
	if t.closes != closes {
		return "", false, nil // the resolved sandbox may have ended
	}
	if r := t.routes[rt]; r != nil {
		return r.addr(), true, nil
	}
	if n := t.countRoutes(sandboxID); n >= t.opts.maxRoutesPerSandbox {
		return "", true, errdefs.Wrap(errdefs.ErrCapacity,
			fmt.Errorf("proxy: open route %s: sandbox %s has %d routes open, the most allowed", rt, sandboxID, n))
	}
	if !target.Public {
		t.routes[rt] = &tcpRoute{route: rt}
		t.log.Debug("route open without a tcp listener (private sandbox)", "sandbox", sandboxID, "port", port)
		return "", true, nil
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", net.JoinHostPort(t.opts.tcpHost, "0"))
	if err != nil {
		return "", true, errdefs.Wrap(errdefs.ErrInternalFailure, fmt.Errorf("proxy: open tcp route %s: %w", rt, err))
	}
	r := &tcpRoute{route: rt, ln: ln}
	t.routes[rt] = r
	t.wg.Add(1)
	go t.accept(r)
	t.log.Debug("tcp route open", "sandbox", sandboxID, "port", port, "addr", ln.Addr().String())
	return ln.Addr().String(), true, nil
}

// countRoutes returns how many routes sandbox id has open; t.mu is held.
func (t *TCPRoutes) countRoutes(id string) int {
	n := 0
	for rt := range t.routes {
		if rt.SandboxID == id {
			n++
		}
	}
	return n
}

// Addr returns the listener address of an open route: ok is false when the
// route is not open, and the address empty when the route has no listener
// (a private sandbox).
func (t *TCPRoutes) Addr(sandboxID string, port int) (string, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	r := t.routes[Route{SandboxID: sandboxID, Port: port}]
	if r == nil {
		return "", false
	}
	return r.addr(), true
}

// Ports returns the guest ports of a sandbox's open routes, in order.
func (t *TCPRoutes) Ports(sandboxID string) []int {
	t.mu.Lock()
	var ports []int
	for rt := range t.routes {
		if rt.SandboxID == sandboxID {
			ports = append(ports, rt.Port)
		}
	}
	t.mu.Unlock()
	slices.Sort(ports)
	return ports
}

// CloseSandbox closes a sandbox's listeners and its live connections. Call
// it when the sandbox goes away: routes end with their sandbox.
func (t *TCPRoutes) CloseSandbox(sandboxID string) {
	t.mu.Lock()
	t.closes++
	var lns []net.Listener
	for rt, r := range t.routes {
		if rt.SandboxID == sandboxID {
			if r.ln != nil {
				lns = append(lns, r.ln)
			}
			delete(t.routes, rt)
		}
	}
	t.mu.Unlock()
	for _, ln := range lns {
		_ = ln.Close()
	}
	t.conns.closeSandbox(sandboxID)
}

// Close closes every route and connection and waits for their goroutines.
func (t *TCPRoutes) Close() error {
	t.mu.Lock()
	t.closed = true
	routes := t.routes
	t.routes = make(map[Route]*tcpRoute)
	t.mu.Unlock()
	t.cancel()
	for _, r := range routes {
		if r.ln != nil {
			_ = r.ln.Close()
		}
	}
	t.conns.closeAll()
	t.wg.Wait()
	return nil
}

// accept serves a route's listener until it is closed.
func (t *TCPRoutes) accept(r *tcpRoute) {
	defer t.wg.Done()
	for {
		c, err := r.ln.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				t.log.Warn("tcp route accept failed; route closed", "route", r.route.String(), "err", err)
				t.drop(r)
			}
			return
		}
		if !t.accepted.acquire(r.route.SandboxID) {
			t.log.Debug("tcp route: sandbox has the most connections open; closing the new one",
				"route", r.route.String(), "max", t.opts.maxConnsPerSandbox)
			_ = c.Close()
			continue
		}
		id := r.route.SandboxID
		tc, err := t.conns.track(id, c, func() { t.accepted.release(id) })
		if err != nil {
			return // closed
		}
		t.wg.Add(1)
		go t.serveConn(r, tc)
	}
}

// isOpen reports whether r is still an open route.
func (t *TCPRoutes) isOpen(r *tcpRoute) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.routes[r.route] == r
}

// drop removes a failed route.
func (t *TCPRoutes) drop(r *tcpRoute) {
	t.mu.Lock()
	if t.routes[r.route] == r {
		delete(t.routes, r.route)
	}
	t.mu.Unlock()
	_ = r.ln.Close()
}

// serveConn pipes one accepted client conn to the guest port. The sandbox
// is resolved afresh for each conn; when it is gone, the route closes.
func (t *TCPRoutes) serveConn(r *tcpRoute, client net.Conn) {
	defer t.wg.Done()
	rt := r.route
	ctx, cancel := context.WithTimeout(t.ctx, t.opts.dialTimeout)
	target, err := t.resolver.Resolve(ctx, rt.SandboxID)
	switch {
	case err != nil:
	case !target.Public:
		// Never reached through Open; a raw conn carries no token.
		err = errdefs.Wrap(errdefs.ErrFailedPrecondition, errors.New("sandbox is private: no raw TCP route"))
	case target.Dial == nil:
		err = errdefs.Wrap(errdefs.ErrInternalFailure, errors.New("resolver returned no Dial"))
	}
	var guest net.Conn
	if err == nil {
		guest, err = target.Dial(ctx, rt.Port)
	}
	cancel()
	if err != nil {
		_ = client.Close()
		if errors.Is(err, errdefs.ErrNotFound) {
			t.log.Debug("tcp route's sandbox is gone; closing its routes", "route", rt.String())
			t.CloseSandbox(rt.SandboxID)
			return
		}
		t.log.Debug("tcp route: dial guest failed", "route", rt.String(), "err", err)
		return
	}
	gc, err := t.conns.track(rt.SandboxID, guest, nil)
	if err != nil {
		_ = client.Close()
		return
	}
	if !t.isOpen(r) {
		// CloseSandbox ran while this conn was dialling.
		_ = client.Close()
		_ = gc.Close()
		return
	}
	pipe(client, gc)
}
