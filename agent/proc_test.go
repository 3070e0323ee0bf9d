//go:build unix

package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// collector gathers process output.
type collector struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (c *collector) fn(_ Stream, b []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.buf.Write(b)
}

func (c *collector) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.String()
}

// killProcsAtEnd kills what srv's processes left running when the test
// ends (without a chroot they run on this host).
func killProcsAtEnd(t *testing.T, srv *Server) {
	t.Cleanup(func() {
		for _, p := range srv.procs.list() {
			_ = p.kill(syscall.SIGKILL)
		}
	})
}

func TestProcStartWaitStdin(t *testing.T) {
	t.Parallel()
	c, _, srv := newTestClient(t)
	killProcsAtEnd(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	pid, err := c.ProcStart(ctx, ProcStartRequest{ID: "p1", Command: "read a; echo got $a; echo err >&2; exit 3", Tag: "t"})
	if err != nil || pid <= 0 {
		t.Fatalf("ProcStart: %d %v", pid, err)
	}
	if _, err := c.ProcStart(ctx, ProcStartRequest{ID: "p1", Command: "true"}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("duplicate id: %v", err)
	}
	list, err := c.ProcList(ctx)
	if err != nil || len(list) != 1 || list[0].ID != "p1" || !list[0].Running || list[0].Tag != "t" || list[0].PID != pid {
		t.Fatalf("ProcList = %+v, %v", list, err)
	}
	if n, err := c.ProcStdin(ctx, "p1", []byte("hello\n"), false); err != nil || n != 6 {
		t.Fatalf("ProcStdin: %d %v", n, err)
	}
	var out collector
	res, err := c.ProcWait(ctx, "p1", out.fn)
	if err != nil || res.ExitCode != 3 || res.PID != pid {
		t.Fatalf("ProcWait = %+v, %v", res, err)
	}
	if got := out.String(); !strings.Contains(got, "got hello\n") || !strings.Contains(got, "err\n") {
		t.Fatalf("output %q", got)
	}
	list, _ = c.ProcList(ctx)
	if len(list) != 1 || list[0].Running || list[0].Exit == nil || list[0].Exit.ExitCode != 3 {
		t.Fatalf("after exit: %+v", list)
	}
	if _, err := c.ProcWait(ctx, "nope", nil); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("wait unknown: %v", err)
	}
}

// Output made while nobody waits is kept (the process blocks on its pipe)
// and survives a waiter that went away and a dropped session.
func TestProcOutputOutlivesSession(t *testing.T) {
	t.Parallel()
	host, guest := socketPair(t)
	srv := &Server{}
	serve(t, srv, guest)
	killProcsAtEnd(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c1 := connect(t, host)
	const lines = 20000 // ~150 KB: more than a pipe holds
	if _, err := c1.ProcStart(ctx, ProcStartRequest{ID: "bg", Command: fmt.Sprintf("i=0; while [ $i -lt %d ]; do echo line$i; i=$((i+1)); done", lines)}); err != nil {
		t.Fatal(err)
	}
	// A waiter that gives up early.
	// One cursor across the waits, as the worker keeps one per process.
	var cur ProcCursor
	var first collector
	wctx, wcancel := context.WithTimeout(ctx, 300*time.Millisecond)
	_, err := c1.ProcWaitFrom(wctx, "bg", &cur, first.fn)
	wcancel()
	if !cur.Known || cur.Stdout != int64(len(first.String())) {
		t.Fatalf("cursor after the first wait: %+v, %d bytes taken", cur, len(first.String()))
	}
	if err == nil {
		t.Log("process finished within the first wait")
	}
	if err := c1.Quiesce(ctx); err != nil {
		t.Fatal(err)
	}
	c2, err := Connect(ctx, host)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	// The second waiter says how much it has: what the first one lost in
	// flight (written by the guest, never read by its host) comes again.
	var rest collector
	res, err := c2.ProcWaitFrom(ctx, "bg", &cur, rest.fn)
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("second wait: %+v %v", res, err)
	}
	all := first.String() + rest.String()
	var want strings.Builder
	for i := range lines {
		fmt.Fprintf(&want, "line%d\n", i)
	}
	if all != want.String() {
		t.Fatalf("output lost or reordered: got %d bytes, want %d", len(all), want.Len())
	}
}

func TestProcSignalAndPTY(t *testing.T) {
	t.Parallel()
	c, _, srv := newTestClient(t)
	killProcsAtEnd(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := c.ProcStart(ctx, ProcStartRequest{ID: "s", Command: "sleep 100"}); err != nil {
		t.Fatal(err)
	}
	if err := c.ProcSignal(ctx, "s", "TERM"); err != nil {
		t.Fatal(err)
	}
	res, err := c.ProcWait(ctx, "s", nil)
	if err != nil || res.ExitCode != 128+15 || res.Signal == "" {
		t.Fatalf("after TERM: %+v %v", res, err)
	}
	if err := c.ProcSignal(ctx, "s", "TERM"); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("signal after exit: %v", err)
	}
	if err := c.ProcSignal(ctx, "s", "BOGUS"); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("bad signal: %v", err)
	}

	if _, err := c.ProcStart(ctx, ProcStartRequest{ID: "tty", Command: "sh -i", PTY: &PTYSize{Cols: 80, Rows: 24}}); err != nil {
		t.Fatal(err)
	}
	var out collector
	waited := make(chan error, 1)
	go func() { _, err := c.ProcWait(ctx, "tty", out.fn); waited <- err }()
	if _, err := c.ProcStdin(ctx, "tty", []byte("stty size\n"), false); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return strings.Contains(out.String(), "24 80") }, "stty size 24 80 in "+out.String())
	if err := c.ProcResize(ctx, "tty", PTYSize{Cols: 120, Rows: 40}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ProcStdin(ctx, "tty", []byte("stty size; exit 7\n"), false); err != nil {
		t.Fatal(err)
	}
	if err := <-waited; err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "40 120") {
		t.Fatalf("after resize: %q", out.String())
	}
	if err := c.ProcResize(ctx, "s", PTYSize{Cols: 1, Rows: 1}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("resize without pty: %v", err)
	}
}

func waitFor(t *testing.T, ok func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A process whose child keeps its output open still ends: once it exited
// and the output is idle while a waiter takes it, the outputs are closed.
func TestProcChildHoldsOutput(t *testing.T) {
	t.Parallel()
	c, _, srv := newTestClient(t)
	killProcsAtEnd(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := c.ProcStart(ctx, ProcStartRequest{ID: "hold", Command: "sleep 30 & echo child $!"}); err != nil {
		t.Fatal(err)
	}
	var out collector
	t0 := time.Now()
	res, err := c.ProcWait(ctx, "hold", out.fn)
	var child int
	if _, serr := fmt.Sscanf(out.String(), "child %d\n", &child); serr == nil && child > 0 {
		t.Cleanup(func() { _ = syscall.Kill(child, syscall.SIGKILL) })
	}
	if err != nil || res.ExitCode != 0 || child <= 0 {
		t.Fatalf("wait = %+v, %v, output %q", res, err, out.String())
	}
	if d := time.Since(t0); d > 5*time.Second {
		t.Fatalf("wait took %s with a child holding the output", d)
	}
}

// TestProcWaitFromResendsInFlight: a waiter whose host stops reading
// (frames the guest wrote sit in the host's stream buffer) and then closes
// its stream loses those frames; the next waiter, saying how much it has,
// gets them again, so the output is whole, in order, with nothing twice.
func TestProcWaitFromResendsInFlight(t *testing.T) {
	t.Parallel()
	host, guest := socketPair(t)
	srv := &Server{}
	serve(t, srv, guest)
	killProcsAtEnd(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c1 := connect(t, host)
	const lines = 40000 // ~290 KB: more than the host's stream window
	if _, err := c1.ProcStart(ctx, ProcStartRequest{ID: "fl", Command: fmt.Sprintf("i=0; while [ $i -lt %d ]; do echo line$i; i=$((i+1)); done", lines)}); err != nil {
		t.Fatal(err)
	}
	// A waiter that reads a few frames, stops reading while the guest
	// writes on into its window, and closes its stream.
	st, stop, err := c1.open(ctx, request{Op: opProcWait, Proc: &procRequest{ID: "fl"}})
	if err != nil {
		t.Fatal(err)
	}
	var first bytes.Buffer
	for first.Len() < 10000 {
		typ, payload, err := readFrameLimit(st, frameLimit)
		if err != nil {
			t.Fatal(err)
		}
		if typ == frameStdout {
			first.Write(payload)
		}
	}
	time.Sleep(300 * time.Millisecond)
	stop()
	_ = st.Close()
	var rest collector
	res, err := c1.ProcWaitFrom(ctx, "fl", &ProcCursor{ProcOffsets: ProcOffsets{Stdout: int64(first.Len())}, Known: true}, rest.fn)
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("second wait: %+v %v", res, err)
	}
	var want strings.Builder
	for i := range lines {
		fmt.Fprintf(&want, "line%d\n", i)
	}
	if all := first.String() + rest.String(); all != want.String() {
		t.Fatalf("output lost, doubled or reordered: got %d bytes (first %d), want %d; %+v", len(all), first.Len(), want.Len(), res)
	}
}

// TestProcRetentionBounded: sent output kept for new waiters is bounded per
// process and, across the table, trimmed from the other processes when a
// busy one needs room.
func TestProcRetentionBounded(t *testing.T) {
	var table procTable
	mk := func(id string) *guestProc {
		p := &guestProc{id: id, drained: make(chan struct{})}
		p.cond = sync.NewCond(&p.mu)
		if err := table.add(p); err != nil {
			t.Fatal(err)
		}
		return p
	}
	frame := append(frameHeader(frameStdout, 64<<10), make([]byte, 64<<10)...)
	// send waits for a queued frame and marks it sent, as a waiter would.
	send := func(p *guestProc) {
		p.mu.Lock()
		for p.next == p.base+uint64(len(p.frames)) {
			p.cond.Wait()
		}
		p.next = p.base + uint64(len(p.frames))
		p.trimLocked()
		p.cond.Broadcast()
		p.mu.Unlock()
	}
	var procs []*guestProc
	for i := range 6 {
		p := mk(fmt.Sprintf("p%d", i))
		procs = append(procs, p)
		for range 80 { // 5 MiB each
			go send(p) // deliver waits until its frame is sent
			p.deliver(frame)
		}
		p.mu.Lock()
		kept := p.retained
		p.mu.Unlock()
		if kept > retainBytes {
			t.Fatalf("%s keeps %d bytes, more than %d", p.id, kept, retainBytes)
		}
	}
	if got := table.retained.Load(); got > guestRetainBytes+retainBytes {
		t.Fatalf("the table keeps %d bytes, more than %d", got, guestRetainBytes+retainBytes)
	}
	var sum int64
	for _, p := range procs {
		p.mu.Lock()
		sum += int64(p.retained)
		p.mu.Unlock()
	}
	if sum != table.retained.Load() {
		t.Fatalf("the table counts %d bytes, its processes keep %d", table.retained.Load(), sum)
	}
}
