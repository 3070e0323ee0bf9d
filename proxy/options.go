package proxy

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// Defaults of the options.
const (
	DefaultDialTimeout         = 10 * time.Second
	DefaultMaxIdlePerRoute     = 4
	DefaultIdleTimeout         = 30 * time.Second
	DefaultTCPHost             = "127.0.0.1"
	DefaultMaxRoutesPerSandbox = 16
	DefaultMaxConnsPerSandbox  = 64
	DefaultStreamIdleTimeout   = 10 * time.Minute
	DefaultReadHeaderTimeout   = 10 * time.Second
	DefaultMaxClientConns      = 4096
)

// options configure a Server or TCPRoutes; each takes the ones it uses.
type options struct {
	domain              string
	log                 *slog.Logger
	dialTimeout         time.Duration
	maxIdlePerRoute     int
	idleTimeout         time.Duration
	tcpHost             string
	maxRoutesPerSandbox int
	maxConnsPerSandbox  int
	streamIdleTimeout   time.Duration
	readHeaderTimeout   time.Duration
	maxClientConns      int
	localPorts          map[int]http.Handler
}

// Option configures a Server or TCPRoutes.
type Option func(*options) error

// WithDomain sets the domain route host names end with (Server; default
// "localhost").
func WithDomain(domain string) Option {
	return func(o *options) error {
		d := strings.TrimSuffix(strings.ToLower(domain), ".")
		if d == "" || net.ParseIP(d) != nil || !validDomain(d) {
			return fmt.Errorf("domain %q: want a DNS name", domain)
		}
		o.domain = d
		return nil
	}
}

// WithLogger sets the logger (default: slog.Default()).
func WithLogger(l *slog.Logger) Option {
	return func(o *options) error {
		if l == nil {
			return errors.New("nil logger")
		}
		o.log = l
		return nil
	}
}

// WithDialTimeout bounds how long opening a stream to a guest port may take
// (default 10s).
func WithDialTimeout(d time.Duration) Option {
	return func(o *options) error {
		if d <= 0 {
			return fmt.Errorf("dial timeout %v: want > 0", d)
		}
		o.dialTimeout = d
		return nil
	}
}

// WithMaxIdlePerRoute sets how many idle keep-alive conns the HTTP proxy
// keeps per (sandbox, port) (Server; default 4). A sandbox keeps at most 16
// over all its ports, and they count against WithMaxConnsPerSandbox. 0
// turns keep-alive to the guest off: one stream per request.
func WithMaxIdlePerRoute(n int) Option {
	return func(o *options) error {
		if n < 0 {
			return fmt.Errorf("max idle per route %d: want >= 0", n)
		}
		o.maxIdlePerRoute = n
		return nil
	}
}

// WithIdleTimeout sets how long an idle keep-alive conn to a guest is kept
// (Server; default 30s).
func WithIdleTimeout(d time.Duration) Option {
	return func(o *options) error {
		if d <= 0 {
			return fmt.Errorf("idle timeout %v: want > 0", d)
		}
		o.idleTimeout = d
		return nil
	}
}

// WithTCPHost sets the host address raw TCP route listeners bind to
// (TCPRoutes; default 127.0.0.1). Raw routes carry no token check (only
// public sandboxes get them): bind them beyond loopback only on a trusted
// network.
func WithTCPHost(host string) Option {
	return func(o *options) error {
		if host != "" && net.ParseIP(host) == nil && host != "localhost" {
			return fmt.Errorf("tcp host %q: want an IP address", host)
		}
		o.tcpHost = host
		return nil
	}
}

// WithMaxRoutesPerSandbox caps how many routes (guest ports) one sandbox
// may have open (TCPRoutes; default 16). Opening one more is an
// errdefs.ErrCapacity error.
func WithMaxRoutesPerSandbox(n int) Option {
	return func(o *options) error {
		if n < 1 {
			return fmt.Errorf("max routes per sandbox %d: want >= 1", n)
		}
		o.maxRoutesPerSandbox = n
		return nil
	}
}

// WithMaxConnsPerSandbox caps how many connections one sandbox may have open
// at once (default 64): on the Server, requests, WebSockets and CONNECT
// tunnels in flight, and also streams to the guest, idle keep-alive ones
// included (one more is answered 429); on TCPRoutes, accepted raw
// connections (one more is closed at once).
func WithMaxConnsPerSandbox(n int) Option {
	return func(o *options) error {
		if n < 1 {
			return fmt.Errorf("max conns per sandbox %d: want >= 1", n)
		}
		o.maxConnsPerSandbox = n
		return nil
	}
}

// WithStreamIdleTimeout closes a CONNECT tunnel, raw TCP connection or
// stream to a guest that carried no byte in either direction for d
// (default 10 minutes). A stream that carries data is never cut.
func WithStreamIdleTimeout(d time.Duration) Option {
	return func(o *options) error {
		if d <= 0 {
			return fmt.Errorf("stream idle timeout %v: want > 0", d)
		}
		o.streamIdleTimeout = d
		return nil
	}
}

// WithReadHeaderTimeout bounds how long a client may take to send a
// request's headers (Server; default 10s). Bodies and upgraded streams are
// not bounded by it.
func WithReadHeaderTimeout(d time.Duration) Option {
	return func(o *options) error {
		if d <= 0 {
			return fmt.Errorf("read header timeout %v: want > 0", d)
		}
		o.readHeaderTimeout = d
		return nil
	}
}

// WithMaxClientConns caps how many client connections the HTTP proxy has
// open at once, over all sandboxes (Server; default 4096). Beyond it, new
// connections wait in the listen backlog until one closes.
func WithMaxClientConns(n int) Option {
	return func(o *options) error {
		if n < 1 {
			return fmt.Errorf("max client conns %d: want >= 1", n)
		}
		o.maxClientConns = n
		return nil
	}
}

// WithLocalPort answers requests routed to port of any sandbox with h, in
// the worker, instead of forwarding them to the guest (Server). The
// sandbox is resolved first (unknown: 404, or h's answer when h is a
// RouteFailer; the resolver wakes a paused one), the request counts against the sandbox's connection cap, and
// LocalRoute(r.Context()) names the route. The traffic access token is not
// checked: h authenticates the request itself. The E2B sandbox API (port
// 49983, package e2b/envd) is served this way.
func WithLocalPort(port int, h http.Handler) Option {
	return func(o *options) error {
		if port < 1 || port > 65535 {
			return fmt.Errorf("local port %d: want 1..65535", port)
		}
		if h == nil {
			return fmt.Errorf("local port %d: nil handler", port)
		}
		if o.localPorts == nil {
			o.localPorts = map[int]http.Handler{}
		}
		o.localPorts[port] = h
		return nil
	}
}

// buildOptions applies opts over the defaults and joins their errors.
func buildOptions(what string, opts []Option) (options, error) {
	o := options{
		domain:          DefaultDomain,
		log:             slog.Default(),
		dialTimeout:     DefaultDialTimeout,
		maxIdlePerRoute: DefaultMaxIdlePerRoute,
		idleTimeout:     DefaultIdleTimeout,
		tcpHost:         DefaultTCPHost,

		maxRoutesPerSandbox: DefaultMaxRoutesPerSandbox,
		maxConnsPerSandbox:  DefaultMaxConnsPerSandbox,
		streamIdleTimeout:   DefaultStreamIdleTimeout,
		readHeaderTimeout:   DefaultReadHeaderTimeout,
		maxClientConns:      DefaultMaxClientConns,
	}
	var errs []error
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return o, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("proxy: %s: %w", what, err))
	}
	return o, nil
}

// validDomain reports whether d is dot-separated labels of [a-z0-9-], none
// empty, none starting or ending with '-'.
func validDomain(d string) bool {
	if len(d) > 253 {
		return false
	}
	for _, label := range strings.Split(d, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' {
				return false
			}
		}
	}
	return true
}
