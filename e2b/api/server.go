// Package api serves E2B's REST control API (the one the official E2B
// SDKs reach at E2B_API_URL) as a client of the firkin-worker NATS API:
// create, list, get, kill, timeout, pause, connect/resume, fork, snapshots
// and metrics of sandboxes, each turned into one or two NATS requests to
// whichever worker answers (in a cluster, the sandbox's owner). It is not a
// second path into the runtime: any process with a client connection can
// serve it, in the worker (--e2b-listen) or apart (cmd/firkin-e2b).
//
// Requests carry an API key in X-API-KEY, checked in constant time against
// the configured keys; errors are E2B's {"code":N,"message":"…"} with E2B's
// status codes. The sandbox API (envd, port 49983 through the proxy) is not
// served here.
package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/e2b/envd"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// EnvdVersion is the envd version the API reports for every sandbox: the
// one the worker's sandbox API (package e2b/envd) answers as. The SDK turns
// features on by it, so it must never claim more than that API serves.
const EnvdVersion = envd.Version

// API is what the server asks of the firkin workers; *client.Client has
// it.
type API interface {
	Create(ctx context.Context, req subjects.CreateSandboxRequest) (subjects.Sandbox, error)
	Get(ctx context.Context, id string) (subjects.Sandbox, error)
	Kill(ctx context.Context, id string) error
	SetTimeout(ctx context.Context, id string, seconds int) (subjects.Sandbox, error)
	Pause(ctx context.Context, id string) (subjects.Sandbox, error)
	Resume(ctx context.Context, id string, req subjects.ResumeRequest) (subjects.Sandbox, error)
	Fork(ctx context.Context, id string, req subjects.ForkRequest) (subjects.ForkReply, error)
	ListPage(ctx context.Context, req subjects.ListSandboxesRequest) (subjects.ListSandboxesReply, error)
	Metrics(ctx context.Context, id string) (subjects.MetricsReply, error)
	Snapshot(ctx context.Context, id string, req subjects.SnapshotRequest) (subjects.SnapshotRecord, error)
	GetSnapshot(ctx context.Context, sid string) (subjects.SnapshotRecord, error)
	ListSnapshots(ctx context.Context) ([]subjects.SnapshotRecord, error)
	DeleteSnapshot(ctx context.Context, sid string) error
}

var _ API = (*client.Client)(nil)

// DefaultTemplates maps E2B template ids to firkin templates when Config
// has none: E2B's default template "base" is firkin's "tiny".
var DefaultTemplates = map[string]string{"base": "tiny"}

// Config is what a Server is made with.
type Config struct {
	// API reaches the workers (required).
	API API
	// Keys are the accepted API keys (required, at least one).
	Keys *Keys
	// Templates maps E2B template ids to firkin template ids (nil:
	// DefaultTemplates). An id not in the map is used as it is: a firkin
	// template, or a snapshot made by createSnapshot.
	Templates map[string]string
	// Domain is the sandbox domain told to the SDK (the proxy's host and
	// port, e.g. "localhost:8080": getHost(port) is then
	// <port>-<id>.localhost:8080). Empty: none is told.
	Domain string
	// Logger logs failures (default: slog.Default()).
	Logger *slog.Logger
}

// Server serves E2B's control API.
type Server struct {
	api       API
	keys      *Keys
	templates map[string]string
	// aliases maps firkin template ids back to E2B ids (where unique).
	aliases map[string]string
	domain  string
	log     *slog.Logger
	mux     *http.ServeMux
	tokens  tokenCache

	mu   sync.Mutex
	srv  *http.Server
	ln   net.Listener
	done chan struct{}
}

// New validates cfg and returns a server.
func New(cfg Config) (*Server, error) {
	var errs []error
	if cfg.API == nil {
		errs = append(errs, errors.New("e2bapi: no API"))
	}
	if cfg.Keys.Len() == 0 {
		errs = append(errs, errors.New("e2bapi: no API key"))
	}
	templates := cfg.Templates
	if templates == nil {
		templates = DefaultTemplates
	}
	aliases := map[string]string{}
	for e2b, firkin := range templates {
		if !validE2BTemplate(e2b) {
			errs = append(errs, fmt.Errorf("e2bapi: template %q: want 1..128 of [A-Za-z0-9._/:-]", e2b))
		}
		if err := subjects.ValidateTemplateID(firkin); err != nil {
			errs = append(errs, fmt.Errorf("e2bapi: template %q → %q: %w", e2b, firkin, err))
		}
		if _, dup := aliases[firkin]; dup {
			aliases[firkin] = "" // ambiguous: report the firkin id
		} else {
			aliases[firkin] = e2b
		}
	}
	if len(cfg.Domain) > 253 {
		errs = append(errs, errors.New("e2bapi: domain over 253 characters"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	s := &Server{api: cfg.API, keys: cfg.Keys, templates: templates, aliases: aliases, domain: cfg.Domain, log: log}
	s.tokens.max = maxCachedTokens
	s.routes()
	return s, nil
}

// Start listens on addr ("host:port") and serves until Stop.
func (s *Server) Start(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("e2bapi: listen %s: %w", addr, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv != nil {
		ln.Close()
		return errors.New("e2bapi: already started")
	}
	s.ln = ln
	s.srv = &http.Server{
		Handler:           s,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       time.Minute,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
	}
	s.done = make(chan struct{})
	go func(srv *http.Server, done chan struct{}) {
		defer close(done)
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("e2b api stopped serving", "err", err)
		}
	}(s.srv, s.done)
	return nil
}

// Addr is the address the server listens on (nil before Start).
func (s *Server) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln == nil {
		return nil
	}
	return s.ln.Addr()
}

// Stop stops accepting requests and waits (within ctx) for those in
// flight; then it closes what is left.
func (s *Server) Stop(ctx context.Context) error {
	s.mu.Lock()
	srv, done := s.srv, s.done
	s.mu.Unlock()
	if srv == nil {
		return nil
	}
	err := srv.Shutdown(ctx)
	if err != nil {
		err = errors.Join(err, srv.Close())
	}
	<-done
	return err
}

// ServeHTTP checks the API key and serves the request.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/health" && r.Method == http.MethodGet {
		w.WriteHeader(http.StatusOK)
		return
	}
	if !s.keys.Check(r.Header.Get("X-API-KEY")) {
		writeError(w, http.StatusUnauthorized, "invalid or missing API key (X-API-KEY)")
		return
	}
	s.mux.ServeHTTP(w, r)
}

// Request bodies are bounded: a create (metadata, env vars, network) by
// 1 MiB, every other body by 64 KiB.
const (
	maxCreateBody = 1 << 20
	maxBody       = 64 << 10
)

// Bounds of what a request may wait for the workers.
const (
	shortWait = 30 * time.Second
	longWait  = 4 * time.Minute // create, pause, resume, snapshot
	forkWait  = 7 * time.Minute
)

// decode reads a JSON body of at most limit bytes into v. An empty body is
// an empty object.
func decode(w http.ResponseWriter, r *http.Request, limit int64, v any) error {
	body := http.MaxBytesReader(w, r.Body, limit)
	data, err := io.ReadAll(body)
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return badRequest("request body over %d bytes", limit)
		}
		return badRequest("read request body: %v", err)
	}
	if len(data) == 0 {
		return nil
	}
	if err := json.Unmarshal(data, v); err != nil {
		return badRequest("request body: %v", err)
	}
	return nil
}

// httpError is an error with the status it is answered with.
type httpError struct {
	status int
	msg    string
}

func (e *httpError) Error() string { return e.msg }

func badRequest(format string, a ...any) error {
	return &httpError{status: http.StatusBadRequest, msg: fmt.Sprintf(format, a...)}
}

func notFound(format string, a ...any) error {
	return &httpError{status: http.StatusNotFound, msg: fmt.Sprintf(format, a...)}
}

func conflict(format string, a ...any) error {
	return &httpError{status: http.StatusConflict, msg: fmt.Sprintf(format, a...)}
}

func unsupported(format string, a ...any) error {
	return &httpError{status: http.StatusNotImplemented, msg: fmt.Sprintf(format, a...)}
}

// statusOf maps an error to E2B's status and message: the contract's codes
// to their HTTP statuses (capacity_rejected is 429, which the SDK turns
// into a RateLimitError; disk_pressure 503, a ServiceBusyError), anything
// else to 500.
func statusOf(err error) (int, string) {
	var he *httpError
	if errors.As(err, &he) {
		return he.status, he.msg
	}
	var ce *client.Error
	if errors.As(err, &ce) {
		switch ce.Code {
		case subjects.CodeInvalidRequest:
			return http.StatusBadRequest, ce.Message
		case subjects.CodeSandboxNotFound:
			return http.StatusNotFound, "sandbox not found"
		case subjects.CodeSnapshotNotFound:
			return http.StatusNotFound, ce.Message
		case subjects.CodeConflict:
			return http.StatusConflict, ce.Message
		case subjects.CodeCapacityRejected:
			return http.StatusTooManyRequests, ce.Message
		case subjects.CodeDiskPressure:
			return http.StatusServiceUnavailable, ce.Message
		case subjects.CodeUnsupported:
			return http.StatusNotImplemented, ce.Message
		case subjects.CodeTimeout:
			return http.StatusGatewayTimeout, ce.Message
		case subjects.CodePermissionDenied:
			return http.StatusForbidden, ce.Message
		}
		return http.StatusInternalServerError, ce.Message
	}
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return http.StatusGatewayTimeout, "the workers did not answer in time"
	case errors.Is(err, errdefs.ErrInvalidArgument):
		return http.StatusBadRequest, err.Error()
	case errors.Is(err, errdefs.ErrNotFound):
		return http.StatusNotFound, err.Error()
	}
	return http.StatusInternalServerError, "internal error"
}

// fail answers err in E2B's shape and logs server-side failures.
func (s *Server) fail(w http.ResponseWriter, r *http.Request, err error) {
	status, msg := statusOf(err)
	if status >= 500 {
		s.log.Warn("e2b api request failed", "method", r.Method, "path", r.URL.Path, "status", status, "err", err)
	}
	writeError(w, status, msg)
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, apiError{Code: status, Message: msg})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// tokenCache keeps the access tokens of the sandboxes this server
// created, so that connect and get can hand them back (the workers tell
// them only in the create reply). Bounded; a sandbox it forgot (or one
// created through another server) is connected without them.
type tokenCache struct {
	mu  sync.Mutex
	max int
	m   map[string]sandboxTokens
}

type sandboxTokens struct {
	envd, traffic, generation string
}

const maxCachedTokens = 4096

func (c *tokenCache) put(sb subjects.Sandbox) {
	if sb.EnvdAccessToken == "" && sb.TrafficAccessToken == "" {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[string]sandboxTokens{}
	}
	for id := range c.m {
		if len(c.m) < c.max {
			break
		}
		delete(c.m, id)
	}
	c.m[sb.SandboxID] = sandboxTokens{envd: sb.EnvdAccessToken, traffic: sb.TrafficAccessToken, generation: sb.Generation}
}

// get returns the tokens of sb's instance (none for another instance
// with the same id).
func (c *tokenCache) get(sb subjects.Sandbox) sandboxTokens {
	c.mu.Lock()
	defer c.mu.Unlock()
	t, ok := c.m[sb.SandboxID]
	if !ok || (sb.Generation != "" && t.generation != "" && t.generation != sb.Generation) {
		return sandboxTokens{}
	}
	return t
}

func (c *tokenCache) drop(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, id)
}
