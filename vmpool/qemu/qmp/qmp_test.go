package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// socketpair returns two connected unix stream conns.
func socketpair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	return conn(fds[0]), conn(fds[1])
}

const greeting = `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}` + "\n"

type request struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments"`
	ID        json.RawMessage `json:"id"`
}

// fakeQEMU serves the greeting and answers with handle, which returns the
// lines to write for each request (errors go to errc, never t.Fatal).
func fakeQEMU(conn net.Conn, handle func(req request) []string) <-chan error {
	errc := make(chan error, 1)
	go func() {
		defer conn.Close()
		if _, err := conn.Write([]byte(greeting)); err != nil {
			errc <- err
			return
		}
		sc := bufio.NewScanner(conn)
		for sc.Scan() {
			var req request
			if err := json.Unmarshal(sc.Bytes(), &req); err != nil {
				errc <- err
				return
			}
			for _, l := range handle(req) {
				if _, err := conn.Write([]byte(l + "\n")); err != nil {
					errc <- err
					return
				}
			}
		}
		errc <- nil
	}()
	return errc
}

func ok(req request, ret string) string {
	return `{"return": ` + ret + `, "id": ` + string(req.ID) + `}`
}

func TestConnectAndExecute(t *testing.T) {
	a, b := socketpair(t)
	fakeQEMU(b, func(req request) []string {
		switch req.Execute {
		case "qmp_capabilities":
			return []string{ok(req, "{}")}
		case "query-status":
			// An event comes first, then the reply.
			return []string{`{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}`,
				ok(req, `{"status": "paused", "running": false}`)}
		case "bad":
			return []string{`{"error": {"class": "CommandNotFound", "desc": "The command bad has not been found"}, "id": ` + string(req.ID) + `}`}
		case "generic":
			return []string{`{"error": {"class": "GenericError", "desc": "nope"}, "id": ` + string(req.ID) + `}`}
		}
		return nil // never answered
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Connect(ctx, a)
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	defer c.Close()
	if v := c.Greeting().QMP.Version.QEMU; v.Major != 7 || v.Minor != 2 {
		t.Errorf("greeting version %+v", v)
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := c.Run(ctx, "query-status", nil, &st); err != nil || st.Status != "paused" {
		t.Fatalf("query-status: %+v %v", st, err)
	}
	select {
	case ev := <-c.Events():
		if ev.Name != "STOP" || ev.Timestamp.Seconds != 1 {
			t.Errorf("event %+v", ev)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no event")
	}
	_, err = c.Execute(ctx, "bad", nil)
	var qe *Error
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" || !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("bad: %v", err)
	}
	if _, err := c.Execute(ctx, "generic", nil); !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "nope") {
		t.Errorf("generic: %v", err)
	}
	short, cancel2 := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel2()
	if _, err := c.Execute(short, "silent", nil); !errors.Is(err, errdefs.ErrTimeout) {
		t.Errorf("silent: %v", err)
	}
}

// Replies are matched by id even when QEMU answers out of order.
func TestRepliesMatchedByID(t *testing.T) {
	a, b := socketpair(t)
	var held *request
	fakeQEMU(b, func(req request) []string {
		switch req.Execute {
		case "qmp_capabilities":
			return []string{ok(req, "{}")}
		case "first":
			held = &req
			return nil
		case "second":
			return []string{ok(req, `"two"`), ok(*held, `"one"`)}
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Connect(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	type res struct {
		ret string
		err error
	}
	first := make(chan res, 1)
	go func() {
		r, err := c.Execute(ctx, "first", nil)
		first <- res{string(r), err}
	}()
	// Wait for "first" to be sent before "second".
	deadline := time.Now().Add(5 * time.Second)
	for {
		c.mu.Lock()
		n := len(c.pending)
		c.mu.Unlock()
		if n == 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	r, err := c.Execute(ctx, "second", map[string]any{"x": 1})
	if err != nil || string(r) != `"two"` {
		t.Fatalf("second: %s %v", r, err)
	}
	if got := <-first; got.err != nil || got.ret != `"one"` {
		t.Fatalf("first: %+v", got)
	}
}

func TestConnectionLoss(t *testing.T) {
	a, b := socketpair(t)
	fakeQEMU(b, func(req request) []string {
		if req.Execute == "qmp_capabilities" {
			return []string{ok(req, "{}")}
		}
		b.Close() // QEMU died
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Connect(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Execute(ctx, "quit", nil); !errors.Is(err, ErrClosed) {
		t.Errorf("pending command after loss: %v", err)
	}
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("Done not closed")
	}
	if _, ok := <-c.Events(); ok {
		t.Error("events channel open after loss")
	}
	if _, err := c.Execute(ctx, "query-status", nil); !errors.Is(err, ErrClosed) {
		t.Errorf("command after loss: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
}

func TestBadGreeting(t *testing.T) {
	a, b := socketpair(t)
	go func() { b.Write([]byte("hello\n")) }()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := Connect(ctx, a); !errors.Is(err, errdefs.ErrProtocol) {
		t.Errorf("Connect: %v", err)
	}
	c, d := socketpair(t)
	_ = d
	short, cancel2 := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel2()
	if _, err := Connect(short, c); !errors.Is(err, errdefs.ErrTimeout) {
		t.Errorf("silent server: %v", err)
	}
}

// ExecuteWithFile sends the descriptor with the command: the peer receives
// the same open file (here a pipe) in the command's message.
func TestExecuteWithFile(t *testing.T) {
	a, b := socketpair(t)
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()
	type got struct {
		cmd  string
		data string
		err  error
	}
	gotc := make(chan got, 1)
	go func() {
		g := got{}
		defer func() { gotc <- g }()
		u := b.(*net.UnixConn)
		if _, g.err = u.Write([]byte(greeting)); g.err != nil {
			return
		}
		var pending []byte
		for range 2 { // qmp_capabilities, then getfd
			buf, oob := make([]byte, 4096), make([]byte, 128)
			n, oobn, _, _, err := u.ReadMsgUnix(buf, oob)
			if err != nil {
				g.err = err
				return
			}
			pending = append(pending, buf[:n]...)
			var req request
			if g.err = json.Unmarshal(pending, &req); g.err != nil {
				return
			}
			pending = nil
			if oobn > 0 {
				msgs, err := syscall.ParseSocketControlMessage(oob[:oobn])
				if err != nil || len(msgs) != 1 {
					g.err = errors.Join(err, errors.New("no control message"))
					return
				}
				fds, err := syscall.ParseUnixRights(&msgs[0])
				if err != nil || len(fds) != 1 {
					g.err = errors.Join(err, errors.New("no descriptor"))
					return
				}
				f := os.NewFile(uintptr(fds[0]), "received")
				rb := make([]byte, 5)
				_, g.err = f.Read(rb)
				f.Close()
				g.cmd, g.data = req.Execute, string(rb)
			}
			if _, g.err = u.Write([]byte(ok(req, "{}") + "\n")); g.err != nil {
				return
			}
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Connect(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := pw.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ExecuteWithFile(ctx, "getfd", map[string]any{"fdname": "x"}, pr); err != nil {
		t.Fatalf("ExecuteWithFile: %v", err)
	}
	g := <-gotc
	if g.err != nil || g.cmd != "getfd" || g.data != "hello" {
		t.Errorf("peer got command %q reading %q (%v)", g.cmd, g.data, g.err)
	}
	if _, err := c.ExecuteWithFile(ctx, "getfd", nil, nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("ExecuteWithFile without a file: %v", err)
	}
}
