package agent

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/hashicorp/yamux"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// ErrRefused is matched (errors.Is) by a DialGuest error when nothing listens
// on the guest port. Such errors are also of class errdefs.ErrProtocol, which
// the proxy maps to 502.
var ErrRefused = errors.New("connection refused")

// killGrace is how long Exec waits for the result of a command it killed
// because its ctx ended.
const killGrace = 2 * time.Second

// closeQuiesceTimeout bounds the polite quiesce that Client.Close attempts.
const closeQuiesceTimeout = time.Second

// Bounds on what the host reads from the guest, which runs code nobody
// trusts. Exceeding one is an error of class errdefs.ErrProtocol. Frames are
// bounded by MaxFramePayload (data) and maxControlPayload (replies).
const (
	// MaxReadFile is the largest file ReadFile returns.
	MaxReadFile = 64 << 20
	// maxDialAnswer bounds the status line that answers a DialGuest.
	maxDialAnswer = 512
	// maxRemoteMessage bounds the message of a guest error (longer ones are
	// cut).
	maxRemoteMessage = 4 << 10
	// maxSignalName bounds the signal name of an exit frame.
	maxSignalName = 32
)

// protocolError is an error of class errdefs.ErrProtocol.
func protocolError(format string, args ...any) error {
	return errdefs.Wrap(errdefs.ErrProtocol, fmt.Errorf(format, args...))
}

// Client is the host's end of one agent session. It is safe for concurrent
// use. A Client is good until Quiesce, Close or the loss of the session
// (Done); a new session is started with Connect, on the same conn or another.
// Only one Client may use a conn at a time.
type Client struct {
	conn    net.Conn
	sc      *sessConn
	sess    *yamux.Session
	closing sync.Once
}

// Connect starts a session on conn: it sends one hello, skips whatever the
// guest sent before the matching ready line, and starts the multiplexer. ctx
// bounds the handshake only. conn stays the caller's: Connect never closes it
// (also not on failure), and Client.Close leaves it open too, so a later
// Connect can start the next session on it.
func Connect(ctx context.Context, conn net.Conn) (*Client, error) {
	nonce, err := newNonce()
	if err != nil {
		return nil, err
	}
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		_ = conn.SetDeadline(time.Now())
		close(fired)
	})
	pending, err := handshake(conn, nonce)
	if !stop() {
		// ctx ended during the handshake; the deadline it set must go.
		<-fired
		_ = conn.SetDeadline(time.Time{})
		if err == nil {
			err = ctx.Err()
		}
		return nil, ctxError("agent: handshake", ctx, err)
	}
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrProtocol, fmt.Errorf("agent: handshake: %w", err))
	}
	sc := newSessConn(conn, pending)
	sess, err := yamux.Client(sc, yamuxConfig())
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrProtocol, fmt.Errorf("agent: start session: %w", err))
	}
	return &Client{conn: conn, sc: sc, sess: sess}, nil
}

// handshake writes the hello and reads until the matching ready line. It
// returns the bytes read after that line.
func handshake(conn net.Conn, nonce string) ([]byte, error) {
	if _, err := io.WriteString(conn, helloPrefix+nonce+"\n"); err != nil {
		return nil, fmt.Errorf("send hello: %w", err)
	}
	want := []byte(readyPrefix + nonce + "\n")
	var buf []byte
	chunk := make([]byte, 4096)
	for {
		n, err := conn.Read(chunk)
		buf = append(buf, chunk[:n]...)
		if i := bytes.Index(buf, want); i >= 0 {
			return bytes.Clone(buf[i+len(want):]), nil
		}
		if len(buf) >= len(want) {
			buf = append(buf[:0], buf[len(buf)-len(want)+1:]...)
		}
		if err != nil {
			return nil, fmt.Errorf("wait for ready: %w", err)
		}
	}
}

func newNonce() (string, error) {
	var b [12]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("agent: nonce: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}

// ctxError reports err, which happened while ctx ended, as the ctx's error:
// errdefs.ErrTimeout for a passed deadline.
func ctxError(what string, ctx context.Context, err error) error {
	cerr := ctx.Err()
	if cerr == nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if errors.Is(cerr, context.DeadlineExceeded) {
		return errdefs.Wrap(errdefs.ErrTimeout, fmt.Errorf("%s: %w", what, cerr))
	}
	return fmt.Errorf("%s: %w", what, cerr)
}

// sessionError classes an I/O error on a stream of the session.
func (c *Client) sessionError(what string, ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctxError(what, ctx, err)
	}
	var re *RemoteError
	if errors.As(err, &re) {
		return fmt.Errorf("%s: %w", what, err)
	}
	return errdefs.Wrap(errdefs.ErrProtocol, fmt.Errorf("%s: %w", what, err))
}

// Done is closed when the session has ended: Quiesce, Close, or a lost
// channel.
func (c *Client) Done() <-chan struct{} { return c.sess.CloseChan() }

// Close ends the session. When the session is still up it first asks the
// guest to drop it (bounded by a second), so that the guest is ready for the
// next hello at once. Close does not close the conn given to Connect unless
// that conn does not support deadlines (then it must, to stop reading it).
func (c *Client) Close() error {
	var err error
	c.closing.Do(func() {
		if !c.sess.IsClosed() {
			ctx, cancel := context.WithTimeout(context.Background(), closeQuiesceTimeout)
			_ = c.quiesce(ctx)
			cancel()
		}
		err = c.sess.Close()
	})
	return err
}

// open opens a stream, sends req, and arranges for ctx's end to cut the
// stream's I/O short. Call the returned stop when done with ctx.
func (c *Client) open(ctx context.Context, req request) (*yamux.Stream, func() bool, error) {
	if err := ctx.Err(); err != nil {
		return nil, nil, ctxError("agent: "+req.Op, ctx, err)
	}
	st, err := c.sess.OpenStream()
	if err != nil {
		return nil, nil, errdefs.Wrap(errdefs.ErrProtocol, fmt.Errorf("agent: %s: open stream: %w", req.Op, err))
	}
	stop := context.AfterFunc(ctx, func() { _ = st.SetDeadline(time.Now()) })
	if err := writeJSONFrame(st, frameRequest, req); err != nil {
		stop()
		_ = st.Close()
		return nil, nil, c.sessionError("agent: "+req.Op, ctx, err)
	}
	return st, stop, nil
}

// readReply reads frames until an OK or error frame, passing data frames to
// onData.
func readReply(st io.Reader, onData func([]byte) error) ([]byte, error) {
	for {
		typ, payload, err := readFrameLimit(st, frameLimit)
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
		switch typ {
		case frameOK:
			return payload, nil
		case frameError:
			return nil, decodeRemoteError(payload)
		case frameData:
			if onData == nil {
				return nil, fmt.Errorf("unexpected data frame")
			}
			if err := onData(payload); err != nil {
				return nil, err
			}
		default:
			return nil, fmt.Errorf("unexpected frame %q", typ)
		}
	}
}

// decodeRemoteError decodes an error frame; its message is cut to
// maxRemoteMessage bytes and its code to a known one.
func decodeRemoteError(payload []byte) error {
	re := &RemoteError{}
	if err := json.Unmarshal(payload, re); err != nil {
		return protocolError("bad error frame: %w", err)
	}
	switch re.Code {
	case codeInvalid, codeNotFound, codeUnsupported, codeInternal:
	default:
		if fsCodeClass(re.Code) == nil {
			re.Code = codeInternal
		}
	}
	if len(re.Message) > maxRemoteMessage {
		re.Message = strings.ToValidUTF8(re.Message[:maxRemoteMessage], "") + " (cut)"
	}
	return re
}

// call runs a simple request/reply operation.
func (c *Client) call(ctx context.Context, req request, onData func([]byte) error) ([]byte, error) {
	st, stop, err := c.open(ctx, req)
	if err != nil {
		return nil, err
	}
	defer stop()
	defer st.Close()
	reply, err := readReply(st, onData)
	if err != nil {
		return nil, c.sessionError("agent: "+req.Op, ctx, err)
	}
	return reply, nil
}

// Ping checks that the agent answers.
func (c *Client) Ping(ctx context.Context) error {
	_, err := c.call(ctx, request{Op: opPing}, nil)
	return err
}

// Init sets the guest's identity, default env, clock and entropy.
func (c *Client) Init(ctx context.Context, req InitRequest) error {
	_, err := c.call(ctx, request{Op: opInit, Init: &req}, nil)
	return err
}

// Quiesce asks the agent to drop this session (before a snapshot) and ends
// it here once the agent acknowledged. Commands still running in the session
// are killed by the guest. Afterwards the agent waits for a new hello, which
// Connect sends, on this conn or on a new one after a restore.
func (c *Client) Quiesce(ctx context.Context) error {
	err := c.quiesce(ctx)
	if cerr := c.sess.Close(); err == nil && cerr != nil {
		err = errdefs.Wrap(errdefs.ErrProtocol, fmt.Errorf("agent: quiesce: %w", cerr))
	}
	return err
}

func (c *Client) quiesce(ctx context.Context) error {
	_, err := c.call(ctx, request{Op: opQuiesce}, nil)
	return err
}

// Shutdown asks the guest to sync its file systems and power off: a polite
// stop that ends the machine's process within moments, where an ACPI power
// button would go unheard. The call returns once the guest has accepted;
// wait for the machine's process to exit, and force it after a timeout.
func (c *Client) Shutdown(ctx context.Context) error {
	_, err := c.call(ctx, request{Op: opShutdown}, nil)
	return err
}

// ReadFile returns the content of the file at path in the guest's root,
// read whole into memory. A file over MaxReadFile bytes is an error of class
// errdefs.ErrProtocol.
func (c *Client) ReadFile(ctx context.Context, path string) ([]byte, error) {
	return c.readFile(ctx, path, MaxReadFile)
}

func (c *Client) readFile(ctx context.Context, path string, max int) ([]byte, error) {
	var buf bytes.Buffer
	_, err := c.call(ctx, request{Op: opReadFile, Path: path}, func(b []byte) error {
		if len(b) > max-buf.Len() {
			return protocolError("file %q in the guest is larger than %d bytes", path, max)
		}
		buf.Write(b)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// WriteFile writes data to the file at path in the guest's root, creating it
// (and missing parent directories) or truncating it. mode 0 means 0644.
func (c *Client) WriteFile(ctx context.Context, path string, data []byte, mode fs.FileMode) error {
	if mode == 0 {
		mode = 0o644
	}
	st, stop, err := c.open(ctx, request{Op: opWriteFile, Path: path, Mode: uint32(mode.Perm())})
	if err != nil {
		return err
	}
	defer stop()
	defer st.Close()
	for len(data) > 0 {
		n := min(len(data), MaxFramePayload)
		if err := writeFrame(st, frameData, data[:n]); err != nil {
			return c.sessionError("agent: write_file", ctx, err)
		}
		data = data[n:]
	}
	if err := writeFrame(st, frameEOF, nil); err != nil {
		return c.sessionError("agent: write_file", ctx, err)
	}
	if _, err := readReply(st, nil); err != nil {
		return c.sessionError("agent: write_file", ctx, err)
	}
	return nil
}

// DialGuest opens a TCP connection to 127.0.0.1:port inside the guest (or
// [::1]:port when only that listens). The returned conn carries raw bytes.
// Close and CloseWrite both send end-of-stream to the guest, which then shuts
// down writing to the guest socket and closes once the guest side is done;
// a stream left unread after Close is reset after a minute. ctx bounds the
// dial only. When nothing listens on the port the error matches ErrRefused
// and errdefs.ErrProtocol.
func (c *Client) DialGuest(ctx context.Context, port int) (net.Conn, error) {
	if port <= 0 || port > 65535 {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("agent: dial guest: bad port %d", port))
	}
	st, stop, err := c.open(ctx, request{Op: opDial, Port: port})
	if err != nil {
		return nil, err
	}
	br := bufio.NewReaderSize(st, maxDialAnswer)
	line, err := br.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		err = protocolError("answer longer than %d bytes", maxDialAnswer)
	}
	stopped := stop()
	if err != nil {
		_ = st.Close()
		if !stopped {
			return nil, ctxError(fmt.Sprintf("agent: dial guest port %d", port), ctx, err)
		}
		return nil, c.sessionError(fmt.Sprintf("agent: dial guest port %d", port), ctx, err)
	}
	if !stopped {
		_ = st.Close()
		return nil, ctxError(fmt.Sprintf("agent: dial guest port %d", port), ctx, ctx.Err())
	}
	if err := parseDialAnswer(line, port); err != nil {
		_ = st.Close()
		return nil, err
	}
	return &guestConn{Stream: st, r: br}, nil
}

// parseDialAnswer checks the status line (with its newline, at most
// maxDialAnswer bytes) that answers a dial: nil for "OK", else an error of
// class errdefs.ErrProtocol carrying the guest's message, printable only.
func parseDialAnswer(line []byte, port int) error {
	if len(line) > maxDialAnswer {
		return protocolError("agent: dial guest port %d: answer longer than %d bytes", port, maxDialAnswer)
	}
	s := strings.TrimSuffix(string(line), "\n")
	if s == "OK" {
		return nil
	}
	msg := strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f || r == utf8.RuneError {
			return -1
		}
		return r
	}, strings.TrimPrefix(s, "ERR "))
	if strings.Contains(msg, "refused") {
		return protocolError("agent: dial guest port %d: %w (%s)", port, ErrRefused, msg)
	}
	return protocolError("agent: dial guest port %d: %s", port, msg)
}

// guestConn is a DialGuest stream whose first bytes may sit in a bufio.Reader.
type guestConn struct {
	*yamux.Stream
	r *bufio.Reader
}

// CloseWrite sends end-of-stream to the guest (a yamux close is a
// half-close).
func (g *guestConn) CloseWrite() error { return g.Stream.Close() }

func (g *guestConn) Read(p []byte) (int, error) {
	if g.r.Buffered() > 0 {
		return g.r.Read(p)
	}
	return g.Stream.Read(p)
}

// Exec runs a command in the guest and returns how it ended. Output goes to
// out as it is produced (out may be nil). When ctx ends first, the guest
// kills the command's process group and Exec returns ctx's error (class
// errdefs.ErrTimeout for a deadline) together with whatever result arrived.
// A detached command returns as soon as it started, with its PID.
func (c *Client) Exec(ctx context.Context, req ExecRequest, out OutputFunc) (ExecResult, error) {
	if err := ctx.Err(); err != nil {
		return ExecResult{}, ctxError("agent: exec", ctx, err)
	}
	stdin := req.Stdin
	req.Stdin = nil
	// The stream must outlive ctx long enough to carry the kill.
	st, stop, err := c.open(context.WithoutCancel(ctx), request{Op: opExec, Exec: &req})
	if err != nil {
		return ExecResult{}, err
	}
	defer stop()
	defer st.Close()

	var wmu sync.Mutex // frames to the guest come from two goroutines
	send := func(typ byte, p []byte) error {
		wmu.Lock()
		defer wmu.Unlock()
		return writeFrame(st, typ, p)
	}
	if !req.Detach {
		go func() {
			for len(stdin) > 0 {
				n := min(len(stdin), 64<<10)
				if send(frameStdin, stdin[:n]) != nil {
					return
				}
				stdin = stdin[n:]
			}
			_ = send(frameStdinEOF, nil)
		}()
	}

	type outcome struct {
		res ExecResult
		err error
	}
	done := make(chan outcome, 1)
	var cancelled sync.Mutex // held while calling out; set flag stops output
	stopOut := false
	go func() {
		var res ExecResult
		for {
			typ, payload, err := readFrameLimit(st, frameLimit)
			if err != nil {
				if errors.Is(err, io.EOF) {
					err = io.ErrUnexpectedEOF
				}
				done <- outcome{res, err}
				return
			}
			switch typ {
			case frameStdout, frameStderr:
				s := Stdout
				if typ == frameStderr {
					s = Stderr
				}
				cancelled.Lock()
				if out != nil && !stopOut {
					out(s, payload)
				}
				cancelled.Unlock()
			case frameStarted:
				var m startedMsg
				if err := json.Unmarshal(payload, &m); err == nil {
					res.PID = m.PID
				}
			case frameExit:
				pid := res.PID
				if err := json.Unmarshal(payload, &res); err != nil {
					done <- outcome{res, protocolError("bad exit frame: %w", err)}
					return
				}
				if len(res.Signal) > maxSignalName {
					res.Signal = ""
					done <- outcome{res, protocolError("bad exit frame: signal name longer than %d bytes", maxSignalName)}
					return
				}
				if res.PID == 0 {
					res.PID = pid
				}
				done <- outcome{res, nil}
				return
			case frameError:
				done <- outcome{res, decodeRemoteError(payload)}
				return
			default:
				done <- outcome{res, fmt.Errorf("unexpected frame %q", typ)}
				return
			}
		}
	}()

	select {
	case o := <-done:
		if o.err != nil {
			return o.res, c.sessionError("agent: exec", ctx, o.err)
		}
		return o.res, nil
	case <-ctx.Done():
	}
	// ctx ended: kill the command, stop delivering output, wait briefly for
	// the result so the guest's side of the stream ends cleanly.
	cancelled.Lock()
	stopOut = true
	cancelled.Unlock()
	// Bound the kill's write too: the guest may be gone or paused.
	_ = st.SetWriteDeadline(time.Now().Add(killGrace))
	_ = send(frameKill, nil)
	timer := time.NewTimer(killGrace)
	defer timer.Stop()
	var res ExecResult
	select {
	case o := <-done:
		res = o.res
	case <-timer.C:
		_ = st.SetDeadline(time.Now())
		o := <-done
		res = o.res
	}
	return res, ctxError("agent: exec", ctx, ctx.Err())
}
