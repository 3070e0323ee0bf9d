// Package worker assembles a firkin worker from its parts — NATS (embedded or
// remote), JetStream state, guest images, the machine driver, the runtime, the
// NATS handlers and the port proxy — and runs it until stopped. The binary and
// the end-to-end tests both start workers through it.
package worker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/artifacts"
	"github.com/firkin-dev/firkin-worker/backend"
	"github.com/firkin-dev/firkin-worker/cluster"
	"github.com/firkin-dev/firkin-worker/e2b/envd"
	"github.com/firkin-dev/firkin-worker/embedded"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/handlers"
	"github.com/firkin-dev/firkin-worker/images"
	"github.com/firkin-dev/firkin-worker/internal/atomicfile"
	"github.com/firkin-dev/firkin-worker/jetstream"
	"github.com/firkin-dev/firkin-worker/jobs"
	"github.com/firkin-dev/firkin-worker/metrics"
	"github.com/firkin-dev/firkin-worker/netguard"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/tokens"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// Config is everything a worker is started with.
type Config struct {
	StateDir   string
	NATSURL    string // join this server or cluster; empty embeds one
	NATSListen string // the embedded server's client address
	Prefix     string // subject prefix (default "firkin")
	Driver     string // auto, qemu, vz
	Accel      string // qemu accelerator: auto, kvm, tcg
	Kernel     string // guest kernel override
	// AgentBinary is the static guest agent for the host's arch; default:
	// firkin-agent-linux-<arch> beside the worker's executable.
	AgentBinary string
	// Image, when set, is used as the tiny template's image instead of
	// building one (tests pass a cached image).
	Image       *vmpool.Image
	Pool        map[string]int // warm pool targets per template
	ProxyListen string
	Domain      string
	// DNSUpstream is the resolver guests' DNS goes to through the network
	// guard's proxy ("host:port"; default: /etc/resolv.conf's first).
	DNSUpstream string
	// ClientInboxPrefixes are the reply subject prefixes requests may use
	// (default "_INBOX."): a request asking for its reply anywhere else is
	// not answered.
	ClientInboxPrefixes []string
	// EgressHostPorts are the host ports a create's egress may open with
	// "host:PORT" (development set-ups), e.g. "8000,3000-3010"; empty: none.
	EgressHostPorts string
	Limits          backend.Limits
	// MinFreeDiskBytes overrides the free-disk floor (see backend.Config).
	MinFreeDiskBytes uint64
	// FillTimeout bounds one warm fill (see backend.Config; 0: 2 min).
	FillTimeout time.Duration
	// LogBytesPerSecond and LogBytesTotal are each sandbox's log budget (see
	// backend.Config; 0: the defaults, negative: no limit).
	LogBytesPerSecond, LogBytesTotal int64
	// LogMaxAge bounds the log stream's retention.
	LogMaxAge time.Duration
	// SandboxMetricsInterval is how often every sandbox's resources are
	// sampled (firkin.sandbox.<id>.metrics, firkin.metrics.<id>); default
	// 5 s, negative: never.
	SandboxMetricsInterval time.Duration
	// TokenSecret overrides the token secret kept in the state directory.
	TokenSecret string
	// RouteTCPHost is the address the raw TCP route listeners of public
	// sandboxes bind to (default 127.0.0.1).
	RouteTCPHost string
	// RouteLimits cap port routing per sandbox.
	RouteLimits RouteLimits
	// KeepMachinesOnExit lets machines outlive a crashed worker process, so
	// the restarted worker reattaches to them.
	KeepMachinesOnExit bool
	// WaitTemplates makes Start return only once the built-in templates have
	// template snapshots and the warm pool targets are set (tests).
	WaitTemplates bool
	Logger        *slog.Logger

	// NATSAuth is how the embedded server authenticates clients:
	// NATSAuthNkey (default) or NATSAuthNone.
	NATSAuth string
	// Credentials for an external server (NATSURL): at most one of a
	// credentials file, an nkey seed file, or a user with a password.
	NATSCreds, NATSNkey, NATSUser, NATSPassword string
	// Credentials of the service connection to an external server (at most
	// one; default: the ones above): a user that may publish only replies
	// into _INBOX.>.
	NATSServiceCreds, NATSServiceNkey string
	// TLS for an external server: a CA bundle, and a client certificate
	// with its key.
	NATSTLSCA, NATSTLSCert, NATSTLSKey string

	// JobQueues are the job queues consumed besides "default".
	JobQueues []string
	// JobConcurrency is the most jobs run at once (default 2).
	JobConcurrency int
	// JobMaxDeliver, JobBackoff and JobAckWait tune the job runner's
	// retries (see jobs.Config; zero: its defaults).
	JobMaxDeliver int
	JobBackoff    time.Duration
	JobAckWait    time.Duration

	// MetricsListen is the Prometheus endpoint's address ("": off).
	MetricsListen string

	// Replicas of the streams, KV buckets and object store; 0: 3 when the
	// NATS server is part of a cluster of three or more, else 1.
	Replicas int

	// HeartbeatInterval is how often the worker puts its heartbeat in the
	// firkin_workers bucket (default 2 s; it lives 3.5 intervals). Workers
	// of one cluster should use the same.
	HeartbeatInterval time.Duration
	// DrainTimeout is how long a drain lets running jobs go on before it
	// hands them back (default 5 min; a drain request may say otherwise).
	DrainTimeout time.Duration
}

// Worker is a running worker.
type Worker struct {
	cfg     Config
	log     *slog.Logger
	id      string
	srv     *embedded.Server
	nc      *nats.Conn // the service connection: serves requests, publishes only replies
	storeNC *nats.Conn // the store connection: streams, KV, logs and events
	backend *backend.Backend
	svc     *handlers.Service
	rt      *runtimeFacade
	stopped chan struct{}
	bg      context.CancelFunc
	bgDone  chan struct{}
	driver  vmpool.Driver
	guard   *netguard.Guard // nil: guests have no outbound network
	// hostPorts are the host ports egress "host:PORT" may open.
	hostPorts portSet
	jobs      *jobs.Runner
	metrics   *metrics.Metrics
	// metricsSrv serves Config.MetricsListen (nil when off).
	metricsSrv  *http.Server
	metricsAddr string
	// jobsRef is jobs for the heartbeat and drain, which start before it.
	jobsRef   atomic.Pointer[jobs.Runner]
	cluster   *cluster.Membership
	artifacts *artifacts.Store

	// clientSeed is the embedded server's client seed file ("" without one).
	clientSeed string
	// envdAuth are the credentials of the E2B sandbox API's connection to
	// an external server (the store connection's); envdNC is that
	// connection and envd the API (see envd.go).
	envdAuth []nats.Option
	envdNC   *nats.Conn
	envd     *envd.Server
}

// ID is the worker's id (the client_id of its sandboxes).
func (w *Worker) ID() string { return w.id }

// NATSURL is the address the worker's NATS connection uses.
func (w *Worker) NATSURL() string { return w.nc.ConnectedUrl() }

// ProxyAddr is the address the port-routing proxy listens on.
func (w *Worker) ProxyAddr() string { return w.rt.proxyAddr() }

// Backend is the worker's runtime (for tests and benchmarks).
func (w *Worker) Backend() *backend.Backend { return w.backend }

// step runs one named start-up step so a failure says which step failed.
func step(name string, fn func() error) error {
	if err := fn(); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

// Start starts a worker. On failure everything started so far is stopped.
func Start(ctx context.Context, cfg Config) (_ *Worker, err error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	hostPorts, err := parsePortSet(cfg.EgressHostPorts)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, err)
	}
	w := &Worker{cfg: cfg, log: cfg.Logger, stopped: make(chan struct{}), bgDone: make(chan struct{}), hostPorts: hostPorts}
	var cleanups []func()
	defer func() {
		if err != nil {
			for i := len(cleanups) - 1; i >= 0; i-- {
				cleanups[i]()
			}
		}
	}()
	subj, err := subjects.New(cfg.Prefix)
	if err != nil {
		return nil, err
	}
	if err := step("state dir", w.makeStateDir); err != nil {
		return nil, err
	}
	if err := step("worker id", func() (err error) { w.id, err = loadOrCreateID(filepath.Join(cfg.StateDir, "worker-id")); return }); err != nil {
		return nil, err
	}
	w.log = w.log.With("worker", w.id)
	if err := step("nats", func() error { return w.connect(subj) }); err != nil {
		return nil, err
	}
	cleanups = append(cleanups, w.closeNATS)

	var store *jetstream.Store
	if err := step("jetstream", func() (err error) {
		store, err = jetstream.Open(ctx, w.storeNC, jetstream.Config{Subjects: subj, LogMaxAge: cfg.LogMaxAge, Replicas: w.replicas()})
		return err
	}); err != nil {
		return nil, err
	}
	var arts *artifacts.Store
	if err := step("artifact store", func() (err error) {
		arts, err = artifacts.Open(ctx, store.JetStream(), artifacts.Config{Replicas: w.replicas(), Logger: w.log.With("component", "artifacts")})
		return err
	}); err != nil {
		return nil, err
	}
	w.artifacts = arts
	cleanups = append(cleanups, arts.Close)
	var img vmpool.Image
	if err := step("guest images", func() (err error) {
		if cfg.Image != nil {
			img = *cfg.Image
			return nil
		}
		img, err = images.Build(ctx, images.Config{
			StateDir:    cfg.StateDir,
			AgentBinary: cfg.AgentBinary,
			Kernel:      cfg.Kernel,
			Logger:      w.log.With("component", "images"),
		})
		return err
	}); err != nil {
		return nil, err
	}
	var driver vmpool.Driver
	if err := step("driver", func() (err error) { driver, err = newDriver(ctx, cfg, w.log); return }); err != nil {
		return nil, err
	}
	w.driver = driver
	cleanups = append(cleanups, func() { _ = w.closeDriver() })
	w.startNetwork(ctx, driver)
	cleanups = append(cleanups, func() { _ = w.closeGuard() })
	var tok *tokens.Minter
	var secret []byte
	if err := step("tokens", func() (err error) { tok, secret, err = newTokenMinter(cfg); return }); err != nil {
		return nil, err
	}
	if err := step("runtime", func() (err error) {
		w.backend, err = backend.New(backend.Config{
			WorkerID:         w.id,
			Driver:           driver,
			Store:            storeAdapter{store},
			Tokens:           tok,
			RecordKey:        backend.RecordKey(secret),
			Egress:           w.egress(),
			HostPortAllowed:  w.hostPortAllowed,
			StateDir:         cfg.StateDir,
			Images:           map[string]vmpool.Image{"tiny": img},
			Artifacts:        arts,
			Limits:           cfg.Limits,
			MinFreeDiskBytes: cfg.MinFreeDiskBytes,
			FillTimeout:      cfg.FillTimeout,
			Logger:           w.log.With("component", "runtime"),

			LogBytesPerSecond: cfg.LogBytesPerSecond,
			LogBytesTotal:     cfg.LogBytesTotal,
			MaxReplyBytes:     int(w.nc.MaxPayload()) - 8<<10,
			Subjects:          subj,
			Live:              newLivePublisher(w.storeNC, w.nc, subj, w.inboxAllowed),
		})
		return err
	}); err != nil {
		return nil, err
	}
	w.metrics = w.newMetrics()
	w.rt = &runtimeFacade{Backend: w.backend, metrics: w.metrics}
	if err := step("metrics endpoint", w.startMetrics); err != nil {
		return nil, err
	}
	cleanups = append(cleanups, w.stopMetrics)
	if err := step("port proxy", func() error { return w.startProxy() }); err != nil {
		return nil, err
	}
	cleanups = append(cleanups, w.stopProxy)
	// The heartbeat starts before recovery: others must not judge this
	// worker's sessions lost while it reattaches them.
	if err := step("cluster membership", func() error { return w.joinCluster(ctx, subj, driver.Name()) }); err != nil {
		return nil, err
	}
	cleanups = append(cleanups, func() { _ = w.cluster.Stop(context.Background()) })
	if err := step("handlers", func() (err error) {
		w.svc, err = handlers.New(w.nc, handlers.Config{Subjects: subj, WorkerID: w.id, Runtime: w.rt, Version: Version, Cluster: w.cluster,
			Status: w.metrics, Observe: w.metrics.ObserveRequest,
			ReplyPrefixes: cfg.ClientInboxPrefixes, Logger: w.log.With("component", "handlers")})
		return err
	}); err != nil {
		return nil, err
	}
	w.backend.SetHooks(backend.Hooks{Owned: w.svc.Own, Released: w.released})
	if err := step("recover sandboxes", func() error { return w.backend.Start(ctx) }); err != nil {
		return nil, err
	}
	w.endQuarantine(ctx)
	if cfg.SandboxMetricsInterval >= 0 {
		w.backend.StartMetrics(backend.MetricsConfig{Every: cfg.SandboxMetricsInterval, Publish: store.PublishMetrics})
	}
	cleanups = append(cleanups, func() {
		sctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_ = w.backend.Stop(sctx)
	})
	if err := step("micro service", w.svc.Start); err != nil {
		return nil, err
	}
	if err := step("job runner", func() (err error) {
		w.jobs, err = jobs.Start(ctx, jobs.Config{
			Subjects: subj, WorkerID: w.id, Runtime: w.rt, Store: w.storeNC, Service: w.nc,
			Queues: cfg.JobQueues, Concurrency: cfg.JobConcurrency,
			MaxDeliver: cfg.JobMaxDeliver, Backoff: cfg.JobBackoff, AckWait: cfg.JobAckWait, Replicas: w.replicas(),
			ReplyAllowed: w.svc.ReplyAllowed, Logger: w.log.With("component", "jobs"),
		})
		return err
	}); err != nil {
		return nil, err
	}
	w.jobsRef.Store(w.jobs)
	if w.cluster.Draining() { // a drain came before the runner
		w.jobs.Pause()
	}
	cleanups = append(cleanups, func() { _ = w.jobs.Stop(context.Background()) })
	w.log.Info("firkin-worker ready", "nats", w.nc.ConnectedUrlRedacted(), "driver", driver.Name(), "state_dir", cfg.StateDir, "proxy", w.rt.proxyAddr())

	bgCtx, cancel := context.WithCancel(context.Background())
	w.bg = cancel
	warm := func() {
		defer close(w.bgDone)
		if err := w.backend.EnsureBuiltinTemplates(bgCtx); err != nil {
			w.log.Error("built-in templates", "err", err)
			return
		}
		if !w.cluster.Draining() {
			w.backend.DefaultPool(bgCtx, cfg.Pool)
		}
		w.log.Info("templates ready", "pool", cfg.Pool)
	}
	if cfg.WaitTemplates {
		warm()
	} else {
		go warm()
	}
	return w, nil
}

// inboxAllowed says whether subject is a client inbox the worker may
// publish live output to (the handlers' reply check).
func (w *Worker) inboxAllowed(subject string) bool {
	return w.svc != nil && w.svc.ReplyAllowed(subject)
}

func (w *Worker) released(id string) {
	w.svc.Release(id)
	w.rt.closeRoutes(id)
}

// Stop answers the requests in flight, stops every sandbox and the warm
// pool, and disconnects (and stops the embedded server).
func (w *Worker) Stop(ctx context.Context) error {
	w.cluster.Leave(ctx) // no create is placed here any more
	if w.bg != nil {
		w.bg()
		<-w.bgDone
	}
	var jobsErr error
	if w.jobs != nil {
		jobsErr = w.jobs.Stop(ctx)
	}
	errs := []error{jobsErr, w.svc.Stop(ctx), w.backend.Stop(ctx), w.closeGuard(), w.closeDriver()}
	w.artifacts.Close()
	errs = append(errs, w.cluster.Stop(ctx)) // after the sandboxes' records are gone
	w.stopProxy()
	w.stopMetrics()
	w.closeNATS()
	return errors.Join(errs...)
}

// closeDriver lets go of what the driver holds for the worker (the qemu
// driver's uid range).
func (w *Worker) closeDriver() error {
	if c, ok := w.driver.(io.Closer); ok {
		return c.Close()
	}
	return nil
}

// connect starts the embedded server (unless the worker joins one) and
// opens the worker's two connections: the service connection answers
// requests and may publish nothing but replies; the store connection writes
// streams, KV records, logs and events and serves nothing. So no request, by
// the reply subject it names, can make the worker write state.
func (w *Worker) connect(subj subjects.Subjects) error {
	url := w.cfg.NATSURL
	var storeAuth, serviceAuth []nats.Option
	var err error
	if url == "" {
		storeAuth, serviceAuth, err = w.startEmbedded(subj)
		if err == nil {
			url = w.srv.ClientURL()
		}
	} else {
		storeAuth, serviceAuth, err = w.externalOptions()
		w.envdAuth = storeAuth
	}
	if err != nil {
		return err
	}
	if w.storeNC, err = w.dial(url, "store", append(storeAuth, nats.CustomInboxPrefix(embedded.WorkerInboxPrefix))); err == nil {
		if w.nc, err = w.dial(url, "service", serviceAuth); err != nil {
			w.storeNC.Close()
			w.storeNC = nil
		}
	}
	if err != nil {
		if w.srv != nil {
			w.srv.Shutdown()
			w.srv = nil
		}
		return err
	}
	return nil
}

// dial connects to url as one of the worker's connections, reconnecting
// with backoff for ever. The backoff stops growing at 2 s (randomized):
// output held during an outage is dropped after 10 s, so a worker must not
// sleep through most of that after the server is back.
func (w *Worker) dial(url, role string, opts []nats.Option) (*nats.Conn, error) {
	bo := backoff.NewExponentialBackOff(backoff.WithInitialInterval(250*time.Millisecond), backoff.WithMaxInterval(2*time.Second))
	nc, err := nats.Connect(url, append(opts,
		nats.Name("firkin-worker "+w.id+" "+role),
		nats.MaxReconnects(-1),
		nats.RetryOnFailedConnect(false),
		nats.CustomReconnectDelay(func(int) time.Duration { return bo.NextBackOff() }),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			bo.Reset()
			w.log.Info("reconnected to NATS", "connection", role, "url", nc.ConnectedUrlRedacted())
		}),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				w.log.Warn("disconnected from NATS", "connection", role, "err", err)
			}
		}),
	)...)
	if err != nil {
		return nil, fmt.Errorf("connect to %s (%s connection): %w", url, role, err)
	}
	return nc, nil
}

// replicas is the replica count of the worker's streams, buckets and
// object store: Config.Replicas, or, when that is 0, 3 on a NATS cluster
// of three or more servers (the connection's known servers) and 1
// otherwise.
func (w *Worker) replicas() int {
	if w.cfg.Replicas > 0 {
		return w.cfg.Replicas
	}
	return autoReplicas(w.storeNC.ConnectedClusterName(), len(w.storeNC.Servers()))
}

// autoReplicas is 3 for a named cluster of at least three servers, else 1.
func autoReplicas(cluster string, servers int) int {
	if cluster != "" && servers >= 3 {
		return 3
	}
	return 1
}

func (w *Worker) closeNATS() {
	for _, nc := range []*nats.Conn{w.nc, w.storeNC} {
		if nc != nil {
			_ = nc.Drain()
			nc.Close()
		}
	}
	if w.srv != nil {
		w.srv.Shutdown()
		w.srv = nil
	}
}

func (c *Config) setDefaults() error {
	if c.StateDir == "" {
		return errors.New("worker: state dir is required")
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.NATSListen == "" {
		c.NATSListen = "127.0.0.1:4222"
	}
	if err := c.validateNATS(); err != nil {
		return err
	}
	if c.Driver == "" {
		c.Driver = "auto"
	}
	if c.ProxyListen == "" {
		c.ProxyListen = "127.0.0.1:8080"
	}
	if c.Domain == "" {
		c.Domain = "localhost"
	}
	if c.Pool == nil {
		c.Pool = map[string]int{"tiny": 1}
	}
	if c.AgentBinary == "" {
		exe, err := os.Executable()
		if err == nil {
			c.AgentBinary = filepath.Join(filepath.Dir(exe), "firkin-agent-linux-"+runtime.GOARCH)
		}
	}
	if _, err := os.Stat(c.AgentBinary); err != nil {
		return fmt.Errorf("worker: guest agent binary %q: %w (build it with `make build`, or pass --agent)", c.AgentBinary, err)
	}
	return nil
}

// makeStateDir creates the state directory 0700 (it holds the worker
// secret, guest memory and disks); an existing one that others may read is
// kept as it is and logged.
func (w *Worker) makeStateDir() error {
	if err := os.MkdirAll(w.cfg.StateDir, 0o700); err != nil {
		return err
	}
	st, err := os.Stat(w.cfg.StateDir)
	if err != nil {
		return err
	}
	if st.Mode().Perm()&0o077 != 0 {
		w.log.Warn("state directory is accessible to other users; it holds the worker secret, guest memory and disks (chmod 700 it)", "dir", w.cfg.StateDir, "mode", st.Mode().Perm().String())
	}
	return nil
}

// loadOrCreateID returns the worker id kept in path, making one on first
// start (written atomically; of concurrent first starts one id wins). A file
// that holds no valid id (a torn write of an older version) is replaced.
func loadOrCreateID(path string) (string, error) {
	for range 2 {
		data, err := os.ReadFile(path)
		if err == nil {
			id := strings.TrimSpace(string(data))
			if subjects.ValidateSandboxID(id) == nil {
				return id, nil
			}
			if err := os.Remove(path); err != nil {
				return "", err
			}
		} else if !errors.Is(err, fs.ErrNotExist) {
			return "", err
		}
		id := "w" + backend.NewID(11)
		if err := atomicfile.Create(path, []byte(id+"\n"), 0o644); err != nil && !errors.Is(err, fs.ErrExist) {
			return "", err
		}
	}
	return "", fmt.Errorf("worker id file %s keeps changing", path)
}
