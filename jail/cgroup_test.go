package jail

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

func readTrim(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return strings.TrimSpace(string(b))
}

// TestCgroupsOnHost creates, limits, sweeps and removes cgroups on the
// host's real hierarchies (v1 on the development host, v2 in CI).
func TestCgroupsOnHost(t *testing.T) {
	requireRoot(t)
	r := testRange(t)
	cg, err := OpenCgroups("firkin/" + r.ID())
	if err != nil {
		t.Fatalf("OpenCgroups: %v", err)
	}
	t.Cleanup(func() { cg.Close() })
	t.Logf("cgroup v%d, missing controllers: %v", cg.Version(), cg.Missing())
	l := Limits{MemoryBytes: 300 << 20, CPUs: 2, Pids: 130}
	g, err := cg.Create("m1", l)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	t.Cleanup(func() { g.Remove() })
	for _, ctl := range Controllers {
		if d := g.Dir(ctl); d == "" || !strings.HasSuffix(d, "/firkin/"+r.ID()+"/m1") {
			t.Fatalf("controller %s: dir %q", ctl, d)
		}
	}
	if cg.Version() == 1 {
		if got := readTrim(t, filepath.Join(g.Dir("memory"), "memory.limit_in_bytes")); got != strconv.Itoa(300<<20) {
			t.Errorf("memory.limit_in_bytes = %s", got)
		}
		if got := readTrim(t, filepath.Join(g.Dir("cpu"), "cpu.cfs_quota_us")); got != "200000" {
			t.Errorf("cpu.cfs_quota_us = %s, want 2 × %d", got, CPUPeriod)
		}
		if got := readTrim(t, filepath.Join(g.Dir("cpu"), "cpu.cfs_period_us")); got != strconv.Itoa(CPUPeriod) {
			t.Errorf("cpu.cfs_period_us = %s", got)
		}
	} else {
		if got := readTrim(t, filepath.Join(g.Dir("memory"), "memory.max")); got != strconv.Itoa(300<<20) {
			t.Errorf("memory.max = %s", got)
		}
		if got := readTrim(t, filepath.Join(g.Dir("cpu"), "cpu.max")); got != fmt.Sprintf("200000 %d", CPUPeriod) {
			t.Errorf("cpu.max = %s", got)
		}
	}
	if got := readTrim(t, filepath.Join(g.Dir("pids"), "pids.max")); got != "130" {
		t.Errorf("pids.max = %s", got)
	}

	// A machine started in the background gets a tenth of the CPU share,
	// and the normal one back.
	bg, err := cg.Create("m2", Limits{CPUWeight: 10})
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	t.Cleanup(func() { bg.Remove() })
	file, low, normal := "cpu.weight", "10", "100"
	if cg.Version() == 1 {
		file, low, normal = "cpu.shares", "102", "1024"
	}
	if got := readTrim(t, filepath.Join(bg.Dir("cpu"), file)); got != low {
		t.Errorf("%s = %s, want %s", file, got, low)
	}
	if err := bg.SetCPUWeight(DefaultCPUWeight); err != nil {
		t.Fatal(err)
	}
	if got := readTrim(t, filepath.Join(bg.Dir("cpu"), file)); got != normal {
		t.Errorf("%s = %s after SetCPUWeight, want %s", file, got, normal)
	}
	if err := bg.Remove(); err != nil {
		t.Fatal(err)
	}

	// A process in the cgroup keeps it from a sweep; an empty one goes.
	busy, err := cg.Create("busy", Limits{Pids: 8})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { busy.Remove() })
	sleep := exec.Command("sleep", "60")
	if err := sleep.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sleep.Process.Kill(); sleep.Wait() })
	for _, d := range busy.Dirs() {
		if err := os.WriteFile(filepath.Join(d, "cgroup.procs"), []byte(strconv.Itoa(sleep.Process.Pid)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if procs, err := busy.Procs(); err != nil || !slices.Contains(procs, sleep.Process.Pid) {
		t.Fatalf("Procs = %v, %v; want the sleep's pid %d", procs, err, sleep.Process.Pid)
	}
	if _, err := cg.Create("orphan", Limits{}); err != nil {
		t.Fatal(err)
	}
	removed, err := cg.Sweep()
	if err != nil {
		t.Fatalf("Sweep: %v", err)
	}
	slices.Sort(removed)
	if !slices.Equal(removed, []string{"m1", "orphan"}) {
		t.Fatalf("Sweep removed %v, want the empty m1 and orphan", removed)
	}
	if _, err := os.Stat(busy.Dir("pids")); err != nil {
		t.Fatalf("the busy cgroup was swept: %v", err)
	}
	// Reattach finds it again from the recorded dirs; a forged path is refused.
	again, err := cg.Load(busy.Dirs(), "busy")
	if err != nil || !slices.Equal(again.Dirs(), busy.Dirs()) {
		t.Fatalf("Load = %v, %v", again, err)
	}
	for _, forged := range [][]string{{"/etc"}, {filepath.Join(busy.Dirs()[0], "..", "..", "..", "busy")}, busy.Dirs()} {
		name := "busy"
		if slices.Equal(forged, busy.Dirs()) {
			name = "other"
		}
		if _, err := cg.Load(forged, name); err == nil {
			t.Errorf("Load(%v, %s) accepted", forged, name)
		}
	}
	sleep.Process.Kill()
	sleep.Wait()
	if err := busy.Remove(); err != nil {
		t.Fatalf("Remove: %v", err)
	}
	for _, d := range busy.Dirs() {
		if _, err := os.Stat(d); !os.IsNotExist(err) {
			t.Fatalf("%s still there (%v)", d, err)
		}
	}
}

// TestCgroupsV2Layout checks the v2 file layout against a fake hierarchy:
// controllers enabled at each level, limits in the v2 files.
func TestCgroupsV2Layout(t *testing.T) {
	root := t.TempDir()
	os.WriteFile(filepath.Join(root, "cgroup.controllers"), []byte("cpuset cpu io memory hugetlb pids rdma misc\n"), 0o644)
	os.WriteFile(filepath.Join(root, "cgroup.subtree_control"), []byte("cpu\n"), 0o644)
	mountinfo := fmt.Sprintf("25 30 0:22 / %s rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"+
		"31 23 0:28 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n", root)
	cg, err := openCgroups([]byte(mountinfo), []byte("0::/system.slice/firkin.service\n"), "firkin/r9")
	if err != nil {
		t.Fatal(err)
	}
	if cg.Version() != 2 || len(cg.Missing()) != 0 {
		t.Fatalf("version %d, missing %v", cg.Version(), cg.Missing())
	}
	g, err := cg.Create("m1", Limits{MemoryBytes: 512 << 20, CPUs: 3, Pids: 131})
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, "firkin", "r9", "m1")
	if !slices.Equal(g.Dirs(), []string{dir}) {
		t.Fatalf("dirs %v, want [%s]", g.Dirs(), dir)
	}
	for path, want := range map[string]string{
		"cgroup.subtree_control":           "+memory +pids", // cpu was on already
		"firkin/cgroup.subtree_control":    "+memory +cpu +pids",
		"firkin/r9/cgroup.subtree_control": "+memory +cpu +pids",
		"firkin/r9/m1/memory.max":          strconv.Itoa(512 << 20),
		"firkin/r9/m1/cpu.max":             fmt.Sprintf("300000 %d", CPUPeriod),
		"firkin/r9/m1/pids.max":            "131",
	} {
		b, err := os.ReadFile(filepath.Join(root, path))
		if err != nil || string(b) != want {
			t.Errorf("%s = %q (%v), want %q", path, b, err, want)
		}
	}
	// No swap accounting file in the fake tree: memory.swap.max is skipped.
	if _, err := os.Stat(filepath.Join(dir, "memory.swap.max")); err == nil {
		t.Error("memory.swap.max written where the kernel has none")
	}
	if _, err := cg.Load([]string{filepath.Join(root, "firkin", "r3", "m1")}, "m1"); err != nil {
		t.Errorf("Load of another range's cgroup (a restarted worker): %v", err)
	}
}

// TestCgroupsV1Layout: v1 nests the group under the worker's own cgroup of
// each controller and reports the controllers the host lacks.
func TestCgroupsV1Layout(t *testing.T) {
	root := t.TempDir()
	mem, cpu := filepath.Join(root, "memory"), filepath.Join(root, "cpu,cpuacct")
	mountinfo := fmt.Sprintf("35 31 0:32 / %s rw,relatime - cgroup cgroup rw,memory\n"+
		"32 31 0:29 / %s rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"+
		"41 31 0:38 / %s/unified rw,relatime - cgroup2 cgroup2 rw\n", mem, cpu, root)
	self := "4:memory:/svc/w1\n1:cpu,cpuacct:/\n0::/\n"
	cg, err := openCgroups([]byte(mountinfo), []byte(self), "firkin/r2")
	if err != nil {
		t.Fatal(err)
	}
	if cg.Version() != 1 || !slices.Equal(cg.Missing(), []string{"pids"}) {
		t.Fatalf("version %d, missing %v; want 1, [pids]", cg.Version(), cg.Missing())
	}
	g, err := cg.Create("m", Limits{MemoryBytes: 1 << 30, CPUs: 1, Pids: 129})
	if err != nil {
		t.Fatal(err)
	}
	if d := g.Dir("memory"); d != filepath.Join(mem, "svc/w1/firkin/r2/m") {
		t.Errorf("memory dir %s", d)
	}
	if d := g.Dir("cpu"); d != filepath.Join(cpu, "firkin/r2/m") {
		t.Errorf("cpu dir %s", d)
	}
	if got := readTrim(t, filepath.Join(g.Dir("cpu"), "cpu.cfs_quota_us")); got != "100000" {
		t.Errorf("cpu.cfs_quota_us = %s", got)
	}
	if _, err := openCgroups([]byte(mountinfo), []byte(self), "../etc"); err == nil {
		t.Error("a group with .. accepted")
	}
}
