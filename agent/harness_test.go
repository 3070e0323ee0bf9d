//go:build unix

package agent

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/internal/socketpair"
)

// socketPair returns the host end (a net.Conn, like QEMU's chardev socket)
// and the guest end (a file, like the virtio port) of a unix socket pair.
func socketPair(t *testing.T) (net.Conn, *os.File) { return socketpair.New(t) }

// serve runs srv on dev until the test ends.
func serve(t *testing.T, srv *Server, dev io.ReadWriter) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, dev) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Errorf("Serve did not return after cancel")
		}
	})
}

// newTestClient starts a no-chroot server on a socket pair and connects.
func newTestClient(t *testing.T) (*Client, net.Conn, *Server) {
	t.Helper()
	host, guest := socketPair(t)
	srv := &Server{}
	serve(t, srv, guest)
	c := connect(t, host)
	return c, host, srv
}

func connect(t *testing.T, conn net.Conn) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Connect(ctx, conn)
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// output collects exec output.
type output struct {
	mu             sync.Mutex
	stdout, stderr bytes.Buffer
}

func (o *output) fn(s Stream, b []byte) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if s == Stdout {
		o.stdout.Write(b)
	} else {
		o.stderr.Write(b)
	}
}

func (o *output) Stdout() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.stdout.String()
}

func (o *output) Stderr() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.stderr.String()
}

// run execs req with a 20 s bound and returns output and result.
func run(t *testing.T, c *Client, req ExecRequest) (*output, ExecResult, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var o output
	res, err := c.Exec(ctx, req, o.fn)
	return &o, res, err
}

// mustRun is run that fails the test on an error.
func mustRun(t *testing.T, c *Client, req ExecRequest) (*output, ExecResult) {
	t.Helper()
	o, res, err := run(t, c, req)
	if err != nil {
		t.Fatalf("Exec(%q): %v", req.Command, err)
	}
	return o, res
}

// checkRun reports where o and res differ from the stdout, stderr, exit
// code and signal wanted.
func checkRun(t *testing.T, o *output, res ExecResult, stdout, stderr string, exitCode int, signal string) {
	t.Helper()
	if got := o.Stdout(); got != stdout {
		t.Errorf("stdout = %q, want %q", got, stdout)
	}
	if got := o.Stderr(); got != stderr {
		t.Errorf("stderr = %q, want %q", got, stderr)
	}
	if res.ExitCode != exitCode || res.Signal != signal {
		t.Errorf("result = %+v, want exit %d signal %q", res, exitCode, signal)
	}
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// processGone reports whether pid no longer exists (or is a zombie whose
// parent is not us).
func processGone(pid int) bool {
	err := syscall.Kill(pid, 0)
	return errors.Is(err, syscall.ESRCH)
}

// echoListener starts a TCP echo server on loopback and returns its port.
func echoListener(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return l.Addr().(*net.TCPAddr).Port
}
