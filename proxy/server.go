package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"strconv"
	"sync"
	"time"

	"golang.org/x/net/netutil"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// Server is the HTTP port-routing proxy. Construct it with NewServer, then
// Start (or Serve a listener), and Shutdown when done. It is also an
// http.Handler, so it can be mounted in another server.
type Server struct {
	resolver Resolver
	opts     options
	log      *slog.Logger
	rp       *httputil.ReverseProxy
	http     *http.Server
	conns    connSet      // streams to guests and tunnels' client conns, by sandbox
	inFlight sandboxLimit // requests and tunnels in flight, by sandbox
	streams  sandboxLimit // streams to guests open, idle keep-alive ones included

	tmu        sync.Mutex
	transports map[string]*http.Transport // keep-alive pools, by sandbox

	mu      sync.Mutex
	ln      net.Listener
	serving bool
	done    chan struct{} // closed when Serve returns
}

var _ http.Handler = (*Server)(nil)

// Limits of the client side of the HTTP server that are not options: a
// keep-alive connection with no request is closed after clientIdleTimeout,
// and a request's headers may not exceed maxHeaderBytes. A sandbox keeps at
// most maxIdlePerSandbox idle keep-alive streams over all its ports (fewer
// when its connection cap is lower).
const (
	clientIdleTimeout = 2 * time.Minute
	maxHeaderBytes    = 64 << 10
	maxIdlePerSandbox = 16
)

// NewServer makes a proxy that finds sandboxes through r. It takes
// WithDomain, WithLogger, WithDialTimeout, WithMaxIdlePerRoute,
// WithIdleTimeout, WithMaxConnsPerSandbox, WithStreamIdleTimeout,
// WithReadHeaderTimeout and WithMaxClientConns.
//
// Every stream to a guest, idle keep-alive ones included, counts against
// the sandbox's connection cap: when a new one would pass it, the
// sandbox's idle streams are closed first, and the request is answered 429
// only when that is not enough.
//
// The HTTP server has no read or write timeout for a whole request: an
// upload, a server-sent event stream or a WebSocket lasts as long as it
// carries data. The stream idle timeout ends one that went quiet.
func NewServer(r Resolver, opts ...Option) (*Server, error) {
	if r == nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, errors.New("proxy: server: nil resolver"))
	}
	o, err := buildOptions("server", opts)
	if err != nil {
		return nil, err
	}
	s := &Server{resolver: r, opts: o, log: o.log.With("component", "proxy"), done: make(chan struct{})}
	s.conns.idle = o.streamIdleTimeout
	s.inFlight.max = o.maxConnsPerSandbox
	s.streams.max = o.maxConnsPerSandbox
	s.transports = make(map[string]*http.Transport)
	s.rp = &httputil.ReverseProxy{
		Rewrite:       s.rewrite,
		Transport:     roundTripperFunc(s.roundTrip),
		FlushInterval: -1, // flush every write: server-sent events stream
		ErrorLog:      slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
		ErrorHandler:  s.proxyError,
	}
	s.http = &http.Server{
		Handler:           s,
		ReadHeaderTimeout: o.readHeaderTimeout,
		IdleTimeout:       clientIdleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	return s, nil
}

// roundTripperFunc adapts a function to http.RoundTripper.
type roundTripperFunc func(*http.Request) (*http.Response, error)

// RoundTrip calls f.
func (f roundTripperFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// roundTrip sends an outbound request through its sandbox's transport.
func (s *Server) roundTrip(r *http.Request) (*http.Response, error) {
	dt, _ := r.Context().Value(ctxKey{}).(*dialTarget)
	if dt == nil {
		return nil, errdefs.Wrap(errdefs.ErrInternalFailure, errors.New("proxy: no route in the request"))
	}
	return s.transport(dt.route.SandboxID, true).RoundTrip(r)
}

// transport returns the keep-alive pool of a sandbox, made when create is
// set and there is none; nil otherwise. Each sandbox has its own, so that
// its idle streams can be closed without touching other sandboxes'.
func (s *Server) transport(id string, create bool) *http.Transport {
	s.tmu.Lock()
	defer s.tmu.Unlock()
	tr := s.transports[id]
	if tr == nil && create {
		maxIdle := min(maxIdlePerSandbox, s.opts.maxConnsPerSandbox)
		tr = &http.Transport{
			Proxy:                 nil, // never an environment proxy
			DialContext:           s.dialGuest,
			MaxIdleConns:          maxIdle, // over all of the sandbox's ports
			MaxIdleConnsPerHost:   min(s.opts.maxIdlePerRoute, maxIdle),
			DisableKeepAlives:     s.opts.maxIdlePerRoute == 0,
			IdleConnTimeout:       s.opts.idleTimeout,
			DisableCompression:    true, // pass bodies through as they are
			ExpectContinueTimeout: time.Second,
		}
		s.transports[id] = tr
	}
	return tr
}

// takeStream takes one of sandbox id's stream slots for a new stream to the
// guest. When they are all taken, it closes the sandbox's idle keep-alive
// streams and tries again; false when that did not free one.
func (s *Server) takeStream(id string) bool {
	if s.streams.acquire(id) {
		return true
	}
	if tr := s.transport(id, false); tr != nil {
		tr.CloseIdleConnections() // their onClose gives their slots back
	}
	return s.streams.acquire(id)
}

// trackStream tracks a new stream to sandbox id's guest, holding a slot
// taken by takeStream until it is closed.
func (s *Server) trackStream(id string, c net.Conn) (*trackedConn, error) {
	return s.conns.track(id, c, func() { s.streams.release(id) })
}

// streamCapError is the error of a stream the sandbox's cap refuses.
func (s *Server) streamCapError(rt Route) error {
	return &dialError{route: rt, err: errdefs.Wrap(errdefs.ErrCapacity,
		fmt.Errorf("sandbox has %d streams to the guest open, the most allowed", s.opts.maxConnsPerSandbox))}
}

// Domain returns the domain route host names end with.
func (s *Server) Domain() string { return s.opts.domain }

// Start listens on addr (host:port; port 0 picks one) and serves in the
// background until Shutdown. ctx bounds the listen only.
func (s *Server) Start(ctx context.Context, addr string) error {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return errdefs.Wrap(errdefs.ErrInternalFailure, fmt.Errorf("proxy: listen %s: %w", addr, err))
	}
	if err := s.claim(ln); err != nil {
		_ = ln.Close()
		return err
	}
	go func() {
		if err := s.serve(ln); err != nil {
			s.log.Error("proxy stopped serving", "addr", ln.Addr().String(), "err", err)
		}
	}()
	s.log.Info("proxy listening", "addr", ln.Addr().String(), "domain", s.opts.domain)
	return nil
}

// Serve serves on ln until Shutdown, then returns nil. A Server serves one
// listener.
func (s *Server) Serve(ln net.Listener) error {
	if err := s.claim(ln); err != nil {
		return err
	}
	return s.serve(ln)
}

// claim records ln as the one listener.
func (s *Server) claim(ln net.Listener) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.serving {
		return errdefs.Wrap(errdefs.ErrFailedPrecondition, errors.New("proxy: server already started"))
	}
	s.serving, s.ln = true, ln
	return nil
}

// serve runs the HTTP server on ln.
func (s *Server) serve(ln net.Listener) error {
	defer close(s.done)
	err := s.http.Serve(netutil.LimitListener(ln, s.opts.maxClientConns))
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return errdefs.Wrap(errdefs.ErrInternalFailure, fmt.Errorf("proxy: serve: %w", err))
}

// Addr returns the listening address, or nil before Start or Serve.
func (s *Server) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln == nil {
		return nil
	}
	return s.ln.Addr()
}

// Shutdown stops accepting, waits for requests in flight until ctx ends
// (a long stream, such as server-sent events, holds it to ctx's end), then
// closes every remaining connection, WebSockets included. It can be called
// more than once.
func (s *Server) Shutdown(ctx context.Context) error {
	err := s.http.Shutdown(ctx)
	if err != nil {
		_ = s.http.Close()
		err = errdefs.Wrap(errdefs.ErrTimeout, fmt.Errorf("proxy: shutdown: %w", err))
	}
	s.conns.closeAll() // ends upgraded (hijacked) conns, which Shutdown leaves alone
	s.tmu.Lock()
	for _, tr := range s.transports {
		tr.CloseIdleConnections()
	}
	s.tmu.Unlock()
	s.mu.Lock()
	serving := s.serving
	s.mu.Unlock()
	if serving {
		select {
		case <-s.done:
		case <-ctx.Done():
		}
	}
	return err
}

// CloseSandbox closes every stream the proxy holds open to a sandbox: idle
// keep-alive conns as well as requests and WebSockets in flight. Call it
// when the sandbox goes away.
func (s *Server) CloseSandbox(sandboxID string) {
	s.tmu.Lock()
	tr := s.transports[sandboxID]
	delete(s.transports, sandboxID)
	s.tmu.Unlock()
	if tr != nil {
		tr.CloseIdleConnections()
	}
	s.conns.closeSandbox(sandboxID)
}

// RouteReply builds the reply to firkin.sandbox.<id>.route for a route
// through this proxy, with tcpAddr the route's raw TCP address (from
// TCPRoutes.Open; may be empty).
func (s *Server) RouteReply(r Route, tcpAddr string) subjects.RouteReply {
	addr := ""
	if a := s.Addr(); a != nil {
		addr = a.String()
	}
	return NewRouteReply(r, s.opts.domain, addr, tcpAddr)
}

// RouteOf returns the route a request asks for: by Host when it is a name
// under the domain, by the e2b-sandbox-id/e2b-sandbox-port headers
// otherwise. Errors are classed errdefs.ErrInvalidArgument.
func (s *Server) RouteOf(r *http.Request) (Route, error) {
	rt, ok, err := ParseHost(r.Host, s.opts.domain)
	if err != nil {
		return Route{}, err
	}
	if ok {
		return rt, nil
	}
	return RouteFromHeaders(r.Header)
}

// ctxKey keys the request's dial target in its context.
type ctxKey struct{}

// dialTarget is what the transport's dial needs: which route and how.
type dialTarget struct {
	route Route
	dial  func(ctx context.Context, port int) (net.Conn, error)
}

// ServeHTTP routes one request: find the route, resolve the sandbox, check
// the token and the sandbox's connection cap, forward.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rt, err := s.RouteOf(r)
	if err != nil {
		s.fail(w, r, http.StatusBadRequest, "bad route: "+err.Error())
		return
	}
	target, err := s.resolver.Resolve(r.Context(), rt.SandboxID)
	if err != nil {
		status, msg := resolveFailure(rt, err)
		if f, ok := s.opts.localPorts[rt.Port].(RouteFailer); ok {
			s.log.Debug("proxy: local port of an unresolved sandbox", "sandbox", rt.SandboxID, "status", status, "err", err)
			f.FailRoute(w, r, rt, status, msg)
			return
		}
		s.fail(w, r, status, msg, "sandbox", rt.SandboxID, "err", err)
		return
	}
	if h := s.opts.localPorts[rt.Port]; h != nil {
		s.serveLocal(w, r, rt, h)
		return
	}
	if !target.Public {
		tok := r.Header.Get(TrafficTokenHeader)
		if tok == "" {
			s.fail(w, r, http.StatusUnauthorized,
				fmt.Sprintf("sandbox %s is private: missing e2b-traffic-access-token header", rt.SandboxID))
			return
		}
		if target.VerifyToken == nil || !target.VerifyToken(tok) {
			s.fail(w, r, http.StatusForbidden,
				fmt.Sprintf("wrong e2b-traffic-access-token for sandbox %s", rt.SandboxID))
			return
		}
	}
	if target.Dial == nil {
		s.fail(w, r, http.StatusBadGateway, fmt.Sprintf("sandbox %s cannot be reached", rt.SandboxID), "err", "resolver returned no Dial")
		return
	}
	if !s.admitConn(w, r, rt) {
		return
	}
	defer s.inFlight.release(rt.SandboxID)
	if r.Method == http.MethodConnect {
		s.tunnel(w, r, rt, target)
		return
	}
	ctx := context.WithValue(r.Context(), ctxKey{}, &dialTarget{route: rt, dial: target.Dial})
	s.rp.ServeHTTP(w, r.WithContext(ctx))
}

// localRouteKey keys the route of a request to a local port.
type localRouteKey struct{}

// LocalRoute returns the route of a request a WithLocalPort handler
// serves: the sandbox id and the port.
func LocalRoute(ctx context.Context) (Route, bool) {
	rt, ok := ctx.Value(localRouteKey{}).(Route)
	return rt, ok
}

// RouteFailer is an optional interface of a WithLocalPort handler: it
// answers, in its own protocol's way, the requests for a sandbox the proxy
// could not resolve (status and msg are what the proxy would answer: 404
// unknown, 503 not running, ...), instead of the proxy's plain-text error.
type RouteFailer interface {
	FailRoute(w http.ResponseWriter, r *http.Request, rt Route, status int, msg string)
}

// admitConn takes one of the sandbox's connection slots, or answers 429
// and reports false when it has none left.
func (s *Server) admitConn(w http.ResponseWriter, r *http.Request, rt Route) bool {
	if s.inFlight.acquire(rt.SandboxID) {
		return true
	}
	w.Header().Set("Retry-After", "1")
	s.fail(w, r, http.StatusTooManyRequests,
		fmt.Sprintf("sandbox %s has %d connections through the proxy open, the most allowed; retry when one ends", rt.SandboxID, s.opts.maxConnsPerSandbox))
	return false
}

// serveLocal hands a request to a local port's handler, within the
// sandbox's cap on requests in flight.
func (s *Server) serveLocal(w http.ResponseWriter, r *http.Request, rt Route, h http.Handler) {
	if !s.admitConn(w, r, rt) {
		return
	}
	defer s.inFlight.release(rt.SandboxID)
	h.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), localRouteKey{}, rt)))
}

// tunnel answers a CONNECT request with a raw stream to the guest port, for
// protocols other than HTTP (curl -p, ssh's ProxyCommand through an HTTP
// proxy). The authority names the route like a Host (its port is ignored).
func (s *Server) tunnel(w http.ResponseWriter, r *http.Request, rt Route, target Target) {
	if !s.takeStream(rt.SandboxID) {
		s.proxyError(w, r, s.streamCapError(rt))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), s.opts.dialTimeout)
	guest, err := target.Dial(ctx, rt.Port)
	timedOut := ctx.Err() != nil
	cancel()
	if err != nil {
		s.streams.release(rt.SandboxID)
		if timedOut {
			err = errdefs.Wrap(errdefs.ErrTimeout, err)
		}
		s.proxyError(w, r, &dialError{route: rt, err: err})
		return
	}
	gc, err := s.trackStream(rt.SandboxID, guest)
	if err != nil {
		s.fail(w, r, http.StatusServiceUnavailable, "proxy shutting down")
		return
	}
	client, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		_ = gc.Close()
		s.fail(w, r, http.StatusInternalServerError, "CONNECT is not supported on this connection", "err", err)
		return
	}
	// The tunnel is bounded by the stream idle timeout, not by the
	// server's request deadlines.
	_ = client.SetDeadline(time.Time{})
	if _, err := io.WriteString(client, "HTTP/1.1 200 Connection Established\r\n\r\n"); err != nil {
		_ = gc.Close()
		_ = client.Close()
		return
	}
	if n := brw.Reader.Buffered(); n > 0 {
		// Bytes the client sent right after the CONNECT request.
		early, _ := brw.Reader.Peek(n)
		if _, err := gc.Write(early); err != nil {
			_ = gc.Close()
			_ = client.Close()
			return
		}
	}
	cc, err := s.conns.track(rt.SandboxID, client, nil)
	if err != nil {
		_ = gc.Close()
		return
	}
	pipe(cc, gc)
}

// rewrite points the outbound request at the route. The URL's host is the
// route's first label, so the transport keeps a keep-alive pool per
// (sandbox, port); the Host header stays as the client sent it.
func (s *Server) rewrite(pr *httputil.ProxyRequest) {
	dt, _ := pr.In.Context().Value(ctxKey{}).(*dialTarget)
	pr.Out.URL.Scheme = "http"
	if dt != nil {
		pr.Out.URL.Host = dt.route.String()
	}
	pr.Out.Host = pr.In.Host
	pr.SetXForwarded()
	pr.Out.Header.Del(TrafficTokenHeader)
}

// dialError marks a failure to open a stream to the guest port.
type dialError struct {
	route Route
	err   error
}

func (e *dialError) Error() string {
	return fmt.Sprintf("proxy: dial port %d of sandbox %s: %v", e.route.Port, e.route.SandboxID, e.err)
}

func (e *dialError) Unwrap() error { return e.err }

// dialGuest is the transport's DialContext: it opens a stream to the route
// carried in ctx (the request's values survive into the dial context),
// within the sandbox's cap on streams.
func (s *Server) dialGuest(ctx context.Context, _, addr string) (net.Conn, error) {
	dt, _ := ctx.Value(ctxKey{}).(*dialTarget)
	if dt == nil || addr != dt.route.String()+":80" {
		return nil, errdefs.Wrap(errdefs.ErrInternalFailure, fmt.Errorf("proxy: dial %s: no route in the request", addr))
	}
	if !s.takeStream(dt.route.SandboxID) {
		return nil, s.streamCapError(dt.route)
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.dialTimeout)
	defer cancel()
	c, err := dt.dial(ctx, dt.route.Port)
	if err != nil {
		s.streams.release(dt.route.SandboxID)
		if ctx.Err() != nil && !errors.Is(err, errdefs.ErrTimeout) {
			err = errdefs.Wrap(errdefs.ErrTimeout, err)
		}
		return nil, &dialError{route: dt.route, err: err}
	}
	tc, err := s.trackStream(dt.route.SandboxID, c)
	if err != nil {
		return nil, &dialError{route: dt.route, err: err}
	}
	return tc, nil
}

// proxyError answers a request the transport could not carry.
func (s *Server) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	var rt Route
	if dt, _ := r.Context().Value(ctxKey{}).(*dialTarget); dt != nil {
		rt = dt.route
	}
	var de *dialError
	if errors.As(err, &de) {
		rt = de.route
	}
	switch {
	case errors.As(err, &de) && errors.Is(err, errdefs.ErrCapacity):
		w.Header().Set("Retry-After", "1")
		s.fail(w, r, http.StatusTooManyRequests,
			fmt.Sprintf("sandbox %s has %d connections through the proxy open, the most allowed; retry when one ends", rt.SandboxID, s.opts.maxConnsPerSandbox), "err", err)
	case errors.As(err, &de) && errors.Is(err, errdefs.ErrTimeout):
		s.fail(w, r, http.StatusGatewayTimeout,
			fmt.Sprintf("timed out reaching port %d in sandbox %s", rt.Port, rt.SandboxID), "err", err)
	case errors.As(err, &de):
		s.fail(w, r, http.StatusBadGateway,
			fmt.Sprintf("nothing listening on port %d in sandbox %s", rt.Port, rt.SandboxID), "err", err)
	case r.Context().Err() != nil:
		// The client went away; nobody reads the answer.
		w.WriteHeader(http.StatusBadGateway)
	default:
		s.fail(w, r, http.StatusBadGateway,
			fmt.Sprintf("no HTTP answer from port %d in sandbox %s", rt.Port, rt.SandboxID), "err", err)
	}
}

// resolveFailure maps a Resolve error to a status and a client message.
// Internal details stay in the log.
func resolveFailure(rt Route, err error) (int, string) {
	switch {
	case errors.Is(err, errdefs.ErrNotFound):
		return http.StatusNotFound, fmt.Sprintf("sandbox %s not found", rt.SandboxID)
	case errors.Is(err, errdefs.ErrInvalidArgument):
		return http.StatusBadRequest, "bad route: " + err.Error()
	case errors.Is(err, errdefs.ErrTimeout):
		return http.StatusGatewayTimeout, fmt.Sprintf("timed out finding sandbox %s", rt.SandboxID)
	case errors.Is(err, errdefs.ErrFailedPrecondition):
		return http.StatusServiceUnavailable, fmt.Sprintf("sandbox %s is not running", rt.SandboxID)
	default:
		return http.StatusBadGateway, fmt.Sprintf("sandbox %s cannot be reached", rt.SandboxID)
	}
}

// fail writes a plain-text error answer and logs it at debug level.
func (s *Server) fail(w http.ResponseWriter, r *http.Request, status int, msg string, logArgs ...any) {
	s.log.Debug("proxy request refused", append([]any{"status", status, "host", r.Host, "path", r.URL.Path, "msg", msg}, logArgs...)...)
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Content-Length", strconv.Itoa(len(msg)+1))
	w.WriteHeader(status)
	_, _ = w.Write([]byte(msg + "\n"))
}
