// Package proxy routes traffic from the host into sandboxes' guest ports.
//
// Server is an HTTP reverse proxy that picks the sandbox and port from the
// request's Host, <port>-<sandbox id>.<domain>, or, when the Host is a bare
// address, from the e2b-sandbox-id and e2b-sandbox-port headers. It carries
// HTTP/1.1 with streamed bodies, server-sent events and WebSocket upgrades,
// and enforces the traffic access token of private sandboxes. A CONNECT
// request to <port>-<sandbox id>.<domain> opens a raw tunnel to the guest
// port through the same checks: that is how a private sandbox carries any
// protocol. TCPRoutes keeps the routes of each sandbox and, for a public
// sandbox only, opens a host listener per (sandbox, port) that carries any
// protocol without a token.
//
// Both cap what one sandbox may hold: routes (16 by default), connections
// at once (64 on the HTTP proxy, counting requests, WebSockets and tunnels
// in flight as well as streams to the guest, idle keep-alive ones included,
// and 64 on the raw listeners), and close a tunnel, raw
// connection or guest stream that carried no byte either way for the stream
// idle timeout (10 minutes by default). Streams that carry data, such as
// server-sent events or a busy WebSocket, are never cut. The HTTP proxy
// also serves at most 4096 client connections at once (WithMaxClientConns).
//
// Both reach the guest through a Resolver, the seam to the runtime: it
// returns a Target whose Dial opens a stream to the guest's 127.0.0.1:port
// (through the guest agent), so no guest network is needed.
//
// Errors a client sees from Server, each with a one-line text body:
//
//	400 malformed host, port or headers
//	401 private sandbox, no e2b-traffic-access-token
//	403 private sandbox, wrong e2b-traffic-access-token
//	404 unknown sandbox
//	429 the sandbox has its most connections through the proxy open
//	502 nothing listening on the guest port, or no HTTP answer from it
//	504 dialling the guest port timed out
//
// Nothing reaches the guest when the token check fails, and the token
// header is removed before a request is forwarded.
//
// A port given WithLocalPort is answered in the worker by its handler (the
// E2B sandbox API at 49983), which checks its own token.
package proxy

import (
	"context"
	"net"
)

// Resolver finds where a sandbox's guest ports are.
type Resolver interface {
	// Resolve returns the sandbox's route target. Errors are classed with
	// errdefs: errdefs.ErrNotFound for an unknown sandbox.
	Resolve(ctx context.Context, sandboxID string) (Target, error)
}

// ResolverFunc adapts a function to Resolver.
type ResolverFunc func(ctx context.Context, sandboxID string) (Target, error)

// Resolve calls f.
func (f ResolverFunc) Resolve(ctx context.Context, sandboxID string) (Target, error) {
	return f(ctx, sandboxID)
}

// Target is where a sandbox's traffic goes and who may send it.
type Target struct {
	// Dial opens a stream to the guest's 127.0.0.1:port. ctx bounds the dial
	// only. Returning a conn that implements CloseWrite lets raw TCP routes
	// pass half-closes on.
	Dial func(ctx context.Context, port int) (net.Conn, error)
	// Public sandboxes take any request and get raw TCP listeners. Requests
	// to others must carry a token that VerifyToken accepts in the
	// e2b-traffic-access-token header, and they get no raw TCP listener.
	Public bool
	// VerifyToken reports whether a token presented for a private sandbox
	// opens it. It must compare in constant time (tokens.VerifyTraffic
	// does). Nil on a private sandbox refuses every request.
	VerifyToken func(token string) bool
}
