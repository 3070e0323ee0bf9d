package qemu

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/agent"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// testDriver returns a TCG driver whose logs go to the test.
func testDriver(t *testing.T, opts ...Option) *Driver {
	t.Helper()
	testenv.RequireQEMU(t, "amd64")
	base := []Option{WithAccel(AccelTCG), WithStateDir(t.TempDir()),
		WithLogger(slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug})))}
	if tb := os.Getenv("FIRKIN_TEST_TB_SIZE"); tb != "" {
		base = append(base, WithTBSize(atoi(tb)))
	}
	d, err := New(append(base, opts...)...)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// shortDir returns a fresh directory with a short path, removed at the end.
func shortDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "fq-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// bootTest boots a machine and stops it when the test ends, logging the
// console tail when the test failed.
func bootTest(t *testing.T, d *Driver, spec vmpool.BootSpec) *Machine {
	t.Helper()
	if spec.Image.Kernel == "" {
		spec.Image = testenv.Image(t, "amd64")
	}
	if spec.Dir == "" {
		spec.Dir = filepath.Join(shortDir(t), spec.ID)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	start := time.Now()
	vm, err := d.Boot(ctx, spec)
	if err != nil {
		t.Fatalf("Boot: %v", err)
	}
	m := vm.(*Machine)
	t.Logf("%s: boot → agent answered in %v (%s)", spec.ID, time.Since(start).Round(time.Millisecond), m.Accel())
	cleanupMachine(t, m)
	return m
}

func cleanupMachine(t *testing.T, m *Machine) {
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("%s console tail:\n%s", m.ID(), m.ConsoleTail(3000))
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := m.Stop(ctx); err != nil {
			t.Errorf("Stop %s: %v", m.ID(), err)
		}
	})
}

// run executes command and returns its combined output.
func run(t *testing.T, m vmpool.Machine, command string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var mu sync.Mutex
	var b strings.Builder
	res, err := m.Exec(ctx, agent.ExecRequest{Command: command}, func(_ agent.Stream, p []byte) {
		mu.Lock()
		b.Write(p)
		mu.Unlock()
	})
	if err != nil {
		t.Fatalf("Exec(%q) on %s: %v", command, m.ID(), err)
	}
	mu.Lock()
	defer mu.Unlock()
	if res.ExitCode != 0 {
		t.Fatalf("Exec(%q) on %s: exit %d: %s", command, m.ID(), res.ExitCode, b.String())
	}
	return b.String()
}

func processAlive(pid int) bool {
	_, err := os.Stat(filepath.Join("/proc", itoa(pid)))
	return err == nil
}

func itoa(i int) string { return strconv.Itoa(i) }

func atoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}

func TestBootExecStop(t *testing.T) {
	d := testDriver(t)
	// A directory too long for unix socket paths: the sockets go to a short
	// directory of their own, which Stop removes too.
	long := filepath.Join(shortDir(t), strings.Repeat("d", 100), "boot1")
	m := bootTest(t, d, vmpool.BootSpec{ID: "boot1", Dir: long, Resources: vmpool.Resources{VCPUs: 2, MemoryMB: 384}})
	if m.sockDir == "" || !strings.HasPrefix(m.cfg.Agent, m.sockDir) {
		t.Errorf("sockets in %s (socket dir %q)", m.cfg.Agent, m.sockDir)
	}
	if out := run(t, m, "echo hello"); out != "hello\n" {
		t.Errorf("echo hello: %q", out)
	}
	// The guest ran only once its console was connected: the agent's first
	// line is in the log.
	if tl := m.ConsoleTail(4096); !strings.Contains(tl, "msg=booted") {
		t.Errorf("console log misses the agent's first line:\n%s", tl)
	}
	const n = 10
	t0 := time.Now()
	for range n {
		run(t, m, "true")
	}
	perExec := time.Since(t0) / n
	pctx, pcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer pcancel()
	t0 = time.Now()
	for range n {
		if err := m.Ping(pctx); err != nil {
			t.Fatalf("Ping: %v", err)
		}
	}
	t.Logf("exec round trip (true): %v; ping: %v", perExec.Round(time.Microsecond), (time.Since(t0) / n).Round(time.Microsecond))
	out := run(t, m, "nproc; grep MemTotal /proc/meminfo")
	f := strings.Fields(out)
	if len(f) < 3 || f[0] != "2" {
		t.Errorf("nproc/MemTotal: %q", out)
	} else if kb := atoi(f[2]); kb < 300*1024 || kb > 384*1024 {
		t.Errorf("MemTotal %d kB for 384 MiB", kb)
	}
	pid, dir := m.PID(), m.Dir()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.Stop(ctx); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	select {
	case <-m.Done():
	default:
		t.Error("Done open after Stop")
	}
	if processAlive(pid) {
		t.Errorf("qemu %d still running", pid)
	}
	for _, p := range []string{dir, m.sockDir} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind: %v", p, err)
		}
	}
	if err := m.Stop(ctx); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	if _, err := m.Exec(ctx, agent.ExecRequest{Command: "true"}, nil); err == nil {
		t.Error("Exec after Stop succeeded")
	}
}

// Two machines run at once, each with its own disk.
func TestTwoMachines(t *testing.T) {
	d := testDriver(t)
	img := testenv.Image(t, "amd64")
	ms := make([]*Machine, 2)
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for i := range ms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
			defer cancel()
			id := fmt.Sprintf("two%d", i)
			vm, err := d.Boot(ctx, vmpool.BootSpec{ID: id, Dir: filepath.Join(shortDir(t), id), Image: img})
			if err == nil {
				ms[i] = vm.(*Machine)
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	for i, m := range ms {
		if m != nil {
			cleanupMachine(t, m)
		}
		if errs[i] != nil {
			t.Fatalf("Boot %d: %v", i, errs[i])
		}
	}
	run(t, ms[0], "echo zero > /root/who")
	run(t, ms[1], "echo one > /root/who")
	if a, b := run(t, ms[0], "cat /root/who"), run(t, ms[1], "cat /root/who"); a != "zero\n" || b != "one\n" {
		t.Errorf("disks shared: %q %q", a, b)
	}
}

// A boot that fails says which step failed and shows the console's tail, and
// leaves nothing behind.
func TestBootFailureShowsConsole(t *testing.T) {
	d := testDriver(t)
	img := testenv.Image(t, "amd64")
	empty := filepath.Join(t.TempDir(), "empty.cpio")
	if err := os.WriteFile(empty, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	img.Initramfs = empty // the kernel finds no init and panics
	dir := filepath.Join(shortDir(t), "bad")
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	_, err := d.Boot(ctx, vmpool.BootSpec{ID: "bad", Dir: dir, Image: img})
	if err == nil {
		t.Fatal("Boot with an empty initramfs succeeded")
	}
	msg := err.Error()
	t.Logf("boot error:\n%s", msg)
	if !strings.Contains(msg, "console tail:") || !strings.Contains(msg, "Kernel panic") {
		t.Errorf("no console tail with the panic in the error")
	}
	if !strings.Contains(msg, "qemu: boot bad: agent handshake:") && !strings.Contains(msg, "qemu: boot bad: connect agent:") {
		t.Errorf("error does not name the step")
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("failed boot left its dir: %v", err)
	}
}

// A second Driver (a restarted worker) reattaches to a running machine.
func TestReattach(t *testing.T) {
	d1 := testDriver(t)
	m := bootTest(t, d1, vmpool.BootSpec{ID: "re1"})
	run(t, m, "echo kept > /tmp/k")
	if err := m.Release(); err != nil {
		t.Fatal(err)
	}
	d2 := testDriver(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	t0 := time.Now()
	vm, err := d2.Reattach(ctx, m.Dir())
	if err != nil {
		t.Fatalf("Reattach: %v", err)
	}
	m2 := vm.(*Machine)
	cleanupMachine(t, m2)
	t.Logf("reattached in %v", time.Since(t0).Round(time.Millisecond))
	if out := run(t, m2, "cat /tmp/k"); out != "kept\n" {
		t.Errorf("after reattach: %q", out)
	}
	// QEMU reconnects its console to the new driver's socket (it retries
	// every second): what the guest writes then reaches the log again.
	deadline := time.Now().Add(15 * time.Second)
	for i := 0; !strings.Contains(m2.ConsoleTail(200), "console-again"); i++ {
		if time.Now().After(deadline) {
			t.Fatalf("console not reconnected after reattach; tail: %q", m2.ConsoleTail(200))
		}
		run(t, m2, fmt.Sprintf("echo console-again-%d > /dev/console", i))
		time.Sleep(200 * time.Millisecond)
	}
	// A confined machine keeps its uid and cgroup, and Stop removes the cgroup.
	if m2.UID() != m.UID() || !slices.Equal(m2.Cgroup(), m.Cgroup()) {
		t.Errorf("reattached: uid %d cgroup %v, was %d %v", m2.UID(), m2.Cgroup(), m.UID(), m.Cgroup())
	}
	cgroups := m.Cgroup()
	if err := m2.Stop(ctx); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	select {
	case <-m2.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("Done not closed after Stop of a reattached machine")
	}
	if processAlive(m2.PID()) {
		// The first driver's Wait reaps it; give it a moment.
		deadline := time.Now().Add(5 * time.Second)
		for processAlive(m2.PID()) && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if processAlive(m2.PID()) {
			t.Errorf("qemu %d still there", m2.PID())
		}
	}
	for _, dir := range cgroups {
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cgroup %s left after Stop (%v)", dir, err)
		}
	}
	if _, err := d2.Reattach(ctx, m.Dir()); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Reattach to a stopped machine: %v", err)
	}
}

// A machine whose worker died while it was starting (machine.json still
// says starting) is stopped by the next worker's Reattach, not adopted
// and not left running.
func TestReattachStopsMachineLeftStarting(t *testing.T) {
	d1 := testDriver(t)
	m := bootTest(t, d1, vmpool.BootSpec{ID: "re2"})
	var st machineState
	if err := readJSON(filepath.Join(m.Dir(), stateFile), &st); err != nil {
		t.Fatal(err)
	}
	st.Starting = true
	if err := writeJSON(filepath.Join(m.Dir(), stateFile), st); err != nil {
		t.Fatal(err)
	}
	if err := m.Release(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := testDriver(t).Reattach(ctx, m.Dir()); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("Reattach of a machine left starting: %v, want not found", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for processAlive(m.PID()) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if processAlive(m.PID()) {
		t.Errorf("qemu %d still runs", m.PID())
	}
	for _, dir := range m.Cgroup() {
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cgroup %s left (%v)", dir, err)
		}
	}
}

// The arm64 image boots through the same driver (TCG).
func TestBootArm64(t *testing.T) {
	testenv.RequireQEMU(t, "arm64")
	d := testDriver(t)
	m := bootTest(t, d, vmpool.BootSpec{ID: "arm", Image: testenv.Image(t, "arm64")})
	if out := run(t, m, "uname -m; cat /proc/cmdline"); !strings.HasPrefix(out, "aarch64\n") || !strings.Contains(out, "ttyAMA0") {
		t.Errorf("arm64 guest: %q", out)
	}
}

// A machine that is there but does not answer (here: its QMP socket is
// still held by the first driver) is killed by a failed Reattach, so that
// nothing is left running behind it.
func TestReattachKillsUnansweringMachine(t *testing.T) {
	d1 := testDriver(t)
	m := bootTest(t, d1, vmpool.BootSpec{ID: "re2"})
	d2 := testDriver(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, err := d2.Reattach(ctx, m.Dir())
	if !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("Reattach while another holds the machine: %v", err)
	}
	select {
	case <-m.Done():
	case <-time.After(15 * time.Second):
		t.Fatal("the unanswering machine still runs")
	}
}
