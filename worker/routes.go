package worker

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/firkin-dev/firkin-worker/backend"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/proxy"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/tokens"
)

// tokenMinter mints the sandboxes' access tokens under the worker secret.
type tokenMinter struct{ secret []byte }

func newTokenMinter(cfg Config) (*tokenMinter, error) {
	secret, err := tokens.LoadSecret(cfg.TokenSecret, filepath.Join(cfg.StateDir, "token-secret"))
	if err != nil {
		return nil, err
	}
	return &tokenMinter{secret: secret}, nil
}

func (t *tokenMinter) EnvdToken(id string) string    { return tokens.EnvdToken(t.secret, id) }
func (t *tokenMinter) TrafficToken(id string) string { return tokens.TrafficToken(t.secret, id) }

// runtimeFacade is the runtime as the handlers see it: the backend plus
// port routes through this worker's proxy.
type runtimeFacade struct {
	*backend.Backend
	http *proxy.Server
	tcp  *proxy.TCPRoutes
}

// Route exposes a guest port: a host name through the HTTP proxy and a raw
// TCP listener. Routes end with the sandbox.
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
	return proxy.Target{Dial: t.Dial, Public: t.Public, TrafficToken: t.TrafficToken}, nil
}

func (w *Worker) startProxy() error {
	resolver := proxy.ResolverFunc(w.rt.resolve)
	srv, err := proxy.NewServer(resolver, proxy.WithDomain(w.cfg.Domain), proxy.WithLogger(w.log.With("component", "proxy")))
	if err != nil {
		return err
	}
	tcp, err := proxy.NewTCPRoutes(resolver, proxy.WithLogger(w.log.With("component", "tcp-routes")))
	if err != nil {
		return err
	}
	if err := srv.Start(context.Background(), w.cfg.ProxyListen); err != nil {
		_ = tcp.Close()
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
}
