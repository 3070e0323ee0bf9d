package qemu

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/agent"
	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// testDriver returns a TCG driver whose logs go to the test.
func testDriver(t *testing.T, opts ...Option) *Driver {
	t.Helper()
	testenv.RequireQEMU(t, "amd64")
	base := []Option{WithAccel(AccelTCG), WithStateDir(t.TempDir()),
		WithLogger(slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug})))}
	d, err := New(append(base, opts...)...)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
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
	m := bootTest(t, d, vmpool.BootSpec{ID: "boot1", Resources: vmpool.Resources{VCPUs: 2, MemoryMB: 384}})
	if out := run(t, m, "echo hello"); out != "hello\n" {
		t.Errorf("echo hello: %q", out)
	}
	const n = 10
	t0 := time.Now()
	for range n {
		run(t, m, "true")
	}
	t.Logf("exec round trip (true): %v", (time.Since(t0) / n).Round(time.Microsecond))
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
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("dir left behind: %v", err)
	}
	if err := m.Stop(ctx); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	if _, err := m.Exec(ctx, agent.ExecRequest{Command: "true"}, nil); err == nil {
		t.Error("Exec after Stop succeeded")
	}
}
