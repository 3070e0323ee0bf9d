package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/firkin-dev/firkin-worker/backend"
	e2bapi "github.com/firkin-dev/firkin-worker/e2b/api"
	"github.com/firkin-dev/firkin-worker/worker"
)

// options are the command line's settings.
type options struct {
	stateDir, natsURL, natsListen, prefix, driver, accel, kernel, agent string
	pool, proxyListen, domain, logFormat, logLevel, tokenSecret         string
	dnsUpstream, egressHostPorts, clientInboxes                         string
	maxSessions, maxVCPUs, maxMemoryMB                                  int
	minFreeDiskMB                                                       int
	logRateKiB, logTotalMiB                                             int64
	keepMachines                                                        bool
	logMaxAge                                                           time.Duration
	fillTimeout                                                         time.Duration

	// NATS authentication: the embedded server's mode, or credentials and
	// TLS for an external one. natsPassword comes from --nats-password-file
	// or FIRKIN_NATS_PASSWORD, never from a flag.
	natsAuth, natsCreds, natsNkey, natsUser, natsPasswordFile string
	natsTLSCA, natsTLSCert, natsTLSKey, natsPassword          string
	natsServiceCreds, natsServiceNkey                         string
	routeTCPHost                                              string
	maxRoutesPerSandbox, maxProxyConnsPerSandbox              int
	proxyIdleTimeout                                          time.Duration
	jobQueues                                                 string
	jobConcurrency                                            int
	tokenSecretFile                                           string
	replicas                                                  int
	metricsListen                                             string
	heartbeatInterval, drainTimeout                           time.Duration

	// E2B's control API (e2b.go): off unless e2bListen is set.
	e2bListen, e2bKeysFile, e2bTemplates, e2bDomain string
}

func defaultStateDir() string {
	if os.Geteuid() == 0 {
		return "/var/lib/firkin"
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".firkin")
	}
	return ".firkin"
}

// parseOptions reads flags, then fills every flag not given from
// FIRKIN_<NAME>, then from the --config file.
func parseOptions(args []string, getenv func(string) string, readFile func(string) ([]byte, error)) (options, error) {
	var o options
	var configPath string
	fs := flag.NewFlagSet("firkin-worker", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&configPath, "config", "", "JSON file of settings: {\"flag-name\": \"value\", ...}")
	fs.StringVar(&o.stateDir, "state-dir", defaultStateDir(), "images, snapshots, overlays and the embedded server's JetStream store")
	fs.StringVar(&o.natsURL, "nats-url", "", "connect to this NATS server or cluster instead of embedding one")
	fs.StringVar(&o.natsListen, "nats-listen", "127.0.0.1:4222", "the embedded server's client address")
	fs.StringVar(&o.natsAuth, "nats-auth", worker.NATSAuthNkey, "the embedded server's authentication: nkey (the worker's and the clients' identities, <state-dir>/worker.nk, service.nk and client.nk) or none (anonymous clients with every permission: loopback development only)")
	fs.StringVar(&o.natsCreds, "nats-creds", "", "external server: credentials file (JWT and nkey seed)")
	fs.StringVar(&o.natsNkey, "nats-nkey", "", "external server: nkey user seed file (mode 0600)")
	fs.StringVar(&o.natsServiceCreds, "nats-service-creds", "", "external server: credentials file of the service connection, a user that may publish only replies to _INBOX.> (default: the main credentials)")
	fs.StringVar(&o.natsServiceNkey, "nats-service-nkey", "", "external server: nkey user seed file (mode 0600) of the service connection, a user that may publish only replies to _INBOX.> (default: the main credentials)")
	fs.StringVar(&o.natsUser, "nats-user", "", "external server: user name; the password comes from --nats-password-file or FIRKIN_NATS_PASSWORD")
	fs.StringVar(&o.natsPasswordFile, "nats-password-file", "", "external server: file holding the password of --nats-user")
	fs.StringVar(&o.natsTLSCA, "nats-tls-ca", "", "external server: CA bundle to verify it with")
	fs.StringVar(&o.natsTLSCert, "nats-tls-cert", "", "external server: client certificate (with --nats-tls-key)")
	fs.StringVar(&o.natsTLSKey, "nats-tls-key", "", "external server: client certificate's key (with --nats-tls-cert)")
	fs.StringVar(&o.prefix, "prefix", "firkin", "subject prefix")
	fs.StringVar(&o.driver, "driver", "auto", "machine driver: auto, qemu or vz")
	fs.StringVar(&o.accel, "accel", "auto", "qemu accelerator: auto (KVM when a probe proves it works), kvm or tcg")
	fs.StringVar(&o.kernel, "kernel", "", "guest kernel to use instead of the one the image builder extracts")
	fs.StringVar(&o.agent, "agent", "", "guest agent binary (default: firkin-agent-linux-<arch> beside this binary)")
	fs.StringVar(&o.pool, "pool", "tiny=1", "warm pool targets, e.g. tiny=2,py=1")
	fs.StringVar(&o.proxyListen, "proxy-listen", "127.0.0.1:8080", "the port-routing proxy's address")
	fs.StringVar(&o.domain, "domain", "localhost", "domain of routed hosts: <port>-<sandbox>.<domain>")
	fs.StringVar(&o.clientInboxes, "client-inbox-prefixes", "_INBOX.", "reply subject prefixes clients' requests may use (comma-separated); requests asking for replies elsewhere are not answered")
	fs.StringVar(&o.egressHostPorts, "egress-host-ports", "", "host ports a sandbox's egress may open with \"host:PORT\" (development set-ups), e.g. 8000,3000-3010; empty: none")
	fs.StringVar(&o.dnsUpstream, "dns-upstream", "", "resolver the guests' DNS is forwarded to, host:port (default: the first nameserver of /etc/resolv.conf)")
	fs.StringVar(&o.logFormat, "log-format", "auto", "text (tint, default on a terminal) or json")
	fs.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&o.tokenSecret, "token-secret", "", "secret for access tokens and snapshot records (default: made and kept in the state dir); prefer --token-secret-file or FIRKIN_TOKEN_SECRET, command lines are visible to every user")
	fs.StringVar(&o.tokenSecretFile, "token-secret-file", "", "file holding the worker secret (workers of one cluster share it: it signs snapshot records and access tokens)")
	fs.StringVar(&o.metricsListen, "metrics-listen", "", "serve Prometheus metrics at http://<addr>/metrics (off when empty), e.g. 127.0.0.1:9090")
	fs.IntVar(&o.replicas, "replicas", 0, "replicas of the streams, KV buckets and object store (0: 3 on a NATS cluster of three or more servers, else 1)")
	fs.StringVar(&o.routeTCPHost, "route-tcp-host", "127.0.0.1", "address the raw TCP route listeners of public sandboxes bind to (they carry no token check)")
	fs.IntVar(&o.maxRoutesPerSandbox, "max-routes-per-sandbox", 16, "most routed ports per sandbox")
	fs.IntVar(&o.maxProxyConnsPerSandbox, "max-proxy-conns-per-sandbox", 64, "most connections per sandbox at once through the proxy (and as many on its raw TCP routes)")
	fs.DurationVar(&o.proxyIdleTimeout, "proxy-idle-timeout", 10*time.Minute, "close a proxied tunnel, WebSocket or raw TCP connection with no traffic for this long")
	fs.IntVar(&o.maxSessions, "max-sandboxes", 64, "most sandboxes (active and warm) at once")
	fs.IntVar(&o.maxVCPUs, "max-vcpus", 0, "most vCPUs handed out at once (0: 32 per host core)")
	fs.IntVar(&o.maxMemoryMB, "max-memory-mb", 0, "most guest memory handed out at once, MiB (0: the host's memory less max(1 GiB, 10%))")
	fs.IntVar(&o.minFreeDiskMB, "min-free-disk-mb", 1024, "refuse creates and snapshots below this much free disk, MiB")
	fs.DurationVar(&o.fillTimeout, "fill-timeout", 2*time.Minute, "deadline of one warm pool fill, all its steps included: a machine whose guest misses it is stopped and counted (pool.status fill_timeouts)")
	fs.BoolVar(&o.keepMachines, "keep-machines", true, "let machines outlive a crash of this process, so the restarted worker reattaches to them (a clean stop always stops them)")
	fs.StringVar(&o.jobQueues, "job-queues", "default", "job queues to consume, comma-separated (default is always consumed)")
	fs.IntVar(&o.jobConcurrency, "job-concurrency", 2, "most jobs this worker runs at once")
	fs.DurationVar(&o.heartbeatInterval, "heartbeat-interval", 2*time.Second, "how often the worker puts its heartbeat in the firkin_workers bucket (it lives 3.5 intervals; use the same on every worker of a cluster)")
	fs.DurationVar(&o.drainTimeout, "drain-timeout", 5*time.Minute, "how long a drain lets running jobs go on before it hands them back to the queue")
	fs.DurationVar(&o.logMaxAge, "log-max-age", 24*time.Hour, "how long log events are kept")
	fs.Int64Var(&o.logRateKiB, "log-rate-kib", 16<<10, "each sandbox's log budget: output bytes per second into the log stream (bursts of four seconds' worth), KiB; beyond it output is dropped and counted; 0: no limit")
	fs.StringVar(&o.e2bListen, "e2b-listen", "", "serve E2B's REST control API here (off when empty), e.g. 127.0.0.1:3000: point the E2B SDK's E2B_API_URL at it")
	fs.StringVar(&o.e2bKeysFile, "e2b-api-keys-file", "", "file of accepted E2B API keys, one a line (else FIRKIN_E2B_API_KEYS, comma-separated; else one made and kept in <state-dir>/e2b-api-key)")
	fs.StringVar(&o.e2bTemplates, "e2b-templates", "base=tiny", "E2B template ids mapped to firkin templates, e.g. base=tiny,python=py (other ids are used as they are)")
	fs.StringVar(&o.e2bDomain, "e2b-domain", "", "sandbox domain the E2B API tells the SDK, for getHost(port) = <port>-<id>.<domain> (default: --domain and the proxy's port, e.g. localhost:8080)")
	fs.Int64Var(&o.logTotalMiB, "log-total-mib", 256, "each sandbox's log budget: output bytes into the log stream over its life, MiB; 0: no limit")
	fs.Usage = func() {
		out := fs.Output()
		fmt.Fprintln(out, "usage: firkin-worker [flags]\n\nEvery flag may also be set as FIRKIN_<NAME> (e.g. FIRKIN_STATE_DIR) or in --config.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(os.Stdout)
			fs.Usage()
		}
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q (the worker takes flags only)", fs.Args())
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	if configPath == "" {
		configPath = getenv("FIRKIN_CONFIG")
	}
	var file map[string]any
	if configPath != "" {
		data, err := readFile(configPath)
		if err != nil {
			return o, fmt.Errorf("--config: %w", err)
		}
		if err := json.Unmarshal(data, &file); err != nil {
			return o, fmt.Errorf("--config %s: %w", configPath, err)
		}
	}
	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		if given[f.Name] || f.Name == "config" {
			return
		}
		if v := getenv(EnvName(f.Name)); v != "" {
			if err := f.Value.Set(v); err != nil {
				errs = append(errs, fmt.Errorf("%s=%q: %w", EnvName(f.Name), v, err))
			}
			return
		}
		if v, ok := file[f.Name]; ok {
			if err := f.Value.Set(fmt.Sprint(v)); err != nil {
				errs = append(errs, fmt.Errorf("--config %s: %s=%v: %w", configPath, f.Name, v, err))
			}
			delete(file, f.Name)
		}
	})
	for k := range file {
		if fs.Lookup(k) == nil {
			errs = append(errs, fmt.Errorf("--config %s: unknown setting %q", configPath, k))
		}
	}
	if _, err := e2bapi.ParseTemplates(o.e2bTemplates); err != nil {
		errs = append(errs, err)
	}
	if _, err := parsePool(o.pool); err != nil {
		errs = append(errs, err)
	}
	if o.natsAuth != worker.NATSAuthNkey && o.natsAuth != worker.NATSAuthNone {
		errs = append(errs, fmt.Errorf("--nats-auth %q: want %s or %s", o.natsAuth, worker.NATSAuthNkey, worker.NATSAuthNone))
	}
	if err := o.readNATSPassword(getenv, readFile); err != nil {
		errs = append(errs, err)
	}
	if err := o.readTokenSecret(readFile); err != nil {
		errs = append(errs, err)
	}
	if o.replicas < 0 || o.replicas > 5 {
		errs = append(errs, fmt.Errorf("--replicas %d: want 0 (auto) or 1..5", o.replicas))
	}
	if o.fillTimeout < time.Second || o.fillTimeout > time.Hour {
		errs = append(errs, fmt.Errorf("--fill-timeout %s: want 1s..1h", o.fillTimeout))
	}
	if o.maxRoutesPerSandbox < 1 || o.maxProxyConnsPerSandbox < 1 || o.proxyIdleTimeout <= 0 {
		errs = append(errs, errors.New("--max-routes-per-sandbox, --max-proxy-conns-per-sandbox and --proxy-idle-timeout must be positive"))
	}
	return o, errors.Join(errs...)
}

// natsPasswordEnv holds the external server's password when no
// --nats-password-file is given (a password is never a flag: command lines
// are visible to every user of the host).
const natsPasswordEnv = "FIRKIN_NATS_PASSWORD"

// readNATSPassword fills natsPassword from --nats-password-file or the
// environment.
func (o *options) readNATSPassword(getenv func(string) string, readFile func(string) ([]byte, error)) error {
	env := getenv(natsPasswordEnv)
	if o.natsPasswordFile == "" {
		o.natsPassword = env
		return nil
	}
	if env != "" {
		return fmt.Errorf("--nats-password-file and %s both given: give the NATS password once", natsPasswordEnv)
	}
	data, err := readFile(o.natsPasswordFile)
	if err != nil {
		return fmt.Errorf("--nats-password-file: %w", err)
	}
	o.natsPassword = strings.TrimRight(string(data), "\r\n")
	if o.natsPassword == "" {
		return fmt.Errorf("--nats-password-file %s is empty", o.natsPasswordFile)
	}
	return nil
}

// readTokenSecret fills tokenSecret from --token-secret-file.
func (o *options) readTokenSecret(readFile func(string) ([]byte, error)) error {
	if o.tokenSecretFile == "" {
		return nil
	}
	if o.tokenSecret != "" {
		return errors.New("--token-secret-file and --token-secret (or FIRKIN_TOKEN_SECRET) both given: give the worker secret once")
	}
	data, err := readFile(o.tokenSecretFile)
	if err != nil {
		return fmt.Errorf("--token-secret-file: %w", err)
	}
	o.tokenSecret = strings.TrimSpace(string(data))
	if o.tokenSecret == "" {
		return fmt.Errorf("--token-secret-file %s is empty", o.tokenSecretFile)
	}
	return nil
}

// EnvName is the environment variable of a flag: FIRKIN_ + upper case, - → _.
func EnvName(flagName string) string {
	return "FIRKIN_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// parsePool parses "tiny=2,py=1".
func parsePool(s string) (map[string]int, error) {
	out := map[string]int{}
	if strings.TrimSpace(s) == "" {
		return out, nil
	}
	for _, part := range strings.Split(s, ",") {
		name, num, ok := strings.Cut(strings.TrimSpace(part), "=")
		n, err := strconv.Atoi(num)
		if !ok || name == "" || err != nil || n < 0 {
			return nil, fmt.Errorf("--pool %q: want template=count[,template=count...]", s)
		}
		out[name] = n
	}
	return out, nil
}

func (o options) workerConfig() worker.Config {
	pool, _ := parsePool(o.pool)
	return worker.Config{
		StateDir:            o.stateDir,
		NATSURL:             o.natsURL,
		NATSListen:          o.natsListen,
		NATSAuth:            o.natsAuth,
		NATSCreds:           o.natsCreds,
		NATSNkey:            o.natsNkey,
		NATSUser:            o.natsUser,
		NATSPassword:        o.natsPassword,
		NATSServiceCreds:    o.natsServiceCreds,
		NATSServiceNkey:     o.natsServiceNkey,
		NATSTLSCA:           o.natsTLSCA,
		NATSTLSCert:         o.natsTLSCert,
		NATSTLSKey:          o.natsTLSKey,
		Prefix:              o.prefix,
		Driver:              o.driver,
		Accel:               o.accel,
		Kernel:              o.kernel,
		AgentBinary:         o.agent,
		Pool:                pool,
		ProxyListen:         o.proxyListen,
		DNSUpstream:         o.dnsUpstream,
		EgressHostPorts:     o.egressHostPorts,
		ClientInboxPrefixes: splitList(o.clientInboxes),
		Domain:              o.domain,
		TokenSecret:         o.tokenSecret,
		RouteTCPHost:        o.routeTCPHost,
		LogMaxAge:           o.logMaxAge,
		MinFreeDiskBytes:    uint64(o.minFreeDiskMB) << 20,
		FillTimeout:         o.fillTimeout,
		LogBytesPerSecond:   budgetBytes(o.logRateKiB, 10),
		LogBytesTotal:       budgetBytes(o.logTotalMiB, 20),
		KeepMachinesOnExit:  o.keepMachines,
		JobQueues:           splitList(o.jobQueues),
		JobConcurrency:      o.jobConcurrency,
		Replicas:            o.replicas,
		MetricsListen:       o.metricsListen,
		HeartbeatInterval:   o.heartbeatInterval,
		DrainTimeout:        o.drainTimeout,
		Limits:              backend.Limits{MaxSessions: o.maxSessions, MaxVCPUs: o.maxVCPUs, MaxMemoryMB: o.maxMemoryMB},
		RouteLimits: worker.RouteLimits{
			MaxRoutesPerSandbox: o.maxRoutesPerSandbox,
			MaxConnsPerSandbox:  o.maxProxyConnsPerSandbox,
			IdleTimeout:         o.proxyIdleTimeout,
		},
	}
}

// splitList splits a comma-separated list, dropping empty items.
func splitList(s string) []string {
	var out []string
	for _, item := range strings.Split(s, ",") {
		if item = strings.TrimSpace(item); item != "" {
			out = append(out, item)
		}
	}
	return out
}

// budgetBytes turns a log budget flag (in units of 1<<shift bytes; 0 or less:
// no limit) into backend.Config's form (negative: no limit).
func budgetBytes(v int64, shift uint) int64 {
	if v <= 0 {
		return -1
	}
	return v << shift
}
