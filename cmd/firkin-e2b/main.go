// Command firkin-e2b serves E2B's REST control API as a separate process,
// a client of the firkin-worker NATS API of a worker or a cluster:
//
//	firkin-e2b --nats-url nats://127.0.0.1:4222 --nats-nkey /var/lib/firkin/client.nk \
//	    --listen 127.0.0.1:3000 --domain localhost:8080
//
// API keys come from --api-keys-file or FIRKIN_E2B_API_KEYS, else one is
// made and kept in <state-dir>/e2b-api-key.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/client"
	e2bapi "github.com/firkin-dev/firkin-worker/e2b/api"
	"github.com/firkin-dev/firkin-worker/subjects"
)

func main() {
	if err := run(os.Args[1:]); err != nil && !errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(os.Stderr, "firkin-e2b:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("firkin-e2b", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:3000", "address of E2B's REST control API")
	natsURL := fs.String("nats-url", "nats://127.0.0.1:4222", "NATS server or cluster of the workers")
	nkey := fs.String("nats-nkey", "", "nkey user seed file of a client identity (e.g. <worker state dir>/client.nk)")
	creds := fs.String("nats-creds", "", "credentials file of a client user")
	user := fs.String("nats-user", "", "a client user (e.g. product of deploy/nats/accounts.conf); its password comes from FIRKIN_NATS_PASSWORD")
	tlsCA := fs.String("nats-tls-ca", "", "CA bundle to verify the NATS server with")
	prefix := fs.String("prefix", "firkin", "subject prefix")
	keysFile := fs.String("api-keys-file", "", "file of accepted API keys, one a line (else FIRKIN_E2B_API_KEYS, else one made in --state-dir)")
	stateDir := fs.String("state-dir", ".", "where a made API key is kept (e2b-api-key)")
	templates := fs.String("templates", "base=tiny", "E2B template ids mapped to firkin templates")
	domain := fs.String("domain", "", "sandbox domain told to the SDK: the workers' proxy host and port, e.g. localhost:8080")
	if err := fs.Parse(args); err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	keys, err := e2bapi.LoadKeys(*keysFile, os.Getenv(e2bapi.KeysEnv), *stateDir, log)
	if err != nil {
		return err
	}
	tmpl, err := e2bapi.ParseTemplates(*templates)
	if err != nil {
		return err
	}
	subj, err := subjects.New(*prefix)
	if err != nil {
		return err
	}
	opts := []nats.Option{nats.Name("firkin-e2b"), nats.MaxReconnects(-1)}
	if *nkey != "" {
		opts = append(opts, client.NkeyFile(*nkey))
	}
	if *creds != "" {
		opts = append(opts, nats.UserCredentials(*creds))
	}
	if *user != "" {
		opts = append(opts, nats.UserInfo(*user, os.Getenv("FIRKIN_NATS_PASSWORD")))
	}
	if *tlsCA != "" {
		opts = append(opts, nats.RootCAs(*tlsCA))
	}
	nc, err := nats.Connect(*natsURL, opts...)
	if err != nil {
		return fmt.Errorf("connect to NATS: %w", err)
	}
	defer nc.Close()
	srv, err := e2bapi.New(e2bapi.Config{API: client.New(nc).WithPrefix(subj), Keys: keys, Templates: tmpl, Domain: *domain, Logger: log})
	if err != nil {
		return err
	}
	if err := srv.Start(*listen); err != nil {
		return err
	}
	log.Info("E2B API ready", "listen", srv.Addr().String(), "nats", logURL(nc))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return srv.Stop(sctx)
}

// logURL is the NATS server's URL as logged: without a password the
// --nats-url may carry (nats://user:password@host).
func logURL(nc *nats.Conn) string { return nc.ConnectedUrlRedacted() }
