//go:build unix

package agent

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

func TestDialGuest(t *testing.T) {
	t.Parallel()
	c, _, _ := newTestClient(t)
	port := echoListener(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := c.DialGuest(ctx, port)
	if err != nil {
		t.Fatalf("DialGuest: %v", err)
	}
	defer conn.Close()
	msg := strings.Repeat("ping through the guest ", 50000) // ~1.1 MB
	errc := make(chan error, 1)
	go func() {
		_, err := io.WriteString(conn, msg)
		errc <- err
	}()
	buf := make([]byte, len(msg))
	if err := conn.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(conn, buf); err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if string(buf) != msg {
		t.Fatalf("echo differs")
	}
	if err := <-errc; err != nil {
		t.Fatalf("write: %v", err)
	}

	// A port nobody listens on.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := l.Addr().(*net.TCPAddr).Port
	l.Close()
	_, err = c.DialGuest(ctx, closed)
	if !errors.Is(err, ErrRefused) || !errors.Is(err, errdefs.ErrProtocol) {
		t.Errorf("DialGuest to a closed port: %v, want refused", err)
	}
	if _, err := c.DialGuest(ctx, 0); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("DialGuest to port 0: %v", err)
	}
}

func TestQuiesceReconnectSameConn(t *testing.T) {
	t.Parallel()
	host, guest := socketPair(t)
	serve(t, &Server{}, guest)

	// Garbage before the first hello is skipped.
	if _, err := host.Write([]byte("\x00\x01garbage FIRKIN/1 HELLO bad nonce!\nmore garbage")); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for round := range 3 {
		c, err := Connect(ctx, host)
		if err != nil {
			t.Fatalf("round %d: Connect: %v", round, err)
		}
		o, _ := mustRun(t, c, ExecRequest{Command: "echo round"})
		if o.Stdout() != "round\n" {
			t.Fatalf("round %d: stdout %q", round, o.Stdout())
		}
		// A command still running when the session is dropped dies with it.
		running := make(chan error, 1)
		go func() {
			_, err := c.Exec(context.Background(), ExecRequest{Command: "sleep 100"}, nil)
			running <- err
		}()
		if err := c.Quiesce(ctx); err != nil {
			t.Fatalf("round %d: Quiesce: %v", round, err)
		}
		select {
		case <-c.Done():
		case <-time.After(5 * time.Second):
			t.Fatalf("round %d: Done not closed after Quiesce", round)
		}
		select {
		case err := <-running:
			if err == nil {
				t.Errorf("round %d: exec in a dropped session succeeded", round)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("round %d: exec did not end with its session", round)
		}
		if err := c.Ping(ctx); err == nil {
			t.Fatalf("round %d: Ping after Quiesce succeeded", round)
		}
		// Garbage between sessions is skipped too.
		if _, err := host.Write([]byte("junk\n\x00\x00\x00")); err != nil {
			t.Fatal(err)
		}
	}
}

func TestCloseThenReconnect(t *testing.T) {
	t.Parallel()
	host, guest := socketPair(t)
	serve(t, &Server{}, guest)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for round := range 3 {
		c, err := Connect(ctx, host)
		if err != nil {
			t.Fatalf("round %d: Connect: %v", round, err)
		}
		if err := c.Ping(ctx); err != nil {
			t.Fatalf("round %d: Ping: %v", round, err)
		}
		if err := c.Close(); err != nil {
			t.Fatalf("round %d: Close: %v", round, err)
		}
	}
}

// TestAbandonedSession drops a session without telling the guest (the host
// process died): the next hello on the same channel must still be answered.
func TestAbandonedSession(t *testing.T) {
	t.Parallel()
	host, guest := socketPair(t)
	serve(t, &Server{}, guest)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Connect(ctx, host)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	// Tear the session down on the host only.
	if err := c.sess.Close(); err != nil {
		t.Fatal(err)
	}
	c2, err := Connect(ctx, host)
	if err != nil {
		t.Fatalf("Connect after an abandoned session: %v", err)
	}
	if err := c2.Ping(ctx); err != nil {
		t.Fatalf("Ping: %v", err)
	}
	c2.Close()
}

// fakePort behaves like a virtio-serial port in the guest: it reads EOF
// while no host is connected, holds writes until one is, and a new host can
// attach after the old one went away (a restore in a new QEMU).
type fakePort struct {
	mu   sync.Mutex
	cond *sync.Cond
	cur  *os.File
}

func newFakePort() *fakePort {
	p := &fakePort{}
	p.cond = sync.NewCond(&p.mu)
	return p
}

func (p *fakePort) attach(f *os.File) {
	p.mu.Lock()
	p.cur = f
	p.cond.Broadcast()
	p.mu.Unlock()
}

func (p *fakePort) Read(b []byte) (int, error) {
	p.mu.Lock()
	f := p.cur
	p.mu.Unlock()
	if f == nil {
		return 0, io.EOF
	}
	n, err := f.Read(b)
	if err != nil {
		p.mu.Lock()
		if p.cur == f {
			p.cur = nil
		}
		p.mu.Unlock()
		return n, io.EOF
	}
	return n, nil
}

func (p *fakePort) Write(b []byte) (int, error) {
	p.mu.Lock()
	for p.cur == nil {
		p.cond.Wait()
	}
	f := p.cur
	p.mu.Unlock()
	return f.Write(b)
}

func TestNewHostAfterRestore(t *testing.T) {
	t.Parallel()
	port := newFakePort()
	serve(t, &Server{}, port)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// First host: quiesce, then the host goes away (save, QEMU exits).
	host1, guest1 := socketPair(t)
	port.attach(guest1)
	c, err := Connect(ctx, host1)
	if err != nil {
		t.Fatal(err)
	}
	mustRun(t, c, ExecRequest{Command: "true"})
	if err := c.Quiesce(ctx); err != nil {
		t.Fatal(err)
	}
	host1.Close()

	// Second host on a new conn (restore in a new QEMU).
	host2, guest2 := socketPair(t)
	port.attach(guest2)
	c2, err := Connect(ctx, host2)
	if err != nil {
		t.Fatalf("Connect to the restored guest: %v", err)
	}
	o, _ := mustRun(t, c2, ExecRequest{Command: "echo restored"})
	if o.Stdout() != "restored\n" {
		t.Fatalf("stdout %q", o.Stdout())
	}

	// Third host after the second vanished mid-session without a quiesce.
	host2.Close()
	host3, guest3 := socketPair(t)
	port.attach(guest3)
	c3, err := Connect(ctx, host3)
	if err != nil {
		t.Fatalf("Connect after a lost host: %v", err)
	}
	if err := c3.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	c3.Close()
}

// lateOpenPort behaves like a virtio-serial port whose driver learns of a
// new host connection late: the guest's driver handles the control message
// that says "host connected" in a work queue, after the data that followed
// it. So the new host's hello can be read while the port still reads as
// disconnected: the next read returns end of file once, and the port takes
// no writes until the driver caught up (will_write_block).
type lateOpenPort struct {
	f    *os.File
	mu   sync.Mutex
	seen bool          // the hello was read
	eof  bool          // the stale end of file was returned
	open chan struct{} // closed once the driver caught up
}

func (p *lateOpenPort) Read(b []byte) (int, error) {
	p.mu.Lock()
	if p.seen && !p.eof {
		p.eof = true
		close(p.open)
		p.mu.Unlock()
		return 0, io.EOF
	}
	p.mu.Unlock()
	n, err := p.f.Read(b)
	if bytes.Contains(b[:n], []byte(helloPrefix)) {
		p.mu.Lock()
		p.seen = true
		p.mu.Unlock()
	}
	return n, err
}

func (p *lateOpenPort) Write(b []byte) (int, error) {
	p.mu.Lock()
	seen := p.seen
	p.mu.Unlock()
	if seen {
		<-p.open
	}
	return p.f.Write(b)
}

// TestStaleEOFAfterHello: an end of file the guest reads after a hello and
// before the session's first byte is the old disconnection reported late,
// not the new host leaving: the session it started must answer (it used
// to end there, and the host's first call hung until yamux gave up on the
// stream open after a minute: "ping: unexpected EOF" after a restore).
func TestStaleEOFAfterHello(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	lateOpen := func() (net.Conn, *lateOpenPort) {
		host, guest := socketPair(t)
		port := &lateOpenPort{f: guest, open: make(chan struct{})}
		serve(t, &Server{}, port)
		return host, port
	}

	host, port := lateOpen()
	c := connect(t, host)
	if err := c.Ping(ctx); err != nil {
		t.Fatalf("Ping after a stale end of file: %v", err)
	}
	port.mu.Lock()
	stale := port.eof
	port.mu.Unlock()
	if !stale {
		t.Fatal("the port never returned its stale end of file")
	}

	// A host that leaves before its first call (no quiesce, nothing sent)
	// leaves the guest an idle session: the next host's hello ends it.
	host, _ = lateOpen()
	c = connect(t, host)
	if err := c.sess.Close(); err != nil {
		t.Fatal(err)
	}
	c2 := connect(t, host)
	if err := c2.Ping(ctx); err != nil {
		t.Fatalf("Ping from the host after one that left an idle session: %v", err)
	}
}

func TestConnectTimeout(t *testing.T) {
	t.Parallel()
	host, _ := socketPair(t) // nobody serves the guest end
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := Connect(ctx, host)
	if !errors.Is(err, errdefs.ErrTimeout) {
		t.Fatalf("Connect with no guest: %v, want timeout", err)
	}
	// The conn is still usable: its deadline was cleared.
	if err := host.SetReadDeadline(time.Time{}); err != nil {
		t.Fatal(err)
	}
}

func TestServeConnEndsAtEOF(t *testing.T) {
	t.Parallel()
	host, guest := socketPair(t)
	done := make(chan error, 1)
	go func() { done <- (&Server{}).ServeConn(context.Background(), guest) }()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Connect(ctx, host)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	host.Close()
	select {
	case err := <-done:
		if !errors.Is(err, io.EOF) {
			t.Errorf("ServeConn = %v, want EOF", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ServeConn did not return when the host closed")
	}
}

func TestDialGuestHalfClose(t *testing.T) {
	t.Parallel()
	c, _, _ := newTestClient(t)
	// A server that reads a request to EOF, then answers and closes.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		s, err := l.Accept()
		if err != nil {
			return
		}
		defer s.Close()
		b, _ := io.ReadAll(s)
		_, _ = io.WriteString(s, "got "+string(b))
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := c.DialGuest(ctx, l.Addr().(*net.TCPAddr).Port)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, "request"); err != nil {
		t.Fatal(err)
	}
	if err := conn.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := io.ReadAll(conn)
	if err != nil || string(b) != "got request" {
		t.Fatalf("answer %q, %v", b, err)
	}
}

// TestQuiesceUnderLoad drops sessions while commands stream output and
// stdin flows, and checks that every next session comes up.
func TestQuiesceUnderLoad(t *testing.T) {
	t.Parallel()
	host, guest := socketPair(t)
	serve(t, &Server{}, guest)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for round := range 10 {
		c, err := Connect(ctx, host)
		if err != nil {
			t.Fatalf("round %d: Connect: %v", round, err)
		}
		var wg sync.WaitGroup
		for range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, _ = c.Exec(ctx, ExecRequest{Command: "cat; yes | head -c 5000000", Stdin: make([]byte, 1<<20)}, func(Stream, []byte) {})
			}()
		}
		if err := c.Ping(ctx); err != nil {
			t.Fatalf("round %d: Ping: %v", round, err)
		}
		if err := c.Quiesce(ctx); err != nil {
			t.Fatalf("round %d: Quiesce: %v", round, err)
		}
		wg.Wait()
	}
	c, err := Connect(ctx, host)
	if err != nil {
		t.Fatalf("final Connect: %v", err)
	}
	o, _ := mustRun(t, c, ExecRequest{Command: "echo alive"})
	if o.Stdout() != "alive\n" {
		t.Fatalf("stdout %q", o.Stdout())
	}
}

func TestShutdown(t *testing.T) {
	t.Parallel()
	host, guest := socketPair(t)
	off := make(chan struct{})
	serve(t, &Server{PowerOff: func() { close(off) }}, guest)
	c := connect(t, host)
	if err := c.Shutdown(context.Background()); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	select {
	case <-off:
	case <-time.After(5 * time.Second):
		t.Fatal("PowerOff not called")
	}

	// Without a PowerOff hook the agent says it cannot.
	c2, _, _ := newTestClient(t)
	if err := c2.Shutdown(context.Background()); !errors.Is(err, errdefs.ErrUnsupported) {
		t.Errorf("Shutdown without a hook: %v", err)
	}
}
