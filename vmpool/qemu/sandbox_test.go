package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// QEMU runs under its seccomp sandbox, and a guest writing its console
// without end does not grow the host's log past the cap: the machine still
// answers and its console tail still reads.
func TestSeccompAndConsoleCap(t *testing.T) {
	const capBytes = 64 << 10
	d := testDriver(t, WithConsoleCap(capBytes))
	m := bootTest(t, d, vmpool.BootSpec{ID: "cons"})
	if !m.cfg.Sandbox {
		t.Error("machine runs without the seccomp sandbox (the probe failed?)")
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", m.PID()))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(status), "\nSeccomp:\t2\n") {
		t.Errorf("QEMU is not in seccomp filter mode:\n%s", grepLines(string(status), "Seccomp"))
	}

	t0 := time.Now()
	const n = 1000000 // 15 times the cap; a few seconds of TCG serial output
	run(t, m, fmt.Sprintf(`head -c %d /dev/zero | tr '\0' x > /dev/console; echo; echo console-end > /dev/console`, n))
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(m.ConsoleTail(200), "console-end") {
		if time.Now().After(deadline) {
			t.Fatalf("console-end never reached the log; tail: %q", m.ConsoleTail(200))
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("guest wrote %d bytes to its console in %v", n, time.Since(t0).Round(time.Millisecond))
	var total int64
	for _, name := range []string{consoleFile, consoleFile + consoleOld} {
		st, err := os.Stat(filepath.Join(m.Dir(), name))
		if err != nil {
			t.Fatalf("%s: %v (no rotation?)", name, err)
		}
		if st.Size() > capBytes/2 {
			t.Errorf("%s is %d bytes, over half the cap (%d)", name, st.Size(), capBytes/2)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %v", name, st.Mode().Perm())
		}
		total += st.Size()
	}
	if total > capBytes {
		t.Errorf("console logs hold %d bytes, cap %d", total, capBytes)
	}
	if tl := m.ConsoleTail(capBytes / 2); !strings.HasPrefix(tl, "xxxxxxxx") || !strings.HasSuffix(tl, "console-end\r\n") || len(tl) != capBytes/2 {
		t.Errorf("console tail across the two halves: %d bytes, ends %q", len(tl), tl[max(0, len(tl)-40):])
	}
	if out := run(t, m, "echo still-here"); out != "still-here\n" {
		t.Errorf("after the console flood: %q", out)
	}
}

// A snapshot layer forged to name a secret host file as its backing file
// (in its qcow2 header) is restored with the worker's chain: QEMU opens
// neither the secret nor any file but the worker's, and the guest reads no
// byte of the secret.
func TestForgedLayerBacking(t *testing.T) {
	d := testDriver(t)
	const marker = "FIRKIN-SECRET-MARKER-7f3a"
	secret := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secret, bytes.Repeat([]byte(marker), (1<<20)/len(marker)), 0o600); err != nil {
		t.Fatal(err)
	}
	src := bootTest(t, d, vmpool.BootSpec{ID: "fsrc"})
	snap := save(t, d, src, vmpool.SaveOptions{Kind: vmpool.Continuation, Stop: true})
	meta, err := readSnapshotMeta(snap.Dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{snapConfig, snapState, layerName(1)} {
		if st, err := os.Stat(filepath.Join(snap.Dir, name)); err != nil || st.Mode().Perm() != 0o600 {
			t.Errorf("snapshot %s: %v %v, want mode 0600", name, st.Mode().Perm(), err)
		}
	}
	if st, err := os.Stat(snap.Dir); err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("snapshot dir: %v, want mode 0700", err)
	}
	// The forged layer replaces the snapshot's only one.
	forged := filepath.Join(t.TempDir(), "forged.qcow2")
	if out, err := exec.Command(d.cfg.QEMUImg, "create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw",
		forged, fmt.Sprint(meta.DiskSize)).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v %s", err, out)
	}
	if err := os.Rename(forged, filepath.Join(snap.Dir, layerName(1))); err != nil {
		t.Fatal(err)
	}

	r := restore(t, d, "fres", snap, false)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var nodes []struct {
		NodeName string `json:"node-name"`
		File     string `json:"file"`
	}
	if err := r.qmp.Run(ctx, "query-named-block-nodes", map[string]any{"flat": true}, &nodes); err != nil {
		t.Fatal(err)
	}
	top := filepath.Join(r.Dir(), overlayName(2))
	for _, n := range nodes {
		if n.File != top && !strings.HasPrefix(n.File, "/dev/fdset/") && !strings.HasPrefix(n.File, "json:") {
			t.Errorf("QEMU opened %s (node %s)", n.File, n.NodeName)
		}
		if strings.Contains(n.File, secret) {
			t.Errorf("QEMU's chain has the secret: node %s is %s", n.NodeName, n.File)
		}
	}
	if len(nodes) == 0 {
		t.Error("no block nodes reported")
	}
	// The guest reads the start of its disk past any cache: the secret
	// would be all of its first MiB had QEMU followed the header.
	out := run(t, r, "echo 3 > /proc/sys/vm/drop_caches; head -c 4194304 /dev/vda | grep -a -c "+marker+" || true")
	if strings.TrimSpace(out) != "0" {
		t.Errorf("the guest read the secret: grep -c says %q", out)
	}
}

// A layer is refused before QEMU sees it when it is a symbolic link or its
// qcow2 header names an external data file (which QEMU would open by path).
func TestInheritedLayerChecks(t *testing.T) {
	d := testDriver(t)
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(base, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	img := func(name string, opts ...string) string {
		p := filepath.Join(dir, name)
		args := append([]string{"create", "-q", "-f", "qcow2"}, opts...)
		if out, err := exec.Command(d.cfg.QEMUImg, append(args, p, "1M")...).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img create %s: %v %s", name, err, out)
		}
		return p
	}
	good := img("good.qcow2")
	dataFile := img("data.qcow2", "-o", "data_file="+filepath.Join(dir, "elsewhere"))
	link := filepath.Join(dir, "link.qcow2")
	if err := os.Symlink(good, link); err != nil {
		t.Fatal(err)
	}
	files, err := openInherited([]string{base, good})
	if err != nil {
		t.Fatalf("good chain: %v", err)
	}
	closeFiles(files)
	for name, layer := range map[string]string{"data file": dataFile, "symlink": link, "raw as layer": base} {
		if _, err := openInherited([]string{base, layer}); !errors.Is(err, errdefs.ErrIntegrity) {
			t.Errorf("%s: %v, want an integrity error", name, err)
		}
	}
	if _, err := openInherited([]string{base, filepath.Join(dir, "missing")}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("missing layer: %v", err)
	}
}

// The console log rotates at half the cap, so both halves together stay
// within it, and the tail reads across them.
func TestCappedConsoleFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), consoleFile)
	w, err := openCapped(path, 1000, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	var all bytes.Buffer
	for i := range 300 {
		line := fmt.Sprintf("line %d\n", i)
		all.WriteString(line)
		if n, err := io.WriteString(w, line); err != nil || n != len(line) {
			t.Fatalf("write: %d %v", n, err)
		}
	}
	w.close()
	a, _ := os.ReadFile(path)
	b, _ := os.ReadFile(path + consoleOld)
	if len(a) > 500 || len(b) != 500 {
		t.Errorf("halves of %d and %d bytes, want at most 500 each (the older full)", len(a), len(b))
	}
	want := all.String()
	if got := string(b) + string(a); !strings.HasSuffix(want, got) {
		t.Errorf("the halves are not the end of the stream: %q", got)
	}
	if n := len(a) + 100; consoleTail(path, int64(n)) != want[len(want)-n:] {
		t.Errorf("tail of %d across the halves: %q", n, consoleTail(path, int64(n)))
	}
	// A reopen (a reattach) goes on where the file ends.
	w, err = openCapped(path, 1000, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.WriteString(w, "more\n")
	w.close()
	if got := consoleTail(path, 5); got != "more\n" {
		t.Errorf("after reopen: %q", got)
	}
}

func grepLines(s, word string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, word) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// The seccomp probe says yes for Debian's QEMU and no (once, cached) for a
// binary that refuses -sandbox; machines of that binary run without it.
func TestSandboxProbe(t *testing.T) {
	d := testDriver(t)
	bin, err := d.binary("amd64")
	if err != nil {
		t.Fatal(err)
	}
	if !d.sandbox(bin) {
		t.Errorf("%s does not take -sandbox %s", bin, sandboxOpts)
	}
	calls := filepath.Join(t.TempDir(), "calls")
	fake := filepath.Join(t.TempDir(), "qemu-no-seccomp")
	script := "#!/bin/sh\necho x >> " + calls + "\necho '-sandbox support is not enabled in this QEMU binary' >&2\nexit 1\n"
	if err := os.WriteFile(fake, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	if d.sandbox(fake) || d.sandbox(fake) {
		t.Error("a QEMU without seccomp probed as having it")
	}
	if b, _ := os.ReadFile(calls); string(b) != "x\n" {
		t.Errorf("probe ran %d times, want once", strings.Count(string(b), "x"))
	}
}
