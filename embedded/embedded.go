// Package embedded runs the in-process NATS server (with JetStream) that a
// worker uses when it is not told to join an existing server or cluster.
package embedded

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// Config configures the embedded server.
type Config struct {
	// Listen is the client address, host:port. Port -1 picks a free port.
	// Default 127.0.0.1:4222.
	Listen string
	// StoreDir holds the JetStream store. Required.
	StoreDir string
	// ServerName names the server (default "firkin-embedded").
	ServerName string
	// Logger receives the server's notices and errors (nil: silent).
	Logger *slog.Logger
	// ReadyTimeout bounds the wait for the server to accept clients (default 10s).
	ReadyTimeout time.Duration
	// Users are the nkey users the server admits, each with its permissions
	// (see Access.Users). Anyone else is refused.
	Users []*server.NkeyUser
	// Anonymous admits clients without credentials, with every permission.
	// It must be set explicitly when Users is empty, and not with Users.
	Anonymous bool
}

// Server is a running embedded nats-server.
type Server struct {
	ns *server.Server
}

// Start starts the server and returns once it accepts connections.
func Start(cfg Config) (*Server, error) {
	if cfg.StoreDir == "" {
		return nil, errors.New("embedded nats: store dir is required")
	}
	if len(cfg.Users) == 0 && !cfg.Anonymous {
		return nil, errors.New("embedded nats: no users: give Users, or set Anonymous to admit anyone")
	}
	if len(cfg.Users) > 0 && cfg.Anonymous {
		return nil, errors.New("embedded nats: Users and Anonymous exclude each other")
	}
	if cfg.Listen == "" {
		cfg.Listen = "127.0.0.1:4222"
	}
	host, portText, err := net.SplitHostPort(cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("embedded nats: listen address %q: %w", cfg.Listen, err)
	}
	port, err := strconv.Atoi(portText)
	if err != nil || port < -1 || port > 65535 {
		return nil, fmt.Errorf("embedded nats: listen port %q: want -1..65535", portText)
	}
	if cfg.ServerName == "" {
		cfg.ServerName = "firkin-embedded"
	}
	if cfg.ReadyTimeout == 0 {
		cfg.ReadyTimeout = 10 * time.Second
	}
	opts := &server.Options{
		ServerName:         cfg.ServerName,
		Host:               host,
		Port:               port,
		JetStream:          true,
		StoreDir:           cfg.StoreDir,
		NoSigs:             true,
		MaxPayload:         8 << 20,
		JetStreamMaxMemory: 256 << 20,
		Nkeys:              cfg.Users,
	}
	ns, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("embedded nats: %w", err)
	}
	if cfg.Logger != nil {
		ns.SetLoggerV2(&slogAdapter{l: cfg.Logger.With("component", "nats-server")}, false, false, false)
	}
	go ns.Start()
	if !ns.ReadyForConnections(cfg.ReadyTimeout) {
		ns.Shutdown()
		return nil, fmt.Errorf("embedded nats: not ready for connections on %s within %s", cfg.Listen, cfg.ReadyTimeout)
	}
	return &Server{ns: ns}, nil
}

// ClientURL is the URL clients connect to, e.g. nats://127.0.0.1:4222.
func (s *Server) ClientURL() string { return s.ns.ClientURL() }

// InProcessConn opens a connection to the server that skips the network
// (nats.InProcessServer(s) uses it).
func (s *Server) InProcessConn() (net.Conn, error) { return s.ns.InProcessConn() }

// Shutdown stops the server and waits for it to finish.
func (s *Server) Shutdown() {
	s.ns.Shutdown()
	s.ns.WaitForShutdown()
}

// slogAdapter feeds nats-server's logger interface into slog.
type slogAdapter struct{ l *slog.Logger }

func (a *slogAdapter) Noticef(format string, v ...any) { a.l.Debug(fmt.Sprintf(format, v...)) }
func (a *slogAdapter) Warnf(format string, v ...any)   { a.l.Warn(fmt.Sprintf(format, v...)) }
func (a *slogAdapter) Fatalf(format string, v ...any)  { a.l.Error(fmt.Sprintf(format, v...)) }
func (a *slogAdapter) Errorf(format string, v ...any)  { a.l.Error(fmt.Sprintf(format, v...)) }
func (a *slogAdapter) Debugf(format string, v ...any)  { a.l.Debug(fmt.Sprintf(format, v...)) }
func (a *slogAdapter) Tracef(format string, v ...any)  {}
