//go:build linux

package agent

import (
	"context"
	"errors"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// warmPIDs waits until srv keeps n warm shells and returns their pids.
func warmPIDs(t *testing.T, srv *Server, n int) []int {
	t.Helper()
	var pids []int
	eventually(t, 10*time.Second, "warm shells to start", func() bool {
		srv.warm.mu.Lock()
		defer srv.warm.mu.Unlock()
		pids = pids[:0]
		for _, w := range srv.warm.idle {
			pids = append(pids, w.pid)
		}
		return len(pids) >= n
	})
	return pids
}

// runWarm runs req after waiting for a warm shell and says whether it ran
// in one.
func runWarm(t *testing.T, c *Client, srv *Server, req ExecRequest) (*output, ExecResult, bool) {
	t.Helper()
	pids := warmPIDs(t, srv, 1)
	o, res := mustRun(t, c, req)
	return o, res, slices.Contains(pids, res.PID)
}

func TestWarmShell(t *testing.T) {
	t.Parallel()
	c, _, srv := newTestClient(t)
	dir := t.TempDir()
	// The first eligible exec starts the shells for the ones after it.
	mustRun(t, c, ExecRequest{Command: "true"})

	tests := []struct {
		name     string
		req      ExecRequest
		stdout   string
		stderr   string
		exitCode int
		signal   string
		warm     bool
	}{
		{name: "echo", req: ExecRequest{Command: "echo hello"}, stdout: "hello\n", warm: true},
		{name: "exit code", req: ExecRequest{Command: "exit 3"}, exitCode: 3, warm: true},
		{name: "stdout and stderr apart", req: ExecRequest{Command: "echo out; echo err >&2"}, stdout: "out\n", stderr: "err\n", warm: true},
		{name: "cwd", req: ExecRequest{Command: "pwd", Cwd: dir}, stdout: dir + "\n", warm: true},
		{name: "quote in cwd", req: ExecRequest{Command: "pwd", Cwd: mkdir(t, dir, "it's here")}, stdout: dir + "/it's here\n", warm: true},
		{name: "default cwd and home", req: ExecRequest{Command: `pwd; echo $HOME`}, stdout: "/\n/root\n", warm: true},
		{name: "stdin", req: ExecRequest{Command: "cat; echo", Stdin: []byte("from stdin")}, stdout: "from stdin\n", warm: true},
		{name: "command pipe closed", req: ExecRequest{Command: "[ -e /proc/$$/fd/3 ] && echo open || echo closed"}, stdout: "closed\n", warm: true},
		{name: "several lines", req: ExecRequest{Command: "a=1\nb=2\necho $((a+b))"}, stdout: "3\n", warm: true},
		{name: "killed by signal", req: ExecRequest{Command: "kill -9 $$"}, exitCode: 137, signal: "killed", warm: true},
		{name: "trailing backslash", req: ExecRequest{Command: `echo a\`}, stdout: "a\\\n", warm: true},
		{name: "empty", req: ExecRequest{Command: ""}, warm: true},
		{name: "own env", req: ExecRequest{Command: "echo $FOO", Env: map[string]string{"FOO": "x"}}, stdout: "x\n"},
		{name: "other user", req: ExecRequest{Command: "id -u", User: "nobody"}, stdout: "65534\n"},
		{name: "argv", req: ExecRequest{Command: "echo", Args: []string{"a"}, Direct: true}, stdout: "a\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o, res, warm := runWarm(t, c, srv, tt.req)
			checkRun(t, o, res, tt.stdout, tt.stderr, tt.exitCode, tt.signal)
			if warm != tt.warm {
				t.Errorf("ran in a warm shell: %v, want %v", warm, tt.warm)
			}
		})
	}

	t.Run("shells killed from inside", func(t *testing.T) {
		// Gone shells are not handed out, nor signalled again.
		for _, pid := range warmPIDs(t, srv, 2) {
			if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			eventually(t, 5*time.Second, "the shell to be reaped", func() bool { return processGone(pid) })
		}
		o, res := mustRun(t, c, ExecRequest{Command: "echo again"})
		if o.Stdout() != "again\n" || res.ExitCode != 0 {
			t.Errorf("after the shells were killed: %q %+v", o.Stdout(), res)
		}
	})

	t.Run("missing cwd", func(t *testing.T) {
		// Left to a new process, whose start reports it.
		warmPIDs(t, srv, 1)
		_, _, err := run(t, c, ExecRequest{Command: "pwd", Cwd: dir + "/nope"})
		if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("error = %v, want invalid argument", err)
		}
	})

	t.Run("timeout kills it", func(t *testing.T) {
		o, res, warm := runWarm(t, c, srv, ExecRequest{Command: "echo started; sleep 100", Timeout: 300 * time.Millisecond})
		if !warm || !res.TimedOut || res.Signal != "killed" || o.Stdout() != "started\n" {
			t.Errorf("warm %v, result %+v, stdout %q", warm, res, o.Stdout())
		}
	})

	t.Run("profile edited", func(t *testing.T) {
		// A shell that read the old profile is not used.
		home := t.TempDir()
		if err := c.Init(context.Background(), InitRequest{Env: map[string]string{"HOME": home}}); err != nil {
			t.Fatal(err)
		}
		mustRun(t, c, ExecRequest{Command: "true"})
		old := warmPIDs(t, srv, 2)
		if err := os.WriteFile(home+"/.profile", []byte("P=edited\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		o, res := mustRun(t, c, ExecRequest{Command: "echo $P"})
		if o.Stdout() != "edited\n" || slices.Contains(old, res.PID) {
			t.Errorf("stdout %q, pid %d, shells from before the edit %v", o.Stdout(), res.PID, old)
		}
		o, _, warm := runWarm(t, c, srv, ExecRequest{Command: "echo $P"})
		if o.Stdout() != "edited\n" || !warm {
			t.Errorf("stdout %q, warm %v", o.Stdout(), warm)
		}
	})

	t.Run("new sandbox id", func(t *testing.T) {
		// Only the id changed (a warm machine handed out, a snapshot
		// restored as another sandbox): the shells stay, the id is new.
		if err := c.Init(context.Background(), InitRequest{SandboxID: "sb1", KeepEnv: true}); err != nil {
			t.Fatal(err)
		}
		mustRun(t, c, ExecRequest{Command: "true"})
		before := warmPIDs(t, srv, 2)
		if err := c.Init(context.Background(), InitRequest{SandboxID: "sb-new", KeepEnv: true}); err != nil {
			t.Fatal(err)
		}
		o, res := mustRun(t, c, ExecRequest{Command: `echo "$FIRKIN_SANDBOX_ID"; sh -c 'echo "$FIRKIN_SANDBOX_ID"'`})
		if o.Stdout() != "sb-new\nsb-new\n" || !slices.Contains(before, res.PID) {
			t.Errorf("stdout %q, pid %d, shells %v", o.Stdout(), res.PID, before)
		}
	})

	t.Run("new env after init", func(t *testing.T) {
		warmPIDs(t, srv, 2)
		if err := c.Init(context.Background(), InitRequest{SandboxID: "sb2", Env: map[string]string{"A": "1"}}); err != nil {
			t.Fatal(err)
		}
		// The shells started before Init have the old env: not used, and
		// stopped.
		old := warmPIDs(t, srv, 2)
		o, res := mustRun(t, c, ExecRequest{Command: `echo "$A $FIRKIN_SANDBOX_ID"`})
		if o.Stdout() != "1 sb2\n" || slices.Contains(old, res.PID) {
			t.Errorf("stdout %q, pid %d, old shells %v", o.Stdout(), res.PID, old)
		}
		for _, pid := range old {
			eventually(t, 5*time.Second, "the stale shell to end", func() bool { return processGone(pid) || isZombie(pid) })
		}
		o, _, warm := runWarm(t, c, srv, ExecRequest{Command: `echo "$A $FIRKIN_SANDBOX_ID"`})
		if o.Stdout() != "1 sb2\n" || !warm {
			t.Errorf("stdout %q, warm %v", o.Stdout(), warm)
		}
	})
}

func mkdir(t *testing.T, dir, name string) string {
	t.Helper()
	p := dir + "/" + name
	if err := os.Mkdir(p, 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestWarmShellsEndWithServer: the shells kept ahead end when the agent
// stops serving.
func TestWarmShellsEndWithServer(t *testing.T) {
	t.Parallel()
	host, guest := socketPair(t)
	srv := &Server{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, guest) }()
	c := connect(t, host)
	mustRun(t, c, ExecRequest{Command: "true"})
	pids := warmPIDs(t, srv, warmShellCount)
	if len(pids) != warmShellCount {
		t.Fatalf("warm shells %v, want %d", pids, warmShellCount)
	}
	for _, pid := range pids {
		cmdline, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
		if !strings.Contains(string(cmdline), warmShellScript) {
			t.Errorf("pid %d is %q, not a warm shell", pid, cmdline)
		}
	}
	cancel()
	_ = host.(net.Conn).Close()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return")
	}
	for _, pid := range pids {
		eventually(t, 5*time.Second, "the warm shell to end", func() bool { return processGone(pid) || isZombie(pid) })
	}
}

func TestWarmScript(t *testing.T) {
	const reseed = `if [ -n "${RANDOM+x}" ]; then RANDOM=7; fi` + "\n"
	if got, want := warmScript(nil, "/", "echo hi", 7), "exec 3<&-\n"+reseed+"echo hi"; got != want {
		t.Errorf("warmScript = %q, want %q", got, want)
	}
	if got, want := warmScript([]string{"A=1", "FIRKIN_SANDBOX_ID=s'1"}, "/a'b", "x", 7), "exec 3<&-\n"+reseed+"export FIRKIN_SANDBOX_ID='s'\\''1'\ncd -- '/a'\\''b' || exit 1\nx"; got != want {
		t.Errorf("warmScript = %q, want %q", got, want)
	}
	for _, req := range []ExecRequest{
		{Command: "a\x00b"},
		{Command: strings.Repeat("x", maxWarmScript)},
		{Command: "x", User: "root"},
		{Command: "x", Detach: true},
	} {
		if warmEligible(req) {
			t.Errorf("%+.40v is eligible", req)
		}
	}
}

// TestWarmShellProc: a process started with proc_start (no PTY) runs in a
// warm shell: stdin, output, exit, signals and the process list work as
// for one started anew.
func TestWarmShellProc(t *testing.T) {
	t.Parallel()
	c, _, srv := newTestClient(t)
	killProcsAtEnd(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	mustRun(t, c, ExecRequest{Command: "true"})
	warm := warmPIDs(t, srv, 1)
	pid, err := c.ProcStart(ctx, ProcStartRequest{ID: "p1", Command: "read a; echo got $a; echo err >&2; exit 3"})
	if err != nil || !slices.Contains(warm, pid) {
		t.Fatalf("ProcStart = %d, %v; warm shells %v", pid, err, warm)
	}
	if n, err := c.ProcStdin(ctx, "p1", []byte("hello\n"), false); err != nil || n != 6 {
		t.Fatalf("ProcStdin: %d %v", n, err)
	}
	var out collector
	res, err := c.ProcWait(ctx, "p1", out.fn)
	if err != nil || res.ExitCode != 3 || res.PID != pid || !strings.Contains(out.String(), "got hello\n") || !strings.Contains(out.String(), "err\n") {
		t.Fatalf("ProcWait = %+v, %v, output %q", res, err, out.String())
	}

	warm = warmPIDs(t, srv, 1)
	pid, err = c.ProcStart(ctx, ProcStartRequest{ID: "p2", Command: "sleep 100 & wait"})
	if err != nil || !slices.Contains(warm, pid) {
		t.Fatalf("ProcStart = %d, %v; warm shells %v", pid, err, warm)
	}
	if err := c.ProcSignal(ctx, "p2", "TERM"); err != nil {
		t.Fatal(err)
	}
	res, err = c.ProcWait(ctx, "p2", nil)
	if err != nil || res.ExitCode != 128+15 || res.Signal == "" {
		t.Fatalf("ProcWait after SIGTERM = %+v, %v", res, err)
	}
}

// TestWarmShellsBeforeAnswer: with WarmShells the exec answers once the
// shells have started (a template build saves right after).
func TestWarmShellsBeforeAnswer(t *testing.T) {
	t.Parallel()
	c, _, srv := newTestClient(t)
	mustRun(t, c, ExecRequest{Command: "true", WarmShells: true})
	srv.warm.mu.Lock()
	n := len(srv.warm.idle)
	srv.warm.mu.Unlock()
	if n != warmShellCount {
		t.Fatalf("%d warm shells when the exec answered, want %d", n, warmShellCount)
	}
}
