package agent

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestReaper runs commands through a Reaper, as PID 1 does, and checks that
// exit statuses reach their waiters while orphans are reaped. It must not run
// in parallel with other tests: the reaper waits for every child of the test
// process.
func TestReaper(t *testing.T) {
	// Become a subreaper, so orphans of our commands are re-parented to the
	// test process, as they would be to PID 1.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatalf("PR_SET_CHILD_SUBREAPER: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := NewReaper(ctx)
	t.Cleanup(func() {
		cancel()
		<-r.done
		_ = unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
	})
	host, guest := socketPair(t)
	serve(t, &Server{Reaper: r}, guest)
	c := connect(t, host)

	for i := range 20 {
		o, res := mustRun(t, c, ExecRequest{Command: fmt.Sprintf("echo %d; exit %d", i, i)})
		if o.Stdout() != fmt.Sprintf("%d\n", i) || res.ExitCode != i {
			t.Fatalf("exec %d: %q %+v", i, o.Stdout(), res)
		}
	}
	_, res := mustRun(t, c, ExecRequest{Command: "sleep 100", Timeout: 200 * time.Millisecond})
	if !res.TimedOut || res.Signal != "killed" {
		t.Errorf("timeout: %+v", res)
	}

	// An orphan: the inner shell exits at once and leaves sleep behind.
	o, _ := mustRun(t, c, ExecRequest{Command: "sh -c 'sleep 0.2 >/dev/null & echo $!'"})
	pid, err := strconv.Atoi(strings.TrimSpace(o.Stdout()))
	if err != nil {
		t.Fatalf("orphan pid %q", o.Stdout())
	}
	eventually(t, 10*time.Second, "the orphan to be reaped", func() bool {
		_, err := os.Stat(fmt.Sprintf("/proc/%d", pid))
		return os.IsNotExist(err)
	})
}
