package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// connSet tracks the open connections of each sandbox so that they can be
// closed when the sandbox goes away or the proxy stops, or when they stay
// idle too long.
type connSet struct {
	// idle closes a conn that carried no byte either way for this long;
	// 0 never does. Set it before the first track.
	idle time.Duration

	mu     sync.Mutex
	closed bool
	bySbx  map[string]map[*trackedConn]struct{}
}

// errClosed is returned when a conn is added to a closed set.
var errClosed = errors.New("proxy: closed")

// track wraps c so that it is closed by closeSandbox(id) and closeAll. When
// the set is closed already, c is closed and an error returned. onClose, if
// not nil, runs once when the conn is closed (at once on an error).
func (s *connSet) track(id string, c net.Conn, onClose func()) (*trackedConn, error) {
	tc := &trackedConn{Conn: c, set: s, id: id, onClose: onClose}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		_ = c.Close()
		if onClose != nil {
			onClose()
		}
		return nil, errClosed
	}
	if s.bySbx == nil {
		s.bySbx = make(map[string]map[*trackedConn]struct{})
	}
	m := s.bySbx[id]
	if m == nil {
		m = make(map[*trackedConn]struct{})
		s.bySbx[id] = m
	}
	m[tc] = struct{}{}
	s.mu.Unlock()
	if s.idle > 0 {
		tc.touch()
		tc.mu.Lock()
		tc.timer = time.AfterFunc(s.idle, tc.checkIdle)
		tc.mu.Unlock()
	}
	return tc, nil
}

// forget removes tc from the set.
func (s *connSet) forget(tc *trackedConn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if m := s.bySbx[tc.id]; m != nil {
		delete(m, tc)
		if len(m) == 0 {
			delete(s.bySbx, tc.id)
		}
	}
}

// closeSandbox closes every tracked conn of sandbox id.
func (s *connSet) closeSandbox(id string) {
	s.mu.Lock()
	m := s.bySbx[id]
	delete(s.bySbx, id)
	s.mu.Unlock()
	for tc := range m {
		_ = tc.Close()
	}
}

// closeAll closes every tracked conn; later track calls fail.
func (s *connSet) closeAll() {
	s.mu.Lock()
	s.closed = true
	all := s.bySbx
	s.bySbx = nil
	s.mu.Unlock()
	for _, m := range all {
		for tc := range m {
			_ = tc.Close()
		}
	}
}

// count returns how many conns sandbox id has open.
func (s *connSet) count(id string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.bySbx[id])
}

// trackedConn is a conn in a connSet; closing it removes it from the set.
// With an idle timeout, reads and writes mark it active and a timer closes
// it once it has been idle that long.
type trackedConn struct {
	net.Conn
	set     *connSet
	id      string
	onClose func() // run once by Close; may be nil
	once    sync.Once
	err     error

	last  atomic.Int64 // unix nanoseconds of the last byte read or written
	idled atomic.Bool  // closed for being idle
	mu    sync.Mutex
	timer *time.Timer
}

// Read reads and marks the conn active.
func (c *trackedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.touch()
	}
	return n, err
}

// Write writes and marks the conn active.
func (c *trackedConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	if n > 0 {
		c.touch()
	}
	return n, err
}

// touch records activity now.
func (c *trackedConn) touch() { c.last.Store(time.Now().UnixNano()) }

// checkIdle runs when the idle timer fires: it closes a conn idle for the
// whole timeout, or waits for the rest of it.
func (c *trackedConn) checkIdle() {
	idle := time.Since(time.Unix(0, c.last.Load()))
	if idle >= c.set.idle {
		c.idled.Store(true)
		_ = c.Close()
		return
	}
	c.mu.Lock()
	if c.timer != nil {
		c.timer.Reset(c.set.idle - idle)
	}
	c.mu.Unlock()
}

// Close closes the conn once and forgets it.
func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.mu.Lock()
		if c.timer != nil {
			c.timer.Stop()
			c.timer = nil
		}
		c.mu.Unlock()
		c.set.forget(c)
		c.err = c.Conn.Close()
		if c.onClose != nil {
			c.onClose()
		}
	})
	return c.err
}

// CloseWrite half-closes the conn when the underlying conn can.
func (c *trackedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.ErrUnsupported
}

// pipe copies between a and b in both directions until both directions have
// ended, then closes both. The end of one direction is passed on as a
// half-close (CloseWrite) when the receiving conn supports it; otherwise, or
// on an error, both conns are closed at once so the other direction ends
// too.
func pipe(a, b net.Conn) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		copyHalf(b, a)
	}()
	copyHalf(a, b)
	<-done
	_ = a.Close()
	_ = b.Close()
}

// copyHalf copies src to dst and passes src's end on to dst.
func copyHalf(dst, src net.Conn) {
	_, err := io.Copy(dst, src)
	if err == nil {
		if cw, ok := dst.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
			return
		}
	}
	_ = dst.Close()
	_ = src.Close()
}

// sandboxLimit counts what each sandbox holds open against a cap.
type sandboxLimit struct {
	max int

	mu sync.Mutex
	n  map[string]int
}

// acquire takes one slot of sandbox id; false when it holds max already.
func (l *sandboxLimit) acquire(id string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.n[id] >= l.max {
		return false
	}
	if l.n == nil {
		l.n = make(map[string]int)
	}
	l.n[id]++
	return true
}

// release gives back a slot taken by acquire.
func (l *sandboxLimit) release(id string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.n[id] <= 1 {
		delete(l.n, id)
		return
	}
	l.n[id]--
}

// count returns how many slots sandbox id holds.
func (l *sandboxLimit) count(id string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n[id]
}
