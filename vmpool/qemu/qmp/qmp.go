// Package qmp is a small client for the QEMU Machine Protocol: it reads the
// greeting, negotiates capabilities, matches replies to commands by id and
// delivers asynchronous events apart.
//
// It is written by hand rather than taken from github.com/digitalocean/go-qemu:
// that module is largely unmaintained, drags in libvirt RPC code generation,
// and its monitor does not match replies by id (one command at a time, events
// on a shared stream). What firkin needs is a few hundred lines.
package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// ErrClosed is returned by Execute once the connection has ended.
var ErrClosed = errors.New("qmp: connection closed")

// Error is an error reply from QEMU.
type Error struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *Error) Error() string { return "qmp: " + e.Class + ": " + e.Desc }

// Unwrap classifies the error for errors.Is with the errdefs classes.
func (e *Error) Unwrap() error {
	switch e.Class {
	case "DeviceNotFound", "DeviceNotActive", "CommandNotFound":
		return errdefs.ErrNotFound
	case "KVMMissingCap":
		return errdefs.ErrUnsupported
	}
	return errdefs.ErrFailedPrecondition
}

// Event is an asynchronous QMP event.
type Event struct {
	Name      string          `json:"event"`
	Data      json.RawMessage `json:"data,omitempty"`
	Timestamp struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

// Greeting is what QEMU says first.
type Greeting struct {
	QMP struct {
		Version struct {
			QEMU struct {
				Major int `json:"major"`
				Minor int `json:"minor"`
				Micro int `json:"micro"`
			} `json:"qemu"`
			Package string `json:"package"`
		} `json:"version"`
		Capabilities []string `json:"capabilities"`
	} `json:"QMP"`
}

// message is any message QEMU sends.
type message struct {
	ID     json.RawMessage `json:"id,omitempty"`
	Return json.RawMessage `json:"return,omitempty"`
	Error  *Error          `json:"error,omitempty"`
	Event  string          `json:"event,omitempty"`
	QMP    json.RawMessage `json:"QMP,omitempty"`
}

type result struct {
	ret json.RawMessage
	err error
}

// Client is a QMP connection. It is safe for concurrent use.
type Client struct {
	conn     net.Conn
	greeting Greeting
	events   chan Event

	wmu sync.Mutex // serialises writes

	mu      sync.Mutex
	nextID  uint64
	pending map[string]chan result
	err     error // set once the reader ends
	done    chan struct{}
}

// EventBuffer is how many events are buffered for Events before the oldest
// are dropped.
const EventBuffer = 64

// Connect reads the greeting on conn, negotiates capabilities and starts the
// reader. ctx bounds the negotiation only. On failure conn is closed.
func Connect(ctx context.Context, conn net.Conn) (*Client, error) {
	c := &Client{
		conn:    conn,
		events:  make(chan Event, EventBuffer),
		pending: map[string]chan result{},
		done:    make(chan struct{}),
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Now()) })
	r := bufio.NewReaderSize(conn, 64<<10)
	line, err := r.ReadBytes('\n')
	if err == nil {
		err = json.Unmarshal(line, &c.greeting)
		if err == nil && c.greeting.QMP.Version.QEMU.Major == 0 {
			err = fmt.Errorf("not a QMP greeting: %.100q", line)
		}
	}
	if !stop() {
		_ = conn.Close()
		return nil, errdefs.Wrap(errdefs.ErrTimeout, fmt.Errorf("qmp: greeting: %w", context.Cause(ctx)))
	}
	if err != nil {
		_ = conn.Close()
		return nil, errdefs.Wrap(errdefs.ErrProtocol, fmt.Errorf("qmp: greeting: %w", err))
	}
	go c.read(r)
	if _, err := c.Execute(ctx, "qmp_capabilities", nil); err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("qmp: capabilities: %w", err)
	}
	return c, nil
}

// Dial connects to the QMP unix socket at path.
func Dial(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrNotFound, fmt.Errorf("qmp: dial %s: %w", path, err))
	}
	return Connect(ctx, conn)
}

// Greeting returns QEMU's greeting (its version).
func (c *Client) Greeting() Greeting { return c.greeting }

// Events delivers asynchronous events. When nobody reads, the oldest buffered
// events are dropped; the channel is closed when the connection ends.
func (c *Client) Events() <-chan Event { return c.events }

// Done is closed when the connection has ended (QEMU exited or Close).
func (c *Client) Done() <-chan struct{} { return c.done }

// Close closes the connection. Pending commands fail with ErrClosed.
func (c *Client) Close() error {
	err := c.conn.Close()
	<-c.done
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

func (c *Client) read(r *bufio.Reader) {
	var err error
	for {
		var line []byte
		line, err = r.ReadBytes('\n')
		if err != nil {
			break
		}
		var m message
		if jerr := json.Unmarshal(line, &m); jerr != nil {
			err = errdefs.Wrap(errdefs.ErrProtocol, fmt.Errorf("qmp: bad message %.100q: %w", line, jerr))
			break
		}
		if m.Event != "" {
			var ev Event
			if json.Unmarshal(line, &ev) == nil {
				c.deliver(ev)
			}
			continue
		}
		c.mu.Lock()
		ch, ok := c.pending[string(m.ID)]
		delete(c.pending, string(m.ID))
		c.mu.Unlock()
		if !ok {
			continue // a reply to nobody (no id): ignore
		}
		if m.Error != nil {
			ch <- result{err: m.Error}
		} else {
			ch <- result{ret: m.Return}
		}
	}
	_ = c.conn.Close()
	c.mu.Lock()
	c.err = fmt.Errorf("%w: %v", ErrClosed, err)
	for id, ch := range c.pending {
		ch <- result{err: errdefs.Wrap(errdefs.ErrFailedPrecondition, c.err)}
		delete(c.pending, id)
	}
	c.mu.Unlock()
	close(c.events)
	close(c.done)
}

func (c *Client) deliver(ev Event) {
	for {
		select {
		case c.events <- ev:
			return
		default:
		}
		select { // full: drop the oldest
		case <-c.events:
		default:
		}
	}
}

// Execute runs command with args (nil or anything that marshals to a JSON
// object) and returns the raw "return" value. ctx bounds the wait for the
// reply; a command whose ctx ended may still take effect in QEMU.
func (c *Client) Execute(ctx context.Context, command string, args any) (json.RawMessage, error) {
	return c.execute(ctx, command, args, nil)
}

// ExecuteWithFile is Execute that passes f to QEMU with the command
// (SCM_RIGHTS on the same message), as getfd and add-fd want. The
// connection must be a unix socket. QEMU holds its own copy of the
// descriptor: the caller closes f when it likes.
func (c *Client) ExecuteWithFile(ctx context.Context, command string, args any, f *os.File) (json.RawMessage, error) {
	if f == nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("qmp: %s: no file to pass", command))
	}
	if _, ok := c.conn.(*net.UnixConn); !ok {
		return nil, errdefs.Wrap(errdefs.ErrUnsupported, fmt.Errorf("qmp: %s: passing a file needs a unix socket, not %T", command, c.conn))
	}
	return c.execute(ctx, command, args, f)
}

func (c *Client) execute(ctx context.Context, command string, args any, f *os.File) (json.RawMessage, error) {
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, errdefs.Wrap(errdefs.ErrFailedPrecondition, fmt.Errorf("qmp: %s: %w", command, err))
	}
	c.nextID++
	id := strconv.Quote("c" + strconv.FormatUint(c.nextID, 10))
	ch := make(chan result, 1)
	c.pending[id] = ch
	c.mu.Unlock()

	req := struct {
		Execute   string          `json:"execute"`
		Arguments any             `json:"arguments,omitempty"`
		ID        json.RawMessage `json:"id"`
	}{command, args, json.RawMessage(id)}
	b, err := json.Marshal(req)
	if err != nil {
		c.forget(id)
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("qmp: %s: %w", command, err))
	}
	b = append(b, '\n')
	c.wmu.Lock()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.conn.SetWriteDeadline(dl)
	}
	if f != nil {
		err = writeWithFile(c.conn.(*net.UnixConn), b, f)
	} else {
		_, err = c.conn.Write(b)
	}
	_ = c.conn.SetWriteDeadline(time.Time{})
	c.wmu.Unlock()
	if err != nil {
		// A write that fails leaves the connection unusable (QEMU hung up,
		// or the reader closed it on a bad message): report it as closed.
		c.forget(id)
		return nil, errdefs.Wrap(errdefs.ErrFailedPrecondition, fmt.Errorf("qmp: %s: %w: %w", command, ErrClosed, err))
	}
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, fmt.Errorf("qmp: %s: %w", command, r.err)
		}
		return r.ret, nil
	case <-ctx.Done():
		c.forget(id)
		return nil, errdefs.Wrap(errdefs.ErrTimeout, fmt.Errorf("qmp: %s: %w", command, ctx.Err()))
	}
}

// writeWithFile writes b with f's descriptor attached to its first byte.
func writeWithFile(conn *net.UnixConn, b []byte, f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var n int
	cerr := rc.Control(func(fd uintptr) {
		n, _, err = conn.WriteMsgUnix(b, unix.UnixRights(int(fd)), nil)
	})
	if cerr != nil {
		return cerr
	}
	if err != nil {
		return err
	}
	if n < len(b) { // the rest of the line, the descriptor went with the start
		_, err = conn.Write(b[n:])
	}
	return err
}

func (c *Client) forget(id string) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

// Run is Execute that decodes the return value into out (when not nil).
func (c *Client) Run(ctx context.Context, command string, args, out any) error {
	ret, err := c.Execute(ctx, command, args)
	if err != nil || out == nil {
		return err
	}
	if err := json.Unmarshal(ret, out); err != nil {
		return errdefs.Wrap(errdefs.ErrProtocol, fmt.Errorf("qmp: %s: decode reply: %w", command, err))
	}
	return nil
}
