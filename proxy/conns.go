package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
)

// connSet tracks the open connections of each sandbox so that they can be
// closed when the sandbox goes away or the proxy stops.
type connSet struct {
	mu     sync.Mutex
	closed bool
	bySbx  map[string]map[*trackedConn]struct{}
}

// errClosed is returned when a conn is added to a closed set.
var errClosed = errors.New("proxy: closed")

// track wraps c so that it is closed by closeSandbox(id) and closeAll. When
// the set is closed already, c is closed and an error returned.
func (s *connSet) track(id string, c net.Conn) (*trackedConn, error) {
	tc := &trackedConn{Conn: c, set: s, id: id}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		_ = c.Close()
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
type trackedConn struct {
	net.Conn
	set  *connSet
	id   string
	once sync.Once
	err  error
}

// Close closes the conn once and forgets it.
func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.set.forget(c)
		c.err = c.Conn.Close()
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
