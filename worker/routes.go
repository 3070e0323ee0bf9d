package worker

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/firkin-dev/firkin-worker/backend"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/metrics"
	"github.com/firkin-dev/firkin-worker/proxy"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/tokens"
)

// newTokenMinter mints and checks the sandboxes' traffic tokens under the
// worker secret, which it also returns (snapshot records are authenticated
// under a key derived from it).
func newTokenMinter(cfg Config) (*tokens.Minter, []byte, error) {
	secret, err := tokens.LoadSecret(cfg.TokenSecret, filepath.Join(cfg.StateDir, "token-secret"))
	if err != nil {
		return nil, nil, err
	}
	m, err := tokens.NewMinter(secret)
	return m, secret, err
}

var _ backend.Tokens = (*tokens.Minter)(nil)

// runtimeFacade is the runtime as the handlers see it: the backend plus
// port routes through this worker's proxy.
type runtimeFacade struct {
	*backend.Backend
	http    *proxy.Server
	tcp     *proxy.TCPRoutes
	metrics *metrics.Metrics
}

// Create makes a sandbox and measures it by the source of its machine.
func (r *runtimeFacade) Create(ctx context.Context, req subjects.CreateSandboxRequest) (subjects.Sandbox, error) {
	start := time.Now()
	sb, err := r.Backend.Create(ctx, req)
	if err == nil {
		r.metrics.ObserveCreate(sb.Source, time.Since(start))
	}
	return sb, err
}

// Snapshot saves a sandbox and measures the save.
func (r *runtimeFacade) Snapshot(ctx context.Context, id string, req subjects.SnapshotRequest) (subjects.SnapshotRecord, error) {
	start := time.Now()
	rec, err := r.Backend.Snapshot(ctx, id, req)
	if err == nil {
		r.metrics.ObserveSave(rec.Kind, time.Since(start), rec.SizeBytes)
	}
	return rec, err
}

// Route exposes a guest port: a host name through the HTTP proxy and, for a
// public sandbox only, a raw TCP listener. Routes end with the sandbox.
func (r *runtimeFacade) Route(ctx context.Context, id string, req subjects.RouteRequest) (subjects.RouteReply, error) {
	rt := proxy.Route{SandboxID: id, Port: req.Port}
	if err := rt.Validate(); err != nil {
		return subjects.RouteReply{}, err
	}
	if !r.Owns(id) {
		return subjects.RouteReply{}, errdefs.Wrap(errdefs.ErrNotFound, fmt.Errorf("sandbox %s not found", id))
	}
	tcp, err := r.tcp.Open(ctx, id, req.Port)
	if err != nil {
		return subjects.RouteReply{}, fmt.Errorf("open TCP route: %w", err)
	}
	return r.http.RouteReply(rt, tcp), nil
}

// Fork forks a sandbox and opens the source's port routes on each fork:
// the forks answer on the same ports, each through the proxy with its own
// token (and, when public, on raw TCP listeners of its own). A route that
// cannot be opened on a fork fails the fork request, with the forks
// killed.
func (r *runtimeFacade) Fork(ctx context.Context, id string, req subjects.ForkRequest) (subjects.ForkReply, error) {
	if r.tcp == nil || r.http == nil {
		return r.Backend.Fork(ctx, id, req)
	}
	ports := r.tcp.Ports(id)
	out, err := r.Backend.Fork(ctx, id, req)
	if err != nil || len(ports) == 0 {
		return out, err
	}
	out.Routes = make(map[string][]subjects.RouteReply, len(out.Sandboxes))
	for _, sb := range out.Sandboxes {
		for _, port := range ports {
			rt, rerr := r.Route(ctx, sb.SandboxID, subjects.RouteRequest{Port: port})
			if rerr != nil {
				err = fmt.Errorf("fork of %s: route port %d on fork %s: %w", id, port, sb.SandboxID, rerr)
				break
			}
			out.Routes[sb.SandboxID] = append(out.Routes[sb.SandboxID], rt)
		}
		if err != nil {
			break
		}
	}
	if err != nil {
		for _, sb := range out.Sandboxes {
			if _, kerr := r.Kill(context.WithoutCancel(ctx), sb.SandboxID); kerr != nil {
				err = errors.Join(err, fmt.Errorf("kill fork %s: %w", sb.SandboxID, kerr))
			}
		}
		return subjects.ForkReply{}, err
	}
	return out, nil
}

func (r *runtimeFacade) proxyAddr() string {
	if r.http == nil || r.http.Addr() == nil {
		return ""
	}
	return r.http.Addr().String()
}

// closeRoutes ends a sandbox's routes (it ended).
func (r *runtimeFacade) closeRoutes(id string) {
	if r.http != nil {
		r.http.CloseSandbox(id)
	}
	if r.tcp != nil {
		r.tcp.CloseSandbox(id)
	}
}

// resolve finds a sandbox's route target for the proxy.
func (r *runtimeFacade) resolve(ctx context.Context, id string) (proxy.Target, error) {
	t, err := r.Target(ctx, id)
	if err != nil {
		return proxy.Target{}, err
	}
	return proxy.Target{Dial: t.Dial, Public: t.Public, VerifyToken: t.VerifyToken}, nil
}

// RouteLimits cap port routing per sandbox; a zero field takes the proxy's
// default.
type RouteLimits struct {
	// MaxRoutesPerSandbox caps routed ports (16); one more is refused with
	// capacity_rejected.
	MaxRoutesPerSandbox int
	// MaxConnsPerSandbox caps connections at once through the HTTP proxy
	// (64; one more is answered 429) and as many on the raw TCP routes (one
	// more is closed).
	MaxConnsPerSandbox int
	// IdleTimeout closes a tunnel, raw TCP connection or guest stream with
	// no traffic either way for this long (10 min).
	IdleTimeout time.Duration
}

// proxyOptions are the port routing address and caps of cfg.
func proxyOptions(cfg Config) []proxy.Option {
	var opts []proxy.Option
	if cfg.RouteTCPHost != "" {
		opts = append(opts, proxy.WithTCPHost(cfg.RouteTCPHost))
	}
	if l := cfg.RouteLimits; l.MaxRoutesPerSandbox != 0 {
		opts = append(opts, proxy.WithMaxRoutesPerSandbox(l.MaxRoutesPerSandbox))
	}
	if l := cfg.RouteLimits; l.MaxConnsPerSandbox != 0 {
		opts = append(opts, proxy.WithMaxConnsPerSandbox(l.MaxConnsPerSandbox))
	}
	if l := cfg.RouteLimits; l.IdleTimeout != 0 {
		opts = append(opts, proxy.WithStreamIdleTimeout(l.IdleTimeout))
	}
	return opts
}

func (w *Worker) startProxy() error {
	resolver := proxy.ResolverFunc(w.rt.resolve)
	common := proxyOptions(w.cfg)
	envdOpt, err := w.startEnvd()
	if err != nil {
		return fmt.Errorf("e2b sandbox api: %w", err)
	}
	srv, err := proxy.NewServer(resolver, append([]proxy.Option{proxy.WithDomain(w.cfg.Domain), proxy.WithLogger(w.log.With("component", "proxy")), envdOpt}, common...)...)
	if err != nil {
		w.stopEnvd()
		return err
	}
	tcp, err := proxy.NewTCPRoutes(resolver, append([]proxy.Option{proxy.WithLogger(w.log.With("component", "tcp-routes"))}, common...)...)
	if err != nil {
		w.stopEnvd()
		return err
	}
	if err := srv.Start(context.Background(), w.cfg.ProxyListen); err != nil {
		_ = tcp.Close()
		w.stopEnvd()
		return err
	}
	w.rt.http, w.rt.tcp = srv, tcp
	return nil
}

func (w *Worker) stopProxy() {
	if w.rt == nil {
		return
	}
	if w.rt.http != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5e9)
		defer cancel()
		_ = w.rt.http.Shutdown(ctx)
	}
	if w.rt.tcp != nil {
		_ = w.rt.tcp.Close()
	}
	w.stopEnvd()
}
