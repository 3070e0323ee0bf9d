package worker_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/worker"
)

// startNATSChild runs a NATS server in a child process (the test binary,
// see worker.NATSChildEnv), so that this process's heap is the worker's
// alone, and returns its client URL.
func startNATSChild(t *testing.T) string {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), worker.NATSChildEnv+"="+t.TempDir())
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = stdin.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(stdout).ReadString('\n')
		line <- strings.TrimSpace(s)
	}()
	select {
	case url := <-line:
		if !strings.HasPrefix(url, "nats://") {
			t.Fatalf("NATS child printed %q", url)
		}
		return url
	case <-time.After(30 * time.Second):
		t.Fatal("NATS child did not start within 30s")
	}
	return ""
}

// commandOutput pages through a sandbox's logs and returns the bytes of
// command's stdout and its system events.
func commandOutput(t *testing.T, e *env, id, command string) (stdout int, system []string) {
	t.Helper()
	var cursor uint64
	for range 10_000 {
		page, err := e.c.Logs(e.ctx(time.Minute), id, subjects.LogsRequest{Cursor: cursor, Limit: 1000})
		if err != nil {
			t.Fatalf("logs after %d: %v", cursor, err)
		}
		for _, ev := range page.Events {
			if ev.CommandID != command {
				continue
			}
			switch ev.Source {
			case subjects.SourceStdout:
				stdout += len(ev.Message) + len(ev.MessageB64)*3/4
			case subjects.SourceSystem:
				system = append(system, ev.Message)
			}
		}
		if len(page.Events) == 0 {
			return stdout, system
		}
		cursor = page.NextCursor
	}
	t.Fatal("logs: no end after 10000 pages")
	return 0, nil
}

// TestExecOutputFlood: a command printing 30 MB does not grow the worker's
// heap by its output (the log window applies backpressure to the guest),
// every byte reaches the log stream, and replies too large for the server's
// max payload are cut to fit rather than lost.
func TestExecOutputFlood(t *testing.T) {
	url := startNATSChild(t)
	e := startWorker(t, func(c *worker.Config) { c.NATSURL = url })
	id := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"}).SandboxID

	t.Run("heap bounded under 30 MB of output", func(t *testing.T) {
		// A lower GC target makes the heap track what is live.
		defer debug.SetGCPercent(debug.SetGCPercent(25))
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		base := ms.HeapInuse
		var peak atomic.Uint64
		stop := make(chan struct{})
		sampled := make(chan struct{})
		go func() {
			defer close(sampled)
			tick := time.NewTicker(10 * time.Millisecond)
			defer tick.Stop()
			for {
				var ms runtime.MemStats
				runtime.ReadMemStats(&ms)
				if ms.HeapInuse > peak.Load() {
					peak.Store(ms.HeapInuse)
				}
				select {
				case <-stop:
					return
				case <-tick.C:
				}
			}
		}()
		const total = 30_000_000
		t0 := time.Now()
		r, err := e.c.Exec(e.ctx(3*time.Minute), id, subjects.ExecRequest{Command: fmt.Sprintf("yes | head -c %d", total), TimeoutMS: 170_000})
		took := time.Since(t0)
		close(stop)
		<-sampled
		if err != nil {
			t.Fatalf("exec: %v", err)
		}
		grew := int64(peak.Load()) - int64(base)
		t.Logf("30 MB of output in %s (%.1f MB/s); heap in use %d MiB at the start, grew by at most %d MiB", took.Round(time.Millisecond),
			total/took.Seconds()/1e6, base>>20, grew>>20)
		const bound = 24 << 20 // the whole output, kept, would be 30 MB and more
		if grew > bound {
			t.Errorf("heap in use grew by %d MiB during the exec, bound %d MiB", grew>>20, bound>>20)
		}
		if r.ExitCode != 0 || !r.Truncated || r.LogsDroppedBytes != 0 {
			t.Errorf("reply: exit %d, truncated %v, logs dropped %d", r.ExitCode, r.Truncated, r.LogsDroppedBytes)
		}
		if got, sys := commandOutput(t, e, id, r.CommandID); got != total || len(sys) != 0 {
			t.Errorf("log stream has %d bytes of the command's stdout, want %d (system events %q)", got, total, sys)
		}
	})

	t.Run("logs page of large events fits the max payload", func(t *testing.T) {
		page, err := e.c.Logs(e.ctx(time.Minute), id, subjects.LogsRequest{Limit: 200})
		if err != nil {
			t.Fatalf("logs limit 200 of 64 KiB events: %v", err)
		}
		body, _ := json.Marshal(page)
		if len(page.Events) == 0 || len(page.Events) >= 200 || !page.Truncated || int64(len(body)) > e.nc.MaxPayload() {
			t.Errorf("page: %d events, truncated %v, %d bytes (max payload %d)", len(page.Events), page.Truncated, len(body), e.nc.MaxPayload())
		}
	})

	t.Run("256 KiB of badly escaping output still answered", func(t *testing.T) {
		// \x01 encodes as \u0001: 256 KiB become 1.5 MiB of JSON.
		r, err := e.c.Exec(e.ctx(time.Minute), id, subjects.ExecRequest{Command: `head -c 262144 /dev/zero | tr '\0' '\1'`})
		if err != nil {
			t.Fatalf("exec: %v", err)
		}
		body, _ := json.Marshal(r)
		if !r.Truncated || len(r.Stdout) < 64<<10 || strings.Trim(r.Stdout, "\x01") != "" || int64(len(body)) > e.nc.MaxPayload() {
			t.Errorf("reply: truncated %v, %d bytes of stdout, %d encoded (max payload %d)", r.Truncated, len(r.Stdout), len(body), e.nc.MaxPayload())
		}
		if got, _ := commandOutput(t, e, id, r.CommandID); got != 262144 {
			t.Errorf("log stream has %d bytes of the command's stdout, want all 262144", got)
		}
	})
}

// TestEndlessOutput: `yes` with a timeout ends with error timeout in time
// (blocking the output stream under backpressure does not hold up the kill),
// while another sandbox's exec and logs stay fast.
func TestEndlessOutput(t *testing.T) {
	e := startWorker(t)
	a := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"}).SandboxID
	b := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"}).SandboxID
	e.exec(b, "true") // warm b's first command

	type outcome struct {
		err  error
		took time.Duration
	}
	done := make(chan outcome, 1)
	go func() {
		t0 := time.Now()
		_, err := e.c.Exec(e.ctx(2*time.Minute), a, subjects.ExecRequest{Command: "yes", TimeoutMS: 10_000})
		done <- outcome{err, time.Since(t0)}
	}()
	var slowest time.Duration
	var res outcome
	for i := 0; ; i++ {
		select {
		case res = <-done:
		default:
			t0 := time.Now()
			r, err := e.c.Exec(e.ctx(time.Minute), b, subjects.ExecRequest{Command: fmt.Sprintf("echo %d", i)})
			if err != nil || r.Stdout != fmt.Sprintf("%d\n", i) {
				t.Fatalf("exec in the other sandbox: %+v, %v", r, err)
			}
			if _, err := e.c.Logs(e.ctx(time.Minute), b, subjects.LogsRequest{Limit: 10}); err != nil {
				t.Fatalf("logs of the other sandbox: %v", err)
			}
			slowest = max(slowest, time.Since(t0))
			time.Sleep(100 * time.Millisecond)
			continue
		}
		break
	}
	t.Logf("yes ended after %s (%v); slowest exec+logs in the other sandbox %s", res.took.Round(time.Millisecond), res.err, slowest.Round(time.Millisecond))
	wantCode(t, "yes with a 10 s timeout", res.err, subjects.CodeTimeout)
	if res.took > 25*time.Second {
		t.Errorf("yes with a 10 s timeout answered after %s", res.took)
	}
	if slowest > 5*time.Second {
		t.Errorf("an exec and logs request in the other sandbox took %s during the flood", slowest)
	}
}

// TestExecLogBudget: output over the sandbox's log budget is dropped,
// counted in the reply and told in a system log event.
func TestExecLogBudget(t *testing.T) {
	const budget = 100_000
	e := startWorker(t, func(c *worker.Config) { c.LogBytesTotal, c.LogBytesPerSecond = budget, -1 })
	id := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"}).SandboxID

	r := e.exec(id, `head -c 300000 /dev/zero | tr '\0' x`)
	if r.LogsDroppedBytes != 300_000-budget || !strings.HasPrefix(r.Stdout, "xxxx") {
		t.Fatalf("reply: logs_dropped_bytes %d, want %d (stdout %d bytes)", r.LogsDroppedBytes, 300_000-budget, len(r.Stdout))
	}
	got, sys := commandOutput(t, e, id, r.CommandID)
	if got != budget {
		t.Errorf("log stream has %d bytes of stdout, want the budget, %d", got, budget)
	}
	if len(sys) != 1 || !strings.Contains(sys[0], "200000 bytes of output dropped") || !strings.Contains(sys[0], "in total") {
		t.Errorf("system events %q, want one saying 200000 bytes were dropped", sys)
	}
	// The budget is the sandbox's: a later command's output is all dropped.
	r = e.exec(id, "echo more")
	if r.Stdout != "more\n" || r.LogsDroppedBytes != 5 {
		t.Errorf("second exec: %+v", r)
	}
	if got := e.w.Backend().LogDroppedBytes(); got != 300_000-budget+5 {
		t.Errorf("worker's dropped log bytes %d, want %d", got, 300_000-budget+5)
	}
}
