package worker

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/embedded"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/jetstream"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// NATS authentication modes of the embedded server (Config.NATSAuth).
const (
	// NATSAuthNkey admits three nkey users kept in the state directory: the
	// worker's store connection (WorkerSeedFile), its service connection
	// (ServiceSeedFile) and its clients (ClientSeedFile), each with the
	// least permissions it needs (embedded.Access).
	NATSAuthNkey = "nkey"
	// NATSAuthNone admits anonymous clients with every permission: loopback
	// development only.
	NATSAuthNone = "none"
)

// Seed files of the embedded server's users, in the state directory.
const (
	WorkerSeedFile  = "worker.nk"
	ServiceSeedFile = "service.nk"
	ClientSeedFile  = "client.nk"
)

// ClientNkeyFile is the seed file clients authenticate with against the
// embedded server (<state dir>/client.nk), or "" when the worker joined an
// external server or its embedded server admits anonymous clients.
func (w *Worker) ClientNkeyFile() string { return w.clientSeed }

// ClientOptions are the options a client connects to this worker's embedded
// server with: the client identity (not the worker's own), or none when
// ClientNkeyFile is "".
func (w *Worker) ClientOptions() []nats.Option {
	if w.clientSeed == "" {
		return nil
	}
	return []nats.Option{client.NkeyFile(w.clientSeed)}
}

// startEmbedded starts the embedded server with the configured
// authentication and returns the options of the worker's store and service
// connections.
func (w *Worker) startEmbedded(subj subjects.Subjects) (store, service []nats.Option, err error) {
	cfg := embedded.Config{
		Listen:   w.cfg.NATSListen,
		StoreDir: filepath.Join(w.cfg.StateDir, "nats"),
		Logger:   w.log,
	}
	switch w.cfg.NATSAuth {
	case NATSAuthNone:
		w.log.Warn("embedded NATS admits anonymous clients with every permission (--nats-auth=none): whoever reaches "+
			w.cfg.NATSListen+" controls every sandbox; use this for loopback development only", "nats_listen", w.cfg.NATSListen)
		cfg.Anonymous = true
	default:
		names := [3]string{WorkerSeedFile, ServiceSeedFile, ClientSeedFile}
		var kps [3]nkeys.KeyPair
		var pubs [3]string
		for i, name := range names {
			if kps[i], err = embedded.LoadOrCreateSeed(filepath.Join(w.cfg.StateDir, name)); err != nil {
				return nil, nil, err
			}
			if pubs[i], err = kps[i].PublicKey(); err != nil {
				return nil, nil, err
			}
			if j := slices.Index(pubs[:i], pubs[i]); j >= 0 {
				return nil, nil, errdefs.Wrap(errdefs.ErrInvalidArgument,
					fmt.Errorf("%s and %s hold the same nkey: each needs an identity of its own (remove %s to have a new one made)", names[j], name, name))
			}
		}
		store = append(store, nats.Nkey(pubs[0], kps[0].Sign))
		service = append(service, nats.Nkey(pubs[1], kps[1].Sign))
		kps[2].Wipe()
		access := embedded.Access{Prefix: subj.Prefix, ReadStreams: jetstream.ReadableStreams()}
		cfg.Users = access.Users(pubs[0], pubs[1], pubs[2])
		w.clientSeed = filepath.Join(w.cfg.StateDir, ClientSeedFile)
	}
	srv, err := embedded.Start(cfg)
	if err != nil {
		return nil, nil, err
	}
	w.srv = srv
	return store, service, nil
}

// externalOptions are the options of the worker's store and service
// connections to an external server (validated by validateNATS): each has
// its credentials (the service connection the main ones unless
// NATSServiceCreds or NATSServiceNkey is set), and both the TLS options.
// Without service credentials it logs once that replies are then checked
// by the worker alone.
func (w *Worker) externalOptions() (store, service []nats.Option, err error) {
	c := &w.cfg
	var storePub string
	switch {
	case c.NATSCreds != "":
		store = append(store, nats.UserCredentials(c.NATSCreds))
	case c.NATSNkey != "":
		var opt nats.Option
		if opt, storePub, err = nkeyOption("--nats-nkey", c.NATSNkey); err != nil {
			return nil, nil, err
		}
		store = append(store, opt)
	case c.NATSUser != "":
		store = append(store, nats.UserInfo(c.NATSUser, c.NATSPassword))
	}
	switch {
	case c.NATSServiceCreds != "":
		service = append(service, nats.UserCredentials(c.NATSServiceCreds))
	case c.NATSServiceNkey != "":
		opt, pub, err := nkeyOption("--nats-service-nkey", c.NATSServiceNkey)
		if err != nil {
			return nil, nil, err
		}
		if pub == storePub {
			return nil, nil, errdefs.Wrap(errdefs.ErrInvalidArgument,
				fmt.Errorf("worker: --nats-nkey and --nats-service-nkey hold the same nkey: the service connection needs an identity of its own"))
		}
		service = append(service, opt)
	default:
		service = append(service, store...)
		w.log.Warn("the service connection uses the main NATS credentials: request reply subjects are checked by the worker alone "+
			"and micro's $SRV replies not at all; give it a user that may publish only to _INBOX.> "+
			"(--nats-service-nkey or --nats-service-creds, see deploy/nats/permissions.conf)",
			"nats_url", c.NATSURL)
	}
	var tls []nats.Option
	if c.NATSTLSCA != "" {
		tls = append(tls, nats.RootCAs(c.NATSTLSCA))
	}
	if c.NATSTLSCert != "" {
		tls = append(tls, nats.ClientCert(c.NATSTLSCert, c.NATSTLSKey))
	}
	return append(store, tls...), append(service, tls...), nil
}

// nkeyOption reads the nkey user seed file of flag and returns the option
// authenticating with it and its public key.
func nkeyOption(flag, path string) (nats.Option, string, error) {
	kp, err := embedded.ReadSeed(path)
	if err != nil {
		return nil, "", fmt.Errorf("%s: %w", flag, err)
	}
	pub, err := kp.PublicKey()
	if err != nil {
		return nil, "", fmt.Errorf("%s: %w", flag, err)
	}
	return nats.Nkey(pub, kp.Sign), pub, nil
}

// validateNATS checks the NATS settings and their combinations.
func (c *Config) validateNATS() error {
	invalid := func(format string, a ...any) error {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("worker: "+format, a...))
	}
	var errs []error
	switch c.NATSAuth {
	case "":
		c.NATSAuth = NATSAuthNkey
	case NATSAuthNkey, NATSAuthNone:
	default:
		errs = append(errs, invalid("--nats-auth %q: want %s or %s", c.NATSAuth, NATSAuthNkey, NATSAuthNone))
	}
	type setting struct{ name, value string }
	files := []setting{
		{"--nats-creds", c.NATSCreds}, {"--nats-nkey", c.NATSNkey},
		{"--nats-service-creds", c.NATSServiceCreds}, {"--nats-service-nkey", c.NATSServiceNkey},
		{"--nats-tls-ca", c.NATSTLSCA}, {"--nats-tls-cert", c.NATSTLSCert}, {"--nats-tls-key", c.NATSTLSKey},
	}
	if c.NATSURL == "" {
		for _, s := range append(files, setting{"--nats-user", c.NATSUser}, setting{"a NATS password", c.NATSPassword}) {
			if s.value != "" {
				errs = append(errs, invalid("%s applies to an external server only (--nats-url); the embedded server uses --nats-auth", s.name))
			}
		}
		return errors.Join(errs...)
	}
	if c.NATSAuth == NATSAuthNone {
		errs = append(errs, invalid("--nats-auth=%s configures the embedded server; with --nats-url use --nats-creds, --nats-nkey or --nats-user", NATSAuthNone))
	}
	given := 0
	for _, v := range []string{c.NATSCreds, c.NATSNkey, c.NATSUser} {
		if v != "" {
			given++
		}
	}
	if given > 1 {
		errs = append(errs, invalid("give one of --nats-creds, --nats-nkey and --nats-user"))
	}
	if c.NATSServiceCreds != "" && c.NATSServiceNkey != "" {
		errs = append(errs, invalid("give one of --nats-service-creds and --nats-service-nkey"))
	}
	for _, same := range [][2]setting{
		{{"--nats-creds", c.NATSCreds}, {"--nats-service-creds", c.NATSServiceCreds}},
		{{"--nats-nkey", c.NATSNkey}, {"--nats-service-nkey", c.NATSServiceNkey}},
	} {
		if same[0].value != "" && filepath.Clean(same[0].value) == filepath.Clean(same[1].value) {
			errs = append(errs, invalid("%s and %s name the same file: the service connection needs an identity of its own (or leave %s out)", same[0].name, same[1].name, same[1].name))
		}
	}
	if c.NATSUser != "" && c.NATSPassword == "" {
		errs = append(errs, invalid("--nats-user needs a password: --nats-password-file or FIRKIN_NATS_PASSWORD"))
	}
	if c.NATSPassword != "" && c.NATSUser == "" {
		errs = append(errs, invalid("a NATS password needs --nats-user"))
	}
	if (c.NATSTLSCert == "") != (c.NATSTLSKey == "") {
		errs = append(errs, invalid("--nats-tls-cert and --nats-tls-key go together"))
	}
	for _, f := range files {
		if f.value == "" {
			continue
		}
		if _, err := os.Stat(f.value); err != nil {
			errs = append(errs, invalid("%s: %w", f.name, err))
		}
	}
	return errors.Join(errs...)
}
