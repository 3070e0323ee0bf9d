package worker

import (
	"context"
	"errors"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/e2b/envd"
	"github.com/firkin-dev/firkin-worker/proxy"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// startEnvd opens the E2B sandbox API's NATS connection, as a client (the
// embedded server's client identity, in process; or the worker's main
// credentials on an external server), makes the API and returns the proxy
// option that serves it at port envd.Port of every sandbox.
func (w *Worker) startEnvd() (proxy.Option, error) {
	subj, err := subjects.New(w.cfg.Prefix)
	if err != nil {
		return nil, err
	}
	url, opts := w.cfg.NATSURL, w.envdAuth
	if w.srv != nil {
		url = w.srv.ClientURL()
		opts = append([]nats.Option{nats.InProcessServer(w.srv)}, w.ClientOptions()...)
	}
	nc, err := w.dial(url, "e2b sandbox api", opts)
	if err != nil {
		return nil, err
	}
	srv, err := envd.New(envd.Config{
		Client: client.New(nc).WithPrefix(subj),
		Access: w.envdAccess,
		Logger: w.log,
	})
	if err != nil {
		nc.Close()
		return nil, err
	}
	w.envdNC, w.envd = nc, srv
	return proxy.WithLocalPort(envd.Port, srv), nil
}

// envdAccess is how a sandbox this worker owns admits sandbox API
// requests.
func (w *Worker) envdAccess(ctx context.Context, id string) (envd.Access, error) {
	if w.rt == nil {
		return envd.Access{}, errors.New("no runtime")
	}
	t, err := w.rt.Target(ctx, id)
	if err != nil {
		return envd.Access{}, err
	}
	return envd.Access{Secure: t.Secure, EnvdToken: t.EnvdToken, Public: t.Public, VerifyTraffic: t.VerifyToken}, nil
}

// stopEnvd ends the sandbox API's watchers and closes its connection.
func (w *Worker) stopEnvd() {
	if w.envd != nil {
		w.envd.Close()
		w.envd = nil
	}
	if w.envdNC != nil {
		w.envdNC.Close()
		w.envdNC = nil
	}
}
