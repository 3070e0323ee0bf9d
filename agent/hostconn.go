package agent

import (
	"net"
	"sync"
	"time"
)

// sessConn is what the host's yamux session reads and writes: the channel
// conn, minus the right to close it. Closing a sessConn stops the session's
// use of conn (in-flight reads and writes are cut short with a deadline) and
// leaves conn open for the next session. When conn does not support
// deadlines, closing falls back to closing conn.
type sessConn struct {
	conn    net.Conn
	pending []byte // bytes read past the handshake, served first

	mu     sync.Mutex
	cond   *sync.Cond
	active int
	closed bool
}

func newSessConn(conn net.Conn, pending []byte) *sessConn {
	c := &sessConn{conn: conn, pending: pending}
	c.cond = sync.NewCond(&c.mu)
	return c
}

func (c *sessConn) enter() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.active++
	return true
}

func (c *sessConn) leave() {
	c.mu.Lock()
	c.active--
	if c.active == 0 {
		c.cond.Broadcast()
	}
	c.mu.Unlock()
}

func (c *sessConn) Read(p []byte) (int, error) {
	if !c.enter() {
		return 0, net.ErrClosed
	}
	defer c.leave()
	c.mu.Lock()
	if len(c.pending) > 0 {
		n := copy(p, c.pending)
		c.pending = c.pending[n:]
		c.mu.Unlock()
		return n, nil
	}
	c.mu.Unlock()
	return c.conn.Read(p)
}

func (c *sessConn) Write(p []byte) (int, error) {
	if !c.enter() {
		return 0, net.ErrClosed
	}
	defer c.leave()
	return c.conn.Write(p)
}

// Close detaches the session from conn and waits until no read or write of
// the session is in flight.
func (c *sessConn) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	c.mu.Unlock()

	if err := c.conn.SetDeadline(time.Now()); err != nil {
		// Without deadlines a blocked read cannot be stopped any other way.
		return c.conn.Close()
	}
	c.mu.Lock()
	for c.active > 0 {
		c.cond.Wait()
	}
	c.mu.Unlock()
	return c.conn.SetDeadline(time.Time{})
}
