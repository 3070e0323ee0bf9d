//go:build linux

package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

func TestExecBasics(t *testing.T) {
	t.Parallel()
	c, _, _ := newTestClient(t)
	dir := t.TempDir()
	tests := []struct {
		name       string
		req        ExecRequest
		stdout     string
		stderr     string
		exitCode   int
		wantSignal string
	}{
		{name: "echo", req: ExecRequest{Command: "echo hello"}, stdout: "hello\n"},
		{name: "exit code", req: ExecRequest{Command: "exit 3"}, exitCode: 3},
		{name: "stdout and stderr apart", req: ExecRequest{Command: "echo out; echo err >&2; echo out2"},
			stdout: "out\nout2\n", stderr: "err\n"},
		{name: "env and cwd", req: ExecRequest{Command: `echo "$FOO $BAR"; pwd`, Env: map[string]string{"FOO": "foo", "BAR": "b a r"}, Cwd: dir},
			stdout: "foo b a r\n" + dir + "\n"},
		{name: "default cwd and home", req: ExecRequest{Command: `pwd; echo $HOME`}, stdout: "/\n/root\n"},
		{name: "stdin", req: ExecRequest{Command: "cat; echo", Stdin: []byte("from stdin")}, stdout: "from stdin\n"},
		{name: "no stdin", req: ExecRequest{Command: "cat; echo done"}, stdout: "done\n"},
		{name: "user by name", req: ExecRequest{Command: "id -u; id -g", User: "nobody"}, stdout: "65534\n65534\n"},
		{name: "user by uid", req: ExecRequest{Command: "id -u", User: "65534"}, stdout: "65534\n"},
		{name: "user uid:gid", req: ExecRequest{Command: "id -u; id -g", User: "1234:4321"}, stdout: "1234\n4321\n"},
		{name: "killed by signal", req: ExecRequest{Command: "kill -9 $$"}, exitCode: 137, wantSignal: "killed"},
		{name: "argv, no shell", req: ExecRequest{Command: "echo", Args: []string{"$HOME", "a;b", "c d"}, Direct: true}, stdout: "$HOME a;b c d\n"},
		{name: "argv by path", req: ExecRequest{Command: "/bin/sh", Args: []string{"-c", "echo $0 $FOO", "zero"}, Env: map[string]string{"FOO": "f"}, Direct: true}, stdout: "zero f\n"},
		{name: "argv exit code", req: ExecRequest{Command: "false", Direct: true}, exitCode: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			o, res := mustRun(t, c, tt.req)
			checkRun(t, o, res, tt.stdout, tt.stderr, tt.exitCode, tt.wantSignal)
			if res.PID <= 0 {
				t.Errorf("result has no PID: %+v", res)
			}
		})
	}
}

func TestExecErrors(t *testing.T) {
	t.Parallel()
	c, _, _ := newTestClient(t)
	for _, req := range []ExecRequest{
		{Command: "true", User: "no-such-user"},
		{Command: "true", Cwd: "/no/such/dir"},
		{Command: "true", Env: map[string]string{"A=B": "x"}},
	} {
		_, _, err := run(t, c, req)
		if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("Exec(%+v) error = %v, want invalid argument", req, err)
		}
	}
	// The session is still fine afterwards.
	if err := c.Ping(context.Background()); err != nil {
		t.Fatalf("Ping: %v", err)
	}
}

func TestExecConcurrent(t *testing.T) {
	t.Parallel()
	c, _, _ := newTestClient(t)
	var wg sync.WaitGroup
	errs := make([]error, 4)
	outs := make([]string, 4)
	start := time.Now()
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			var o output
			res, err := c.Exec(ctx, ExecRequest{Command: fmt.Sprintf("sleep 0.5; echo %d", i)}, o.fn)
			if err == nil && res.ExitCode != 0 {
				err = fmt.Errorf("exit %d", res.ExitCode)
			}
			errs[i], outs[i] = err, o.Stdout()
		}()
	}
	wg.Wait()
	for i := range 4 {
		if errs[i] != nil || outs[i] != fmt.Sprintf("%d\n", i) {
			t.Errorf("exec %d: out %q err %v", i, outs[i], errs[i])
		}
	}
	if d := time.Since(start); d > 1900*time.Millisecond {
		t.Errorf("four 0.5 s commands took %v: not concurrent", d)
	}
}

func TestExecLargeOutput(t *testing.T) {
	t.Parallel()
	c, _, _ := newTestClient(t)
	const n = 600000 // about 4.5 MB of numbered lines
	var want bytes.Buffer
	for i := 1; i <= n; i++ {
		want.WriteString(strconv.Itoa(i))
		want.WriteByte('\n')
	}
	o, res := mustRun(t, c, ExecRequest{Command: fmt.Sprintf("seq 1 %d; seq 1 %d >&2", n, n)})
	if res.ExitCode != 0 {
		t.Fatalf("exit %d", res.ExitCode)
	}
	if got := o.Stdout(); got != want.String() {
		t.Errorf("stdout: %d bytes, want %d; in order and whole: %v", len(got), want.Len(), got == want.String())
	}
	if got := o.Stderr(); got != want.String() {
		t.Errorf("stderr: %d bytes, want %d", len(got), want.Len())
	}

	// Large stdin goes through whole too.
	in := bytes.Repeat([]byte("0123456789abcdef"), 200000) // 3.2 MB
	o, _ = mustRun(t, c, ExecRequest{Command: "wc -c", Stdin: in})
	if got := strings.TrimSpace(o.Stdout()); got != strconv.Itoa(len(in)) {
		t.Errorf("wc -c of stdin = %q, want %d", got, len(in))
	}
}

func TestExecTimeout(t *testing.T) {
	t.Parallel()
	c, _, _ := newTestClient(t)
	start := time.Now()
	o, res := mustRun(t, c, ExecRequest{Command: "echo started; sleep 100", Timeout: 300 * time.Millisecond})
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("timeout took %v", d)
	}
	if !res.TimedOut || res.Signal != "killed" {
		t.Errorf("result = %+v, want timed out and killed", res)
	}
	if o.Stdout() != "started\n" {
		t.Errorf("stdout = %q", o.Stdout())
	}
}

func TestExecCancel(t *testing.T) {
	t.Parallel()
	c, _, _ := newTestClient(t)
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "pid")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	type outcome struct {
		res ExecResult
		err error
	}
	done := make(chan outcome, 1)
	go func() {
		// The child sleep is in the command's process group and must die too.
		res, err := c.Exec(ctx, ExecRequest{Command: "sleep 100 & echo $! > " + pidFile + "; wait"}, nil)
		done <- outcome{res, err}
	}()
	var child int
	eventually(t, 10*time.Second, "the command to start", func() bool {
		b, err := os.ReadFile(pidFile)
		if err != nil || !bytes.HasSuffix(b, []byte("\n")) {
			return false
		}
		child, _ = strconv.Atoi(strings.TrimSpace(string(b)))
		return child > 0
	})
	start := time.Now()
	cancel()
	var o outcome
	select {
	case o = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Exec did not return after cancel")
	}
	if !errors.Is(o.err, context.Canceled) {
		t.Errorf("error = %v, want context.Canceled", o.err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("cancel took %v", d)
	}
	if o.res.Signal != "killed" {
		t.Errorf("result = %+v, want killed", o.res)
	}
	eventually(t, 5*time.Second, "the background sleep to die", func() bool { return processGone(child) || isZombie(child) })

	// A deadline is reported as a timeout.
	ctx2, cancel2 := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel2()
	_, err := c.Exec(ctx2, ExecRequest{Command: "sleep 100"}, nil)
	if !errors.Is(err, errdefs.ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("error = %v, want timeout", err)
	}
}

// isZombie reports whether pid has exited but not been reaped (the test
// process is not its parent, so it may linger until its parent is gone).
func isZombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	i := bytes.LastIndexByte(b, ')')
	return i > 0 && len(b) > i+2 && b[i+2] == 'Z'
}

func TestExecDetach(t *testing.T) {
	t.Parallel()
	c, _, _ := newTestClient(t)
	marker := filepath.Join(t.TempDir(), "marker")
	start := time.Now()
	_, res := mustRun(t, c, ExecRequest{Command: "sleep 1; echo done > " + marker, Detach: true})
	if d := time.Since(start); d > 900*time.Millisecond {
		t.Errorf("detached exec took %v: it waited for the command", d)
	}
	if res.PID <= 0 {
		t.Errorf("no PID: %+v", res)
	}
	eventually(t, 10*time.Second, "the detached command to run", func() bool {
		b, _ := os.ReadFile(marker)
		return string(b) == "done\n"
	})
}

func TestInitEnv(t *testing.T) {
	t.Parallel()
	c, _, _ := newTestClient(t)
	ctx := context.Background()
	if err := c.Init(ctx, InitRequest{SandboxID: "sb1", Hostname: "sb1", Env: map[string]string{"A": "1", "B": "2"}, UnixNano: time.Now().UnixNano()}); err != nil {
		t.Fatalf("Init: %v", err)
	}
	o, _ := mustRun(t, c, ExecRequest{Command: `echo "$A $B $FIRKIN_SANDBOX_ID"`, Env: map[string]string{"B": "x"}})
	if o.Stdout() != "1 x sb1\n" {
		t.Errorf("stdout = %q", o.Stdout())
	}
	err := c.Init(ctx, InitRequest{Hostname: "bad host!"})
	if !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("Init with a bad hostname: %v", err)
	}
}

func TestFiles(t *testing.T) {
	t.Parallel()
	c, _, _ := newTestClient(t)
	ctx := context.Background()
	p := filepath.Join(t.TempDir(), "a/b/file")
	data := bytes.Repeat([]byte("x"), 3<<20+17)
	if err := c.WriteFile(ctx, p, data, 0o600); err != nil {
		t.Fatalf("WriteFile: %v", err)
	}
	fi, err := os.Stat(p)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("stat: %v %v", fi, err)
	}
	got, err := c.ReadFile(ctx, p)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("ReadFile: %d bytes, %v", len(got), err)
	}
	if _, err := c.ReadFile(ctx, p+".missing"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("ReadFile of a missing file: %v", err)
	}
	if err := c.WriteFile(ctx, "/proc/no/such/thing", []byte("x"), 0); err == nil {
		t.Errorf("WriteFile into /proc succeeded")
	}
	if err := c.Ping(ctx); err != nil {
		t.Errorf("Ping after failed write: %v", err)
	}
}

func TestExecDirectProgramNotFound(t *testing.T) {
	t.Parallel()
	c, _, _ := newTestClient(t)
	_, _, err := run(t, c, ExecRequest{Command: "no-such-program-here", Direct: true})
	if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "not found in PATH") {
		t.Fatalf("err = %v, want invalid argument, not found in PATH", err)
	}
}

func TestLookPathIn(t *testing.T) {
	root := t.TempDir()
	for _, d := range []string{"usr/bin", "bin", "rel"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	write := func(p string, mode os.FileMode) {
		if err := os.WriteFile(filepath.Join(root, p), []byte("#!/bin/sh\n"), mode); err != nil {
			t.Fatal(err)
		}
	}
	write("usr/bin/prog", 0o755)
	write("bin/prog", 0o755)
	write("bin/plain", 0o644)
	write("rel/relprog", 0o755)
	if err := os.Symlink("/bin/busybox-not-on-this-host", filepath.Join(root, "bin/applet")); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		prog, path, want string
	}{
		{"prog", "/usr/bin:/bin", "/usr/bin/prog"},
		{"prog", "/bin:/usr/bin", "/bin/prog"},
		{"applet", "/usr/bin:/bin", "/bin/applet"}, // a symlink resolved inside the root at exec
		{"/any/path", "", "/any/path"},
		{"./x", "/bin", "./x"},
	}
	for _, tt := range tests {
		got, err := lookPathIn(root, tt.path, tt.prog)
		if err != nil || got != tt.want {
			t.Errorf("lookPathIn(%q, %q) = %q, %v; want %q", tt.prog, tt.path, got, err, tt.want)
		}
	}
	for _, bad := range []struct{ prog, path string }{
		{"plain", "/bin"},       // not executable
		{"relprog", "rel:/bin"}, // relative PATH entries are skipped
		{"missing", "/usr/bin:/bin"},
		{"", "/bin"},
	} {
		if got, err := lookPathIn(root, bad.path, bad.prog); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("lookPathIn(%q, %q) = %q, %v; want invalid argument", bad.prog, bad.path, got, err)
		}
	}
}
