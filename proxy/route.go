package proxy

import (
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// The request headers the proxy reads (E2B's names). HTTP header names are
// case-insensitive; these are the canonical spellings.
const (
	// SandboxIDHeader names the sandbox when the Host is a bare address.
	SandboxIDHeader = "E2b-Sandbox-Id"
	// SandboxPortHeader names the guest port when the Host is a bare address.
	SandboxPortHeader = "E2b-Sandbox-Port"
	// TrafficTokenHeader carries a private sandbox's traffic access token.
	// The proxy removes it before forwarding.
	TrafficTokenHeader = "E2b-Traffic-Access-Token"
)

// DefaultDomain is the domain route host names end with unless configured.
const DefaultDomain = "localhost"

// Route names one guest port of one sandbox.
type Route struct {
	SandboxID string
	Port      int
}

// Host returns the route's host name, <port>-<sandbox id>.<domain>.
func (r Route) Host(domain string) string {
	return strconv.Itoa(r.Port) + "-" + r.SandboxID + "." + domain
}

// String returns "<port>-<sandbox id>", the route's first host label.
func (r Route) String() string {
	return strconv.Itoa(r.Port) + "-" + r.SandboxID
}

// Validate checks the sandbox id ([a-z0-9][a-z0-9-]{0,62}) and the port
// (1-65535); the error is classed errdefs.ErrInvalidArgument.
func (r Route) Validate() error {
	if err := subjects.ValidateSandboxID(r.SandboxID); err != nil {
		return fmt.Errorf("proxy: route: %w", err)
	}
	if r.Port < 1 || r.Port > 65535 {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("proxy: route: port %d out of range 1-65535", r.Port))
	}
	return nil
}

// ParseHost reads a route from a Host header value of the form
// <port>-<sandbox id>.<domain>[:<proxy port>]. Case does not matter (DNS
// names are case-insensitive; sandbox ids are lower case) and a trailing dot
// is allowed.
//
// ok is false, with no error, when the host is not a name under domain: a
// bare IP address, "localhost", the domain itself, an empty host or another
// name. The caller then looks at the headers (RouteFromHeaders). A name
// under domain that is not a valid route is an errdefs.ErrInvalidArgument
// error.
func ParseHost(host, domain string) (r Route, ok bool, err error) {
	name, err := stripPort(host)
	if err != nil {
		return Route{}, false, err
	}
	name = strings.TrimSuffix(strings.ToLower(name), ".")
	domain = strings.TrimSuffix(strings.ToLower(domain), ".")
	if name == "" || name == "localhost" || name == domain || net.ParseIP(name) != nil {
		return Route{}, false, nil
	}
	label, under := strings.CutSuffix(name, "."+domain)
	if !under || domain == "" {
		return Route{}, false, nil
	}
	if strings.Contains(label, ".") {
		return Route{}, false, invalidf("host %q: want <port>-<sandbox id>.%s, not a deeper name", host, domain)
	}
	portText, id, found := strings.Cut(label, "-")
	if !found {
		return Route{}, false, invalidf("host %q: want <port>-<sandbox id>.%s", host, domain)
	}
	port, err := parsePort(portText)
	if err != nil {
		return Route{}, false, invalidf("host %q: %v", host, err)
	}
	r = Route{SandboxID: id, Port: port}
	if err := subjects.ValidateSandboxID(id); err != nil {
		return Route{}, false, invalidf("host %q: bad sandbox id %q", host, id)
	}
	return r, true, nil
}

// RouteFromHeaders reads a route from the e2b-sandbox-id and
// e2b-sandbox-port headers. Missing or malformed headers are an
// errdefs.ErrInvalidArgument error.
func RouteFromHeaders(h http.Header) (Route, error) {
	id, portText := h.Get(SandboxIDHeader), h.Get(SandboxPortHeader)
	if id == "" || portText == "" {
		return Route{}, invalidf("the host is not <port>-<sandbox id>.<domain> and the e2b-sandbox-id and e2b-sandbox-port headers are not both set")
	}
	if err := subjects.ValidateSandboxID(id); err != nil {
		return Route{}, invalidf("bad e2b-sandbox-id %q", id)
	}
	port, err := parsePort(portText)
	if err != nil {
		return Route{}, invalidf("bad e2b-sandbox-port %q: %v", portText, err)
	}
	return Route{SandboxID: id, Port: port}, nil
}

// stripPort removes a :port suffix from a Host value. A bracketed IPv6
// literal loses its brackets.
func stripPort(host string) (string, error) {
	if strings.HasPrefix(host, "[") {
		end := strings.IndexByte(host, ']')
		if end < 0 {
			return "", invalidf("host %q: unclosed [", host)
		}
		rest := host[end+1:]
		if rest != "" {
			p, ok := strings.CutPrefix(rest, ":")
			if !ok || !allDigits(p) {
				return "", invalidf("host %q: bad port", host)
			}
		}
		return host[1:end], nil
	}
	i := strings.LastIndexByte(host, ':')
	if i < 0 {
		return host, nil
	}
	if strings.Count(host, ":") > 1 {
		return host, nil // an unbracketed IPv6 address
	}
	if !allDigits(host[i+1:]) {
		return "", invalidf("host %q: bad port", host)
	}
	return host[:i], nil
}

// parsePort reads a port number in canonical decimal form: 1-65535, no sign,
// no leading zero.
func parsePort(s string) (int, error) {
	if s == "" || len(s) > 5 || !allDigits(s) || s[0] == '0' {
		return 0, fmt.Errorf("port %q: want a number 1-65535", s)
	}
	n, _ := strconv.Atoi(s) // at most 5 digits: cannot fail
	if n > 65535 {
		return 0, fmt.Errorf("port %q: want a number 1-65535", s)
	}
	return n, nil
}

// allDigits reports whether s is made of ASCII digits only (true for "").
func allDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// invalidf makes an errdefs.ErrInvalidArgument error; its message is shown
// to the client in a 400 body.
func invalidf(format string, args ...any) error {
	return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf(format, args...))
}

// NewRouteReply builds the reply to firkin.sandbox.<id>.route: the route's
// host name under domain, the URL through the proxy listening on proxyAddr
// (only its port is used; port 80 is left out of the URL) and the raw TCP
// address of the route's host listener.
func NewRouteReply(r Route, domain, proxyAddr, tcpAddr string) subjects.RouteReply {
	host := r.Host(domain)
	url := "http://" + host
	if _, port, err := net.SplitHostPort(proxyAddr); err == nil && port != "80" && port != "" {
		url += ":" + port
	}
	return subjects.RouteReply{
		SandboxID: r.SandboxID,
		Port:      r.Port,
		Host:      host,
		URL:       url,
		TCP:       tcpAddr,
	}
}
