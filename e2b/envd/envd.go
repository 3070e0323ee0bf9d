// Package envd serves E2B's sandbox API ("envd") in the worker: what the
// official E2B SDK (npm e2b 2.51.0) reaches at port 49983 of a sandbox,
// through the port proxy (proxy.WithLocalPort), by Host
// 49983-<id>.<domain> or by the E2b-Sandbox-Id/E2b-Sandbox-Port headers.
// Guests run no daemon for it: every call is translated to the worker's
// NATS API (proc.* and fs.* subjects) through package client, on an
// in-process connection with client permissions.
//
// It serves, with the SDK's wire format (proto/ follows the SDK's own file
// descriptors; gen/ is generated from it by `make proto`):
//
//   - the Connect services process.Process (Start, Connect, List,
//     SendInput, StreamInput, SendSignal, Update for a PTY resize,
//     CloseStdin) and filesystem.Filesystem (Stat, MakeDir, Move, ListDir,
//     Remove, WatchDir, CreateWatcher, GetWatcherEvents, RemoveWatcher),
//     through connectrpc.com/connect (Connect with JSON or binary, gRPC and
//     gRPC-web);
//   - GET /files (download) and POST /files (multipart or octet-stream
//     upload), GET /health, GET /envs and GET /metrics.
//
// Access: a secure sandbox (created with secure) takes only requests whose
// X-Access-Token is its envd access token (compared in constant time), or,
// for /files, a signature made with it (the SDK's signed URLs). A sandbox
// that is not secure wants its traffic access token (in X-Access-Token or
// e2b-traffic-access-token), whether its traffic is public or not: public
// traffic opens the ports the guest serves, not a way to run commands in
// it (E2B's API always makes secure sandboxes). /health is open. The proxy's own traffic
// token check does not apply to this port: the SDK never sends that
// header to envd.
//
// The user of a call is the SDK's Authorization: Basic <user:> (default
// DefaultUser); relative paths are resolved against that user's home
// (/root for root, /home/<user> otherwise).
package envd

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/e2b/envd/gen/filesystem/filesystemconnect"
	"github.com/firkin-dev/firkin-worker/e2b/envd/gen/process/processconnect"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/proxy"
	"github.com/firkin-dev/firkin-worker/tokens"
)

// Port is the sandbox port the E2B SDK reaches envd at.
const Port = 49983

// Version is the envd version this package speaks as; the control API
// reports it as a sandbox's envdVersion (the SDK turns features on by it:
// CloseStdin from 0.5.2, octet-stream uploads from 0.5.7).
const Version = "0.5.7"

// Headers of the sandbox API.
const (
	AccessTokenHeader   = "X-Access-Token"
	keepalivePingHeader = "Keepalive-Ping-Interval"
)

// Bounds.
const (
	// DefaultMaxUploadBytes bounds one /files upload request (all its
	// files).
	DefaultMaxUploadBytes = 4 << 30
	// maxWatchersPerSandbox bounds CreateWatcher's watchers of one sandbox.
	maxWatchersPerSandbox = 16
	// maxWatchers bounds CreateWatcher's watchers of the worker, and
	// watcherIdle ends one nobody polled for that long.
	maxWatchers = 1024
	watcherIdle = 10 * time.Minute
	// maxWatcherEvents bounds the events a watcher keeps between
	// GetWatcherEvents calls (older ones are dropped).
	maxWatcherEvents = 1024
	// defaultKeepalive is the keepalive interval of streams when the
	// client names none.
	defaultKeepalive = 50 * time.Second
)

// Access is what the sandbox API needs to know about a sandbox to admit a
// request.
type Access struct {
	// Secure sandboxes take only EnvdToken.
	Secure bool
	// EnvdToken is the secure sandbox's envd access token.
	EnvdToken string
	// Public is the sandbox's public_traffic (it does not open the
	// sandbox API: a sandbox that is not secure wants its traffic token).
	Public bool
	// VerifyTraffic checks the traffic access token of a sandbox that is
	// not secure.
	VerifyTraffic func(token string) bool
}

// Config configures a Server.
type Config struct {
	// Client reaches the worker's NATS API with client permissions (its
	// connection's inbox prefix must be one the worker publishes process
	// output to: _INBOX. by default).
	Client *client.Client
	// Access returns how a sandbox admits requests; errdefs.ErrNotFound
	// for an unknown sandbox.
	Access func(ctx context.Context, sandboxID string) (Access, error)
	// DefaultUser runs calls that name no user ("user", as E2B).
	DefaultUser string
	// MaxUploadBytes bounds one upload request (DefaultMaxUploadBytes).
	MaxUploadBytes int64
	Logger         *slog.Logger
}

// Server is the sandbox API, an http.Handler mounted on the proxy with
// proxy.WithLocalPort(envd.Port, srv). Close it when the worker stops.
type Server struct {
	cfg Config
	log *slog.Logger
	mux *http.ServeMux

	mu       sync.Mutex
	watchers map[string]*watcher // by watcher id
	// pendingWatchers counts, by sandbox, the CreateWatcher calls making
	// a watch (pendingTotal all of them): they count against the bounds.
	pendingWatchers map[string]int
	pendingTotal    int
	closed          bool
}

var _ http.Handler = (*Server)(nil)

// New makes a Server.
func New(cfg Config) (*Server, error) {
	if cfg.Client == nil || cfg.Access == nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, errors.New("envd: client and access are required"))
	}
	if cfg.DefaultUser == "" {
		cfg.DefaultUser = "user"
	}
	if err := validateUser(cfg.DefaultUser); err != nil {
		return nil, err
	}
	if cfg.MaxUploadBytes <= 0 {
		cfg.MaxUploadBytes = DefaultMaxUploadBytes
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{cfg: cfg, log: cfg.Logger.With("component", "envd"), mux: http.NewServeMux(), watchers: map[string]*watcher{}}
	opts := []connect.HandlerOption{connect.WithReadMaxBytes(8 << 20)}
	s.mux.Handle(processconnect.NewProcessHandler(&processService{s: s}, opts...))
	s.mux.Handle(filesystemconnect.NewFilesystemHandler(&filesystemService{s: s}, opts...))
	s.mux.HandleFunc("GET /files", s.download)
	s.mux.HandleFunc("POST /files", s.upload)
	s.mux.HandleFunc("GET /envs", s.envs)
	s.mux.HandleFunc("GET /metrics", s.metrics)
	return s, nil
}

// Close ends every watcher.
func (s *Server) Close() {
	s.mu.Lock()
	ws := s.watchers
	s.watchers, s.closed = map[string]*watcher{}, true
	s.mu.Unlock()
	for _, w := range ws {
		_ = w.w.Close()
	}
}

// sandboxKey keys the request's sandbox id in its context.
type sandboxKey struct{}

// sandboxOf returns the id of the sandbox a request is for.
func sandboxOf(ctx context.Context) string {
	id, _ := ctx.Value(sandboxKey{}).(string)
	return id
}

// ServeHTTP admits a request to a sandbox's API and serves it.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rt, ok := proxy.LocalRoute(r.Context())
	if !ok {
		httpError(w, http.StatusBadRequest, "no sandbox in the request")
		return
	}
	if r.URL.Path == "/health" {
		w.WriteHeader(http.StatusNoContent)
		return
	}
	acc, err := s.cfg.Access(r.Context(), rt.SandboxID)
	if err != nil {
		if errors.Is(err, errdefs.ErrNotFound) {
			httpError(w, http.StatusBadGateway, fmt.Sprintf("sandbox %s not found", rt.SandboxID))
			return
		}
		httpError(w, http.StatusBadGateway, fmt.Sprintf("sandbox %s cannot be reached", rt.SandboxID))
		return
	}
	r, status, msg := s.admitRequest(r, acc)
	if status != 0 {
		httpError(w, status, msg)
		return
	}
	ctx := context.WithValue(r.Context(), sandboxKey{}, rt.SandboxID)
	s.mux.ServeHTTP(w, r.WithContext(ctx))
}

// signedKey marks, in a request's context, a request admitted by its
// /files signature rather than by a token.
type signedKey struct{}

// admitRequest is admit, and marks a request it admitted by signature: the
// signature names the user (the username parameter, none for the default
// user), so Authorization must not pick another one.
func (s *Server) admitRequest(r *http.Request, acc Access) (*http.Request, int, string) {
	status, msg := s.admit(r, acc)
	if status == 0 && acc.Secure && r.Header.Get(AccessTokenHeader) == "" {
		r = r.WithContext(context.WithValue(r.Context(), signedKey{}, true))
	}
	return r, status, msg
}

// signedRequest reports whether r was admitted by its signature.
func signedRequest(r *http.Request) bool {
	signed, _ := r.Context().Value(signedKey{}).(bool)
	return signed
}

var _ proxy.RouteFailer = (*Server)(nil)

// FailRoute answers a request for a sandbox the proxy could not resolve
// as E2B's proxy does: an unknown sandbox (404) or one not running (503)
// is 502, which the SDK reads as a sandbox that is not running (isRunning
// false, SandboxNotFoundError or TimeoutError, not a Connect
// "unimplemented" for a 404); other failures keep their status. The body
// is envd's JSON error.
func (s *Server) FailRoute(w http.ResponseWriter, _ *http.Request, _ proxy.Route, status int, msg string) {
	if status == http.StatusNotFound || status == http.StatusServiceUnavailable {
		status = http.StatusBadGateway
	}
	httpError(w, status, msg)
}

// admit checks a request's token; 0 admits it.
func (s *Server) admit(r *http.Request, acc Access) (int, string) {
	tok := r.Header.Get(AccessTokenHeader)
	switch {
	case acc.Secure:
		if tok != "" {
			if tokens.Equal(tok, acc.EnvdToken) {
				return 0, ""
			}
			return http.StatusUnauthorized, "invalid access token"
		}
		if r.URL.Path == "/files" && r.URL.Query().Get("signature") != "" {
			if err := checkSignature(r, acc.EnvdToken, time.Now()); err != nil {
				return http.StatusUnauthorized, err.Error()
			}
			return 0, ""
		}
		return http.StatusUnauthorized, "missing access token (X-Access-Token)"
	default:
		// Not secure: the traffic access token, public traffic or not. A
		// public sandbox's ports are open to anyone who knows its id (a
		// web preview shows it); this port runs commands as any user, so
		// public traffic alone must not open it.
		if tok == "" {
			tok = r.Header.Get(proxy.TrafficTokenHeader)
		}
		if tok != "" && acc.VerifyTraffic != nil && acc.VerifyTraffic(tok) {
			return 0, ""
		}
		return http.StatusUnauthorized, "sandbox not secure: missing or invalid traffic access token (X-Access-Token)"
	}
}

// checkSignature checks the SDK's signed /files URL: signature is "v1_" and
// the unpadded base64 of SHA-256 of path:operation:user:token, with
// :expiration appended when signature_expiration (Unix seconds) is set.
func checkSignature(r *http.Request, token string, now time.Time) error {
	q := r.URL.Query()
	op := "read"
	if r.Method == http.MethodPost {
		op = "write"
	}
	raw := q.Get("path") + ":" + op + ":" + q.Get("username") + ":" + token
	if exp := q.Get("signature_expiration"); exp != "" {
		n, err := strconv.ParseInt(exp, 10, 64)
		if err != nil {
			return errors.New("invalid signature expiration")
		}
		if now.Unix() > n {
			return errors.New("signature expired")
		}
		raw += ":" + exp
	}
	sum := sha256.Sum256([]byte(raw))
	want := "v1_" + strings.TrimRight(base64.StdEncoding.EncodeToString(sum[:]), "=")
	if token == "" || !tokens.Equal(q.Get("signature"), want) {
		return errors.New("invalid signature")
	}
	return nil
}

// httpError answers an error the way envd does: JSON {"code","message"}.
func httpError(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{"code": status, "message": msg})
}

// keepaliveEvery is the keepalive interval a stream's client asked for in
// Keepalive-Ping-Interval (seconds; 5..300), or the default.
func keepaliveEvery(h http.Header) time.Duration {
	if n, err := strconv.Atoi(h.Get(keepalivePingHeader)); err == nil && n >= 5 && n <= 300 {
		return time.Duration(n) * time.Second
	}
	return defaultKeepalive
}
