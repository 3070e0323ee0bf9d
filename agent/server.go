package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// Read back-off while the channel reports end of file (a virtio-serial port
// whose host side is not connected reads as EOF until it is).
const (
	minEOFBackoff = time.Millisecond
	maxEOFBackoff = 20 * time.Millisecond
	// tailSize is how many of the last bytes given to a session are rescanned
	// for a hello when the session breaks without a quiesce.
	tailSize = 64 << 10
	readSize = 64 << 10
)

// DefaultPath is the PATH commands get unless the request or Init sets one.
const DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Server is the guest agent: it serves sessions on a channel and runs the
// operations they ask for. Set its fields before the first Serve.
type Server struct {
	// Root is the directory commands are chrooted into and file operations
	// are confined to. Empty means no chroot (file paths are then relative
	// to "/"); host-side tests use that.
	Root string
	// ManageSystem lets Init change the machine: hostname, clock, entropy.
	// Only the real agent (PID 1) sets it.
	ManageSystem bool
	// Reaper, when set, starts and waits for commands; PID 1 sets it so
	// that it can also reap orphans without stealing exit statuses.
	Reaper *Reaper
	// Logger receives diagnostics; nil discards them.
	Logger *slog.Logger
	// PowerOff, when set, serves Client.Shutdown: it is called after the
	// host has been answered, and should sync and power the machine off.
	PowerOff func()

	mu        sync.Mutex
	env       map[string]string // defaults for every exec, from Init
	sandboxID string

	procs procTable  // processes of proc_start; they outlive sessions
	warm  warmShells // login shells started ahead of exec (unix)
}

func (s *Server) log() *slog.Logger {
	if s.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return s.Logger
}

// Serve serves sessions on dev, one after another, forever: it waits for a
// hello, answers it, serves the session until the host quiesces it or goes
// away, and waits for the next hello. Only one goroutine reads dev. Serve
// returns when ctx ends or dev fails for good (closed); a read blocked on
// dev at that point ends when dev is closed.
func (s *Server) Serve(ctx context.Context, dev io.ReadWriter) error {
	return s.serve(ctx, dev, false)
}

// ServeConn is Serve for a channel that cannot come back after the host
// closed it (an accepted vsock connection): it returns at end of file.
func (s *Server) ServeConn(ctx context.Context, conn io.ReadWriter) error {
	return s.serve(ctx, conn, true)
}

// chunk is what the read pump hands to the dispatcher: data, or the news
// that the channel read end of file (the host went away).
type chunk struct {
	b   []byte
	eof bool
}

func (s *Server) serve(ctx context.Context, dev io.ReadWriter, eofFinal bool) error {
	parent := ctx
	defer func() {
		if parent.Err() != nil {
			s.stopWarmShells()
		}
	}()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	chunks := make(chan chunk)
	readErr := make(chan error, 1)
	go func() { readErr <- pump(ctx, dev, chunks, eofFinal, s.log()) }()

	w := &devWriter{w: dev}
	var prev *session
	defer func() {
		if prev != nil {
			prev.close()
		}
	}()
	var scan []byte
	for {
		nonce, rest, err := waitHello(ctx, chunks, readErr, scan)
		if err != nil {
			return err
		}
		if prev != nil {
			prev.close()
			prev = nil
		}
		if err := w.write([]byte(readyPrefix + nonce + "\n")); err != nil {
			s.log().Warn("write ready", "err", err)
			scan = nil
			continue
		}
		sess, err := s.startSession(ctx, w, rest)
		if err != nil {
			return err
		}
		prev = sess
		s.log().Debug("session started", "nonce", nonce)
		scan, err = sess.feed(ctx, chunks, readErr)
		if err != nil {
			return err
		}
		s.log().Debug("session ended", "nonce", nonce)
	}
}

// pump is the only reader of dev. It hands every chunk read to the
// dispatcher, reports end of file once per disconnection (and logs it), and
// polls with a short back-off while dev reads as EOF. It returns when ctx
// ends, when dev is closed, or at the first EOF when eofFinal is set.
func pump(ctx context.Context, dev io.Reader, out chan<- chunk, eofFinal bool, log *slog.Logger) error {
	backoff := minEOFBackoff
	connected := true
	buf := make([]byte, readSize)
	read := batchReader(dev)
	for {
		n, err := read(buf)
		if n > 0 {
			connected = true
			backoff = minEOFBackoff
			select {
			case out <- chunk{b: bytes.Clone(buf[:n])}:
			case <-ctx.Done():
				return ctx.Err()
			}
			if err == nil {
				continue
			}
		}
		if err != nil && !errors.Is(err, io.EOF) {
			if errors.Is(err, os.ErrClosed) || errors.Is(err, net.ErrClosed) || errors.Is(err, io.ErrClosedPipe) {
				return fmt.Errorf("agent: read channel: %w", err)
			}
		}
		if eofFinal && errors.Is(err, io.EOF) {
			return fmt.Errorf("agent: read channel: %w", err)
		}
		if n == 0 && connected {
			// n == 0 with or without io.EOF: the host side is gone.
			connected = false
			log.Info("the agent channel reads as disconnected")
			select {
			case out <- chunk{eof: true}:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		}
		backoff = min(backoff*2, maxEOFBackoff)
	}
}

// waitHello consumes chunks until a complete hello line, starting with the
// bytes in scan. It returns the nonce and the bytes after the line.
func waitHello(ctx context.Context, chunks <-chan chunk, readErr <-chan error, scan []byte) (string, []byte, error) {
	for {
		nonce, rest, keep, ok := findHandshake(scan, helloPrefix)
		if ok {
			return nonce, rest, nil
		}
		scan = append([]byte(nil), scan[len(scan)-keep:]...)
		select {
		case c := <-chunks:
			scan = append(scan, c.b...)
		case err := <-readErr:
			return "", nil, err
		case <-ctx.Done():
			return "", nil, ctx.Err()
		}
	}
}

// devWriter serialises writes to the channel.
type devWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (d *devWriter) write(p []byte) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	_, err := d.w.Write(p)
	return err
}

// sessConnGuest is the byte stream a guest yamux session runs on: reads are
// fed by the dispatcher, writes go to the channel until the session is shut.
type sessConnGuest struct {
	data     chan []byte
	buf      []byte // owned by the reading goroutine
	closed   chan struct{}
	closeMu  sync.Once
	detached chan struct{}
	detach   sync.Once
	shut     atomic.Bool
	dev      *devWriter
}

func (c *sessConnGuest) Read(p []byte) (int, error) {
	if len(c.buf) == 0 {
		select {
		case b := <-c.data:
			c.buf = b
		case <-c.closed:
			return 0, io.EOF
		}
	}
	n := copy(p, c.buf)
	c.buf = c.buf[n:]
	return n, nil
}

func (c *sessConnGuest) Write(p []byte) (int, error) {
	c.dev.mu.Lock()
	defer c.dev.mu.Unlock()
	if c.shut.Load() {
		return 0, net.ErrClosed
	}
	return c.dev.w.Write(p)
}

func (c *sessConnGuest) Close() error {
	c.closeMu.Do(func() { close(c.closed) })
	return nil
}

// session is one guest session.
type session struct {
	conn   *sessConnGuest
	mux    *yamux.Session
	ctx    context.Context // ends with the session; running commands die with it
	cancel context.CancelFunc
	tail   []byte
	// heard is set once the host sent the session a byte (see feed).
	heard bool
}

func (s *Server) startSession(ctx context.Context, w *devWriter, initial []byte) (*session, error) {
	conn := &sessConnGuest{
		data:     make(chan []byte),
		closed:   make(chan struct{}),
		detached: make(chan struct{}),
		dev:      w,
		buf:      initial,
	}
	mux, err := yamux.Server(conn, yamuxConfig())
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrProtocol, fmt.Errorf("agent: start session: %w", err))
	}
	sctx, cancel := context.WithCancel(ctx)
	ss := &session{conn: conn, mux: mux, ctx: sctx, cancel: cancel}
	ss.addTail(initial)
	go func() {
		select {
		case <-mux.CloseChan():
		case <-sctx.Done():
		}
		cancel()
	}()
	go func() {
		for {
			st, err := mux.AcceptStream()
			if err != nil {
				return
			}
			go s.handle(ss, st)
		}
	}()
	return ss, nil
}

func (ss *session) addTail(b []byte) {
	if len(b) > 0 {
		ss.heard = true
	}
	ss.tail = append(ss.tail, b...)
	if len(ss.tail) > tailSize {
		ss.tail = append([]byte(nil), ss.tail[len(ss.tail)-tailSize:]...)
	}
}

func (ss *session) isDetached() bool {
	select {
	case <-ss.conn.detached:
		return true
	default:
		return false
	}
}

// close shuts the session: its writes stop reaching the channel (once any
// write in flight has finished) and the multiplexer stops.
func (ss *session) close() {
	ss.conn.dev.mu.Lock()
	ss.conn.shut.Store(true)
	ss.conn.dev.mu.Unlock()
	ss.cancel()
	// Session.Close waits for the session's goroutines; none of them can
	// block now, but do not hold the dispatcher on it anyway.
	go ss.mux.Close()
}

// feed hands chunks to the session until it ends. It returns the bytes to
// scan for the next hello.
func (ss *session) feed(ctx context.Context, chunks <-chan chunk, readErr <-chan error) ([]byte, error) {
	for {
		select {
		case c := <-chunks:
			if c.eof && !ss.heard {
				// Not this session's host: the disconnection before it,
				// reported late. A virtio-serial driver handles the
				// control message "host connected" in a work queue, so
				// the new host's hello can be read while the port still
				// reads as disconnected (it takes no writes then either:
				// the ready line went out only once the driver caught
				// up). Ending the session here would leave the host
				// waiting for answers that never come. Should the host
				// really have gone, the next one's hello breaks this
				// idle session (it is no yamux frame) and is found
				// again in the tail.
				continue
			}
			if c.eof {
				// The host went away: this session is over.
				ss.close()
				return nil, nil
			}
			if ss.isDetached() {
				return c.b, nil
			}
			select {
			case ss.conn.data <- c.b:
				ss.addTail(c.b)
			case <-ss.conn.detached:
				return c.b, nil
			case <-ss.mux.CloseChan():
				if ss.isDetached() {
					return c.b, nil
				}
				return append(ss.tail, c.b...), nil
			}
		case <-ss.conn.detached:
			return nil, nil
		case <-ss.mux.CloseChan():
			if ss.isDetached() {
				return nil, nil
			}
			// The session broke (for instance on a hello it could not
			// parse): the next hello may be in what it consumed.
			return ss.tail, nil
		case err := <-readErr:
			return nil, err
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// handle serves one stream.
func (s *Server) handle(ss *session, st *yamux.Stream) {
	defer st.Close()
	defer func() {
		// A bug in one operation must not take PID 1 (and the VM) down.
		if r := recover(); r != nil {
			s.log().Error("panic serving a stream", "panic", r, "stack", string(debug.Stack()))
			sendError(st, fmt.Errorf("internal error: %v", r))
		}
	}()
	typ, payload, err := readFrame(st)
	if err != nil {
		return
	}
	var req request
	if typ != frameRequest {
		err = fmt.Errorf("first frame is %q, want a request", typ)
	} else if jerr := json.Unmarshal(payload, &req); jerr != nil {
		err = fmt.Errorf("bad request: %w", jerr)
	}
	if err != nil {
		sendError(st, errdefs.Wrap(errdefs.ErrInvalidArgument, err))
		return
	}
	switch req.Op {
	case opPing:
		_ = writeFrame(st, frameOK, nil)
	case opInit:
		if req.Init == nil {
			sendError(st, errdefs.Wrap(errdefs.ErrInvalidArgument, errors.New("init: no request")))
			return
		}
		if err := s.init(*req.Init); err != nil {
			sendError(st, err)
			return
		}
		_ = writeFrame(st, frameOK, nil)
	case opQuiesce:
		// Stop feeding the session first, so that the next hello (sent
		// once the host has our answer) goes to the dispatcher.
		ss.conn.detach.Do(func() { close(ss.conn.detached) })
		_ = writeFrame(st, frameOK, nil) // returns once written to the channel
		ss.close()
	case opShutdown:
		if s.PowerOff == nil {
			sendError(st, errdefs.Wrap(errdefs.ErrUnsupported, errors.New("shutdown: this agent cannot power off")))
			return
		}
		_ = writeFrame(st, frameOK, nil)
		s.log().Info("shutdown requested by the host")
		go s.PowerOff()
	case opExec:
		if req.Exec == nil {
			sendError(st, errdefs.Wrap(errdefs.ErrInvalidArgument, errors.New("exec: no request")))
			return
		}
		s.exec(ss.ctx, st, *req.Exec)
	case opDial:
		s.dial(ss.ctx, st, req.Port)
	case opReadFile:
		s.readFile(st, req.Path)
	case opWriteFile:
		s.writeFile(st, req.Path, os.FileMode(req.Mode))
	case opProcStart, opProcWait, opProcStdin, opProcSignal, opProcResize, opProcList:
		s.serveProc(st, req.Op, req.Proc)
	default:
		if s.handleFS(ss.ctx, st, req) {
			return
		}
		if req.Op == opStats {
			s.stats(st)
			return
		}
		sendError(st, errdefs.Wrap(errdefs.ErrUnsupported, fmt.Errorf("unknown operation %q", req.Op)))
	}
}

// sendError writes err as an error frame.
func sendError(w io.Writer, err error) {
	_ = writeJSONFrame(w, frameError, remoteErrorOf(err))
}

// init records the default env and sandbox id and, with ManageSystem, sets
// the hostname, the clock and the entropy pool.
func (s *Server) init(req InitRequest) error {
	for k := range req.Env {
		if !validEnvKey(k) {
			return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("init: bad env name %q", k))
		}
	}
	if req.Hostname != "" && !validHostname(req.Hostname) {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("init: bad hostname %q", req.Hostname))
	}
	s.mu.Lock()
	if !req.KeepEnv {
		s.env = maps.Clone(req.Env)
	}
	s.sandboxID = req.SandboxID
	s.mu.Unlock()
	if !s.ManageSystem {
		return nil
	}
	var errs []error
	if req.Hostname != "" {
		if err := setHostname(req.Hostname); err != nil {
			errs = append(errs, fmt.Errorf("init: hostname: %w", err))
		}
	}
	if req.UnixNano > 0 {
		if err := setClock(req.UnixNano); err != nil {
			errs = append(errs, fmt.Errorf("init: clock: %w", err))
		}
	}
	if len(req.Entropy) > 0 {
		if err := addEntropy(req.Entropy); err != nil {
			errs = append(errs, fmt.Errorf("init: entropy: %w", err))
		}
	}
	if req.MAC != "" {
		if err := setMAC(req.MAC); err != nil {
			errs = append(errs, fmt.Errorf("init: mac: %w", err))
		}
	}
	return errors.Join(errs...)
}

func validEnvKey(k string) bool {
	if k == "" {
		return false
	}
	for i := 0; i < len(k); i++ {
		if k[i] == '=' || k[i] == 0 {
			return false
		}
	}
	return true
}

func validHostname(h string) bool {
	if len(h) > 64 {
		return false
	}
	for i := 0; i < len(h); i++ {
		c := h[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.') {
			return false
		}
	}
	return true
}
