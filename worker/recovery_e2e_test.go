package worker_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// process is the firkin-worker binary running as a child process.
type process struct {
	cmd  *exec.Cmd
	done chan struct{}
	url  string
	// log returns the last lines the process logged.
	log func() string
}

func freePort(t *testing.T) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// shareDebCache links the test image cache's downloaded packages into a
// worker binary's state directory, so it does not fetch the kernel again.
func shareDebCache(t *testing.T, state string) {
	t.Helper()
	_ = os.MkdirAll(filepath.Join(state, "cache"), 0o755)
	debs, _ := filepath.Glob(filepath.Join(testenv.CacheDir(t), "debs", "*"))
	for _, d := range debs {
		_ = os.Symlink(d, filepath.Join(state, "cache", filepath.Base(d)))
	}
}

// startBinary runs the worker binary and waits for its ready line.
func startBinary(t *testing.T, bin string, args ...string) *process {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "FIRKIN_LOG_FORMAT=json")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	ready := make(chan string, 1)
	var mu sync.Mutex
	var logTail []string // the last 400 lines
	lines := func() string {
		mu.Lock()
		defer mu.Unlock()
		return strings.Join(logTail, "\n")
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			mu.Lock()
			logTail = append(logTail, line)
			if len(logTail) > 400 {
				logTail = logTail[len(logTail)-400:]
			}
			mu.Unlock()
			if strings.Contains(line, `"msg":"templates ready"`) {
				select {
				case ready <- line:
				default:
				}
			}
		}
		_ = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(90 * time.Second):
			_ = cmd.Process.Kill()
		}
		if t.Failed() {
			t.Logf("worker %s log (tail):\n%s", filepath.Base(bin), tail(lines(), 12000))
		}
		if slices.Contains(args, "--keep-machines") {
			releaseKeptMachines(t, argValue(args, "--state-dir"), lines())
		}
	})
	select {
	case <-ready:
	case <-p.done:
		t.Fatalf("worker exited before it was ready:\n%s", lines())
	case <-time.After(4 * time.Minute):
		t.Fatalf("worker not ready after 4 minutes:\n%s", tail(lines(), 12000))
	}
	p.log = lines
	return p
}

// TestRecoveryAfterCrash kills the worker process with SIGKILL while a
// sandbox runs: the restarted worker reattaches to the running machine,
// sweeps the warm one, and a clean stop leaves nothing behind.
func TestRecoveryAfterCrash(t *testing.T) {
	testenv.RequireQEMU(t, runtime.GOARCH)
	agentBin := testenv.AgentBinary(t, runtime.GOARCH)
	img := testenv.Image(t, runtime.GOARCH)
	_ = img // the worker builds its own copy from the same cached inputs
	bin := workerBinary(t)
	state := t.TempDir()
	natsAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	args := []string{"--state-dir", state, "--nats-listen", natsAddr, "--proxy-listen", "127.0.0.1:0",
		"--agent", agentBin, "--accel", "tcg", "--pool", "tiny=1", "--keep-machines"}
	shareDebCache(t, state)

	first := startBinary(t, bin, args...)
	// As a client of the README: the client identity the worker made; the
	// restarted worker keeps it, so the connection reconnects.
	nc, err := nats.Connect("nats://"+natsAddr, client.NkeyFile(filepath.Join(state, "client.nk")),
		nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	c := client.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	private := false
	sb, err := c.Create(ctx, subjects.CreateSandboxRequest{TemplateID: "tiny", PublicTraffic: &private})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, sb.SandboxID, subjects.ExecRequest{Command: "echo survived > /root/mark; sync; mkdir -p /srv && echo private-page > /srv/index.html && httpd -p 8000 -h /srv"}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*time.Minute, "pool refilled", func() error {
		if len(qemuProcesses(state)) < 2 {
			return fmt.Errorf("have %d machines", len(qemuProcesses(state)))
		}
		return nil
	})
	before := qemuProcesses(state)

	_ = first.cmd.Process.Kill() // crash
	<-first.done
	if got := qemuProcesses(state); len(got) != len(before) {
		t.Fatalf("machines did not outlive the crash: %d before, %d after", len(before), len(got))
	}

	startBinary(t, bin, args...)
	r, err := c.Exec(ctx, sb.SandboxID, subjects.ExecRequest{Command: "cat /root/mark"})
	if err != nil || r.Stdout != "survived\n" {
		t.Fatalf("exec in the reattached sandbox: %+v %v", r, err)
	}
	// The reattached sandbox's traffic token still opens it: its
	// generation came back from the session record.
	route, err := c.Route(ctx, sb.SandboxID, 8000)
	if err != nil || route.TCP != "" {
		t.Fatalf("route after reattach: %+v, %v; want one without a tcp listener", route, err)
	}
	proxyAddr := "127.0.0.1:" + route.URL[strings.LastIndex(route.URL, ":")+1:]
	hdr := map[string]string{"e2b-sandbox-id": sb.SandboxID, "e2b-sandbox-port": "8000"}
	if code, _ := httpGet(t, "http://"+proxyAddr+"/", hdr); code != 401 {
		t.Errorf("after reattach, no token: %d, want 401", code)
	}
	hdr["e2b-traffic-access-token"] = sb.TrafficAccessToken
	if code, body := httpGet(t, "http://"+proxyAddr+"/", hdr); code != 200 || body != "private-page\n" {
		t.Errorf("after reattach, the create's token: %d %q, want 200 private-page", code, body)
	}
	// The old warm machine was swept: no QEMU of the first run but the
	// sandbox's is left.
	for _, p := range before {
		if !strings.Contains(p, sb.Dir) && containsPID(qemuProcesses(state), p) {
			t.Errorf("orphaned warm machine still runs: %s", strings.Fields(p)[0])
		}
	}
	if err := c.Kill(ctx, sb.SandboxID); err != nil {
		t.Fatal(err)
	}
}

func containsPID(list []string, proc string) bool {
	pid := strings.SplitN(proc, ":", 2)[0]
	for _, p := range list {
		if strings.SplitN(p, ":", 2)[0] == pid {
			return true
		}
	}
	return false
}

// argValue is the value that follows flag in args ("" when absent).
func argValue(args []string, flag string) string {
	for i, a := range args {
		if a == flag && i+1 < len(args) {
			return args[i+1]
		}
	}
	return ""
}

// releaseKeptMachines ends what a worker run with --keep-machines leaves on
// purpose when the test is over (also when it failed half-way): the QEMU
// processes of machines under its state dir and its nft table (named in
// its log), so no test leaves a machine or a rule behind.
func releaseKeptMachines(t *testing.T, stateDir, log string) {
	if stateDir == "" {
		return
	}
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(cmdline, []byte("qemu-system")) && bytes.Contains(cmdline, []byte(stateDir+"/")) {
			if syscall.Kill(pid, syscall.SIGKILL) == nil {
				pids = append(pids, pid)
			}
		}
	}
	for _, pid := range pids {
		for i := 0; i < 100 && syscall.Kill(pid, 0) == nil; i++ { // up to 5 s
			time.Sleep(50 * time.Millisecond)
		}
	}
	if len(pids) > 0 {
		t.Logf("released %d machine(s) the worker kept", len(pids))
	}
	for _, m := range regexp.MustCompile(`"table":"(firkin_[A-Za-z0-9_]+)"`).FindAllStringSubmatch(log, -1) {
		_ = exec.Command("nft", "delete", "table", "inet", m[1]).Run() // gone already when the worker removed it
	}
}
