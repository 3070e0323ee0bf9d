package qemu

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

func save(t *testing.T, d *Driver, m *Machine, opts vmpool.SaveOptions) vmpool.Snapshot {
	t.Helper()
	dir := filepath.Join(shortDir(t), "snap")
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	t0 := time.Now()
	snap, err := d.Save(ctx, m, dir, opts)
	if err != nil {
		t.Fatalf("Save(%+v): %v", opts, err)
	}
	meta, err := readSnapshotMeta(dir)
	if err != nil {
		t.Fatal(err)
	}
	var size int64
	for _, a := range snap.Artifacts {
		if st, err := os.Stat(filepath.Join(dir, a)); err == nil {
			size += st.Size()
		}
	}
	st, _ := os.Stat(filepath.Join(dir, snapState))
	t.Logf("save %s of %s (%s, stop=%v): %v paused, %v in all; state file %d KiB",
		opts.Kind, m.ID(), snap.Format, opts.Stop, meta.SaveTime, time.Since(t0).Round(time.Millisecond), st.Size()>>10)
	return snap
}

func restore(t *testing.T, d *Driver, id string, snap vmpool.Snapshot, network bool) *Machine {
	t.Helper()
	return restoreSpec(t, d, vmpool.RestoreSpec{ID: id, Snapshot: snap, Network: network})
}

func restoreSpec(t *testing.T, d *Driver, spec vmpool.RestoreSpec) *Machine {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	t0 := time.Now()
	id := spec.ID
	spec.Dir = filepath.Join(shortDir(t), id)
	vm, err := d.Restore(ctx, spec)
	if err != nil {
		t.Fatalf("Restore %s: %v", id, err)
	}
	m := vm.(*Machine)
	t.Logf("%s: restore → agent answered in %v", id, time.Since(t0).Round(time.Millisecond))
	cleanupMachine(t, m)
	return m
}

// memory describes the memory of pid: RSS, PSS and the anonymous part (what
// a clone costs of its own: copied-on-write guest pages, TCG's translation
// cache, QEMU's heap).
func memory(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		t.Fatal(err)
	}
	var rss, pss, anon int
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "Rss:":
			rss = atoi(f[1])
		case "Pss:":
			pss = atoi(f[1])
		case "Anonymous:":
			anon = atoi(f[1])
		}
	}
	return fmt.Sprintf("RSS %d MiB (PSS %d MiB, private anonymous %d MiB)", rss>>10, pss>>10, anon>>10)
}

// A continuation save freezes the disk: a restore sees what was written
// before the save and not what the source wrote after it. The source goes
// on, saves again, stops, and the second snapshot (two frozen layers) still
// restores.
func TestSaveRestoreContinuation(t *testing.T) {
	d := testDriver(t)
	// Boot files that go away after the save: the snapshot has its own.
	img := testenv.Image(t, "amd64")
	boot := t.TempDir()
	for _, p := range []*string{&img.Kernel, &img.Initramfs} {
		b, err := os.ReadFile(*p)
		if err != nil {
			t.Fatal(err)
		}
		*p = filepath.Join(boot, filepath.Base(*p))
		if err := os.WriteFile(*p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	src := bootTest(t, d, vmpool.BootSpec{ID: "src", Network: true, Image: img})
	run(t, src, "echo before > /root/before; echo mem-before > /tmp/mem")
	snap1 := save(t, d, src, vmpool.SaveOptions{Kind: vmpool.Continuation})
	if snap1.Format != FormatStream {
		t.Errorf("format %q", snap1.Format)
	}
	run(t, src, "echo after > /root/after; echo mem-after > /tmp/mem")
	for _, p := range []string{img.Kernel, img.Initramfs} {
		if err := os.Remove(p); err != nil {
			t.Fatal(err)
		}
	}

	r1 := restore(t, d, "r1", snap1, false)
	if out := run(t, r1, "cat /root/before /tmp/mem; ls /root"); out != "before\nmem-before\nbefore\n" {
		t.Errorf("restored machine sees %q", out)
	}
	run(t, r1, "echo r1 > /root/r1")

	// The source saves again and stops; its chain is two frozen layers.
	snap2 := save(t, d, src, vmpool.SaveOptions{Kind: vmpool.Continuation, Stop: true})
	select {
	case <-src.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("source still running after a save with Stop")
	}
	if _, err := os.Stat(src.Dir()); !os.IsNotExist(err) {
		t.Errorf("source dir left after a save with Stop: %v", err)
	}
	// Each snapshot holds its whole chain: the first one can go.
	if err := os.RemoveAll(snap1.Dir); err != nil {
		t.Fatal(err)
	}
	r2 := restoreSpec(t, d, vmpool.RestoreSpec{ID: "r2", Snapshot: snap2, Network: true, SnapshotReady: true})
	if r2.cfg.Memory != MemoryShared {
		t.Errorf("a SnapshotReady restore has %s memory", r2.cfg.Memory)
	}
	if out := run(t, r2, "cat /root/before /root/after /tmp/mem; ls /root"); out != "before\nafter\nmem-after\nafter\nbefore\n" {
		t.Errorf("second restore sees %q", out)
	}
	// The first restore still runs on its own layer, and saves and
	// restores in turn (a chain of three layers through a restore).
	if out := run(t, r1, "ls /root"); out != "before\nr1\n" {
		t.Errorf("r1 sees %q", out)
	}
	snap3 := save(t, d, r1, vmpool.SaveOptions{Kind: vmpool.Continuation})
	run(t, r1, "rm /root/r1")
	r3 := restore(t, d, "r3", snap3, false)
	if out := run(t, r3, "ls /root; ls /root | wc -l"); out != "before\nr1\n2\n" {
		t.Errorf("r3 sees %q", out)
	}
	if meta, err := readSnapshotMeta(snap3.Dir); err != nil || meta.Depth != 2 {
		t.Errorf("depth of r1's snapshot: %d %v", meta.Depth, err)
	}
}

// Clones of one template snapshot share its memory file copy-on-write and
// never see each other's writes, in memory or on disk, nor what the template
// machine did after the save. The template saves again with Stop (its RAM
// file is then linked, not copied) and that snapshot restores too.
func TestTemplateClones(t *testing.T) {
	d := testDriver(t)
	tmpl := bootTest(t, d, vmpool.BootSpec{ID: "tmpl", SnapshotReady: true})
	run(t, tmpl, "echo template > /root/t; echo tmem > /tmp/t")
	snap := save(t, d, tmpl, vmpool.SaveOptions{Kind: vmpool.Template})
	if snap.Format != FormatSharedMemory {
		t.Fatalf("format %q", snap.Format)
	}
	run(t, tmpl, "echo later > /root/later; echo later > /tmp/t")
	a := restore(t, d, "ca", snap, false)
	b := restore(t, d, "cb", snap, false)
	run(t, a, "echo a > /root/a; echo amem > /tmp/t")
	run(t, b, "echo b > /root/b")
	if out := run(t, b, "ls /root; cat /tmp/t"); out != "b\nt\ntmem\n" {
		t.Errorf("clone b sees %q", out)
	}
	if out := run(t, a, "ls /root; cat /tmp/t"); out != "a\nt\namem\n" {
		t.Errorf("clone a sees %q", out)
	}
	const n = 10
	t0 := time.Now()
	for range n {
		run(t, a, "true")
	}
	t.Logf("exec round trip on a clone: %v; clone a: %s, clone b: %s", (time.Since(t0) / n).Round(time.Microsecond),
		memory(t, a.PID()), memory(t, b.PID()))

	snap2 := save(t, d, tmpl, vmpool.SaveOptions{Kind: vmpool.Template, Stop: true})
	c := restore(t, d, "cc", snap2, false)
	if out := run(t, c, "ls /root; cat /tmp/t"); out != "later\nt\nlater\n" {
		t.Errorf("clone of the second template snapshot sees %q", out)
	}
	if out := run(t, a, "cat /tmp/t"); out != "amem\n" {
		t.Errorf("clone a after the template stopped: %q", out)
	}

	// A template built from a template: the restored machine gets RAM of
	// its own in a shared file, and its template snapshot clones in turn.
	tb := restoreSpec(t, d, vmpool.RestoreSpec{ID: "tb", Snapshot: snap2, SnapshotReady: true})
	run(t, tb, "echo step > /root/step; echo tbmem > /tmp/t")
	snap3 := save(t, d, tb, vmpool.SaveOptions{Kind: vmpool.Template, Stop: true})
	if snap3.Format != FormatSharedMemory {
		t.Errorf("format of a template built from a template: %q", snap3.Format)
	}
	e := restore(t, d, "ce", snap3, false)
	if out := run(t, e, "ls /root; cat /tmp/t"); out != "later\nstep\nt\ntbmem\n" {
		t.Errorf("clone of the second-generation template sees %q", out)
	}
	if out := run(t, c, "ls /root; cat /tmp/t"); out != "later\nt\nlater\n" {
		t.Errorf("clone c after the second-generation template: %q", out)
	}
}

// A restored guest never finds its agent channel disconnected: the channel
// is connected before the state loads, as it was when the guest was saved.
// (It used to be connected once the guest ran: QEMU then told the guest
// that its host had gone, and the guest's driver could report that after
// the new host's hello, which ended the new session before its first call:
// a restore failing with "ping: unexpected EOF" after a minute.)
func TestRestoreKeepsAgentChannel(t *testing.T) {
	d := testDriver(t)
	src := bootTest(t, d, vmpool.BootSpec{ID: "src"})
	snap := save(t, d, src, vmpool.SaveOptions{Kind: vmpool.Continuation, Stop: true})
	// Time for the restored guest to notice a disconnection, were there one.
	afterLoad = func() { time.Sleep(300 * time.Millisecond) }
	t.Cleanup(func() { afterLoad = nil })
	r := restore(t, d, "r", snap, false)
	run(t, r, "echo restore-mark > /dev/console")
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(r.ConsoleTail(8<<10), "restore-mark") {
		if time.Now().After(deadline) {
			t.Fatalf("the mark never reached the console:\n%s", r.ConsoleTail(3000))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if con := r.ConsoleTail(8 << 10); strings.Contains(con, "reads as disconnected") {
		t.Errorf("the restored guest saw its agent channel disconnected:\n%s", con)
	}
}
