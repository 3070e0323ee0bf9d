package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/client"
	e2bapi "github.com/firkin-dev/firkin-worker/e2b/api"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/worker"
)

// startE2B serves E2B's control API on --e2b-listen as a client of the
// worker's NATS API: its own connection, with the client identity of the
// embedded server (or the worker's credentials on an external one). It
// returns a stop function, nil when the API is off.
func startE2B(o options, w *worker.Worker, log *slog.Logger) (func(context.Context), error) {
	if o.e2bListen == "" {
		return nil, nil
	}
	log = log.With("component", "e2b")
	keys, err := e2bapi.LoadKeys(o.e2bKeysFile, os.Getenv(e2bapi.KeysEnv), o.stateDir, log)
	if err != nil {
		return nil, err
	}
	templates, err := e2bapi.ParseTemplates(o.e2bTemplates)
	if err != nil {
		return nil, err
	}
	domain := o.e2bDomain
	if domain == "" {
		if _, port, err := net.SplitHostPort(w.ProxyAddr()); err == nil {
			domain = net.JoinHostPort(o.domain, port)
		}
	}
	natsOpts := append(o.e2bNATSOptions(w), nats.Name("firkin-e2b-api"), nats.MaxReconnects(-1))
	nc, err := nats.Connect(w.NATSURL(), natsOpts...)
	if err != nil {
		return nil, fmt.Errorf("e2b api: connect to NATS: %w", err)
	}
	subj, err := subjects.New(o.prefix)
	if err != nil {
		nc.Close()
		return nil, err
	}
	srv, err := e2bapi.New(e2bapi.Config{
		API:       client.New(nc).WithPrefix(subj),
		Keys:      keys,
		Templates: templates,
		Domain:    domain,
		Logger:    log,
	})
	if err == nil {
		err = srv.Start(o.e2bListen)
	}
	if err != nil {
		nc.Close()
		return nil, err
	}
	log.Info("E2B API ready", "listen", srv.Addr().String(), "domain", domain,
		"hint", "E2B_API_URL=http://"+srv.Addr().String()+" E2B_SANDBOX_URL=http://"+w.ProxyAddr())
	return func(ctx context.Context) {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if err := srv.Stop(ctx); err != nil {
			log.Warn("E2B API stop", "err", err)
		}
		nc.Close()
	}, nil
}

// e2bNATSOptions are the options of the E2B API's NATS connection: the
// client identity of the embedded server, or the worker's credentials and
// TLS on an external server.
func (o options) e2bNATSOptions(w *worker.Worker) []nats.Option {
	if o.natsURL == "" {
		return w.ClientOptions()
	}
	var opts []nats.Option
	switch {
	case o.natsCreds != "":
		opts = append(opts, nats.UserCredentials(o.natsCreds))
	case o.natsNkey != "":
		opts = append(opts, client.NkeyFile(o.natsNkey))
	case o.natsUser != "":
		opts = append(opts, nats.UserInfo(o.natsUser, o.natsPassword))
	}
	if o.natsTLSCA != "" {
		opts = append(opts, nats.RootCAs(o.natsTLSCA))
	}
	if o.natsTLSCert != "" {
		opts = append(opts, nats.ClientCert(o.natsTLSCert, o.natsTLSKey))
	}
	return opts
}
