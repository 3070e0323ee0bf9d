package vz

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/agent"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// testImage writes a kernel (an arm64 Image header), an initramfs and a
// root disk holding "base".
func testImage(t *testing.T) vmpool.Image {
	t.Helper()
	dir := t.TempDir()
	kernel := make([]byte, 4096)
	copy(kernel[56:], "ARM\x64")
	img := vmpool.Image{
		Kernel:    filepath.Join(dir, "Image"),
		Initramfs: filepath.Join(dir, "initramfs.cpio"),
		RootDisk:  filepath.Join(dir, "root.raw"),
		Arch:      hostArch,
	}
	for p, data := range map[string][]byte{img.Kernel: kernel, img.Initramfs: []byte("cpio"), img.RootDisk: []byte("base")} {
		if err := os.WriteFile(p, data, 0o444); err != nil {
			t.Fatal(err)
		}
	}
	return img
}

func testDriver(t *testing.T) (*Driver, *fakeHV) {
	t.Helper()
	hv := newFakeHV(t)
	return newDriver(Config{}, hv), hv
}

func bootTest(t *testing.T, d *Driver, id string, network bool) *machine {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err := d.Boot(ctx, vmpool.BootSpec{
		ID:        id,
		Dir:       filepath.Join(t.TempDir(), id),
		Image:     testImage(t),
		Resources: vmpool.Resources{VCPUs: 2, MemoryMB: 512},
		Network:   network,
	})
	if err != nil {
		t.Fatalf("boot: %v", err)
	}
	t.Cleanup(func() { _ = m.Stop(context.Background()) })
	return m.(*machine)
}

func execOut(t *testing.T, m vmpool.Machine, cmd string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var out bytes.Buffer
	res, err := m.Exec(ctx, agent.ExecRequest{Command: cmd}, func(s agent.Stream, b []byte) {
		if s == agent.Stdout {
			out.Write(b)
		}
	})
	if err != nil {
		t.Fatalf("exec %q: %v", cmd, err)
	}
	if res.ExitCode != 0 {
		t.Fatalf("exec %q: exit %d", cmd, res.ExitCode)
	}
	return out.String()
}

func appendFile(t *testing.T, path, s string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(s); err != nil {
		t.Fatal(err)
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestBootRetriesTheFirstDial: the guest does not listen at first; the
// driver retries the vsock dial with backoff and the agent answers.
func TestBootRetriesTheFirstDial(t *testing.T) {
	d, hv := testDriver(t)
	hv.dialFailures = 4
	m := bootTest(t, d, "sbx1", true)
	if got := execOut(t, m, "echo hi"); got != "hi\n" {
		t.Fatalf("exec: got %q", got)
	}
	if n := hv.vms[0].dialCount(); n != 5 {
		t.Fatalf("vsock dials: got %d, want 5 (4 refused, then the agent)", n)
	}
	dirs := map[string]string{m.Dir(): "$M"}
	want := []string{"new machine identifier", "clone root.raw -> $M/disk.raw", "new vm", "start"}
	got := callsLike(hv.takeCalls(), dirs, "new", "clone", "start")
	for i, c := range got {
		if src, dst, ok := strings.Cut(strings.TrimPrefix(c, "clone "), " -> "); ok {
			got[i] = "clone " + filepath.Base(src) + " -> " + dst
		}
	}
	if !slices.Equal(got, want) {
		t.Fatalf("boot calls:\n got %q\nwant %q", got, want)
	}
	// The machine's configuration: identity from identity.json, the disk a
	// clone in its directory, the agent on vsock.
	id, err := loadIdentity(m.Dir())
	if err != nil {
		t.Fatal(err)
	}
	cfg := hv.vms[0].cfg
	if !bytes.Equal(cfg.MachineIdentifier, id.MachineIdentifier) || !slices.Equal(cfg.MACs, id.MACs) || len(cfg.MACs) != 1 {
		t.Fatalf("config identity %x %v, persisted %x %v", cfg.MachineIdentifier, cfg.MACs, id.MachineIdentifier, id.MACs)
	}
	if cfg.VCPUs != 2 || cfg.MemoryMB != 512 || cfg.Disk != filepath.Join(m.Dir(), diskFile) || cfg.VsockPort != DefaultVsockPort {
		t.Fatalf("config: %+v", cfg)
	}
	if !strings.Contains(cfg.Cmdline, "firkin.channel=vsock") {
		t.Fatalf("cmdline %q", cfg.Cmdline)
	}
	if got := readFile(t, cfg.Disk); got != "base" {
		t.Fatalf("disk: %q", got)
	}
}

// TestSaveRestore follows the seed's sequence: pause, save, resume on the
// source; same configuration, identifier and MACs, the disk as it was at
// the save, restore, resume on the clone; agents answer on both.
func TestSaveRestore(t *testing.T) {
	d, hv := testDriver(t)
	src := bootTest(t, d, "src", true)
	appendFile(t, src.cfg.Disk, "+before") // the guest wrote to its disk
	hv.takeCalls()

	snapDir := t.TempDir()
	if err := os.WriteFile(filepath.Join(snapDir, stateFile), []byte("stale"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	snap, err := d.Save(ctx, src, snapDir, vmpool.SaveOptions{Kind: vmpool.Template})
	if err != nil {
		t.Fatalf("save: %v", err)
	}
	dirs := map[string]string{src.Dir(): "$SRC", snapDir: "$SNAP"}
	got := callsLike(hv.takeCalls(), dirs, "pause", "clone", "save", "resume")
	want := []string{"pause", "clone $SRC/disk.raw -> $SNAP/disk.raw", "save $SNAP/machine.vzvmsave", "resume"}
	if !slices.Equal(got, want) {
		t.Fatalf("save calls:\n got %q\nwant %q", got, want)
	}
	if got := execOut(t, src, "echo still here"); got != "still here\n" {
		t.Fatalf("source after save: %q", got)
	}
	if s := readFile(t, filepath.Join(snapDir, stateFile)); s == "stale" {
		t.Fatal("the stale state file was not replaced")
	}
	appendFile(t, src.cfg.Disk, "+after") // the source goes on writing

	// The snapshot carries the identity, as the seed's record does.
	id, _ := loadIdentity(src.Dir())
	if !bytes.Equal(snap.MachineIdentifier, id.MachineIdentifier) || !slices.Equal(snap.NetworkMACs, id.MACs) {
		t.Fatalf("snapshot identity %x %v, machine %x %v", snap.MachineIdentifier, snap.NetworkMACs, id.MachineIdentifier, id.MACs)
	}
	if st, err := os.Stat(snap.Disk); err != nil || st.Mode().Perm() != 0o444 {
		t.Fatalf("frozen disk: %v %v", st, err)
	}

	dst := filepath.Join(t.TempDir(), "dst")
	rm, err := d.Restore(ctx, vmpool.RestoreSpec{ID: "dst", Dir: dst, Snapshot: snap, Network: true})
	if err != nil {
		t.Fatalf("restore: %v", err)
	}
	t.Cleanup(func() { _ = rm.Stop(context.Background()) })
	dirs = map[string]string{dst: "$DST", snapDir: "$SNAP"}
	got = callsLike(hv.takeCalls(), dirs, "clone", "new vm", "restore", "resume", "start")
	want = []string{"clone $SNAP/disk.raw -> $DST/disk.raw", "new vm", "restore $SNAP/machine.vzvmsave", "resume"}
	if !slices.Equal(got, want) {
		t.Fatalf("restore calls:\n got %q\nwant %q", got, want)
	}
	if got := execOut(t, rm, "echo restored"); got != "restored\n" {
		t.Fatalf("restored exec: %q", got)
	}
	restored := hv.vms[len(hv.vms)-1].cfg
	if !bytes.Equal(restored.MachineIdentifier, snap.MachineIdentifier) || !slices.Equal(restored.MACs, snap.NetworkMACs) {
		t.Fatal("the restored machine has another identity")
	}
	if got := readFile(t, restored.Disk); got != "base+before" {
		t.Fatalf("restored disk %q, want the disk as it was at the save", got)
	}
	if st, _ := os.Stat(restored.Disk); st.Mode().Perm()&0o200 == 0 {
		t.Fatal("the restored disk is not writable")
	}
	if rid, err := loadIdentity(dst); err != nil || !bytes.Equal(rid.MachineIdentifier, snap.MachineIdentifier) {
		t.Fatalf("restored identity.json: %v", err)
	}
}

// TestSaveStop: with Stop, the source is stopped and removed instead of
// resumed.
func TestSaveStop(t *testing.T) {
	d, hv := testDriver(t)
	m := bootTest(t, d, "src", false)
	hv.takeCalls()
	snap, err := d.Save(context.Background(), m, t.TempDir(), vmpool.SaveOptions{Kind: vmpool.Continuation, Stop: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := callsLike(hv.takeCalls(), nil, "pause", "save", "resume", "stop"); !slices.Equal(got, []string{"pause", "save " + filepath.Join(snap.Dir, stateFile), "stop"}) {
		t.Fatalf("calls %q", got)
	}
	waitClosed(t, m.Done(), time.Second, "Done")
	if _, err := os.Stat(m.Dir()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("machine dir after stop: %v", err)
	}
	if len(snap.NetworkMACs) != 0 {
		t.Fatalf("MACs without network: %v", snap.NetworkMACs)
	}
}

// TestSaveFailureResumes: a failed save resumes the machine, reconnects
// the agent, says which step failed and leaves no artifact behind.
func TestSaveFailureResumes(t *testing.T) {
	d, hv := testDriver(t)
	m := bootTest(t, d, "src", true)
	hv.fail["save"] = errors.New("disk full")
	dir := t.TempDir()
	_, err := d.Save(context.Background(), m, dir, vmpool.SaveOptions{})
	if err == nil || !strings.Contains(err.Error(), "save machine state: disk full") || !errors.Is(err, errdefs.ErrInternalFailure) {
		t.Fatalf("save error: %v", err)
	}
	if got := execOut(t, m, "echo ok"); got != "ok\n" {
		t.Fatalf("after failed save: %q", got)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("artifacts left: %v", ents)
	}
}

// TestSaveUnsupported: on a system that cannot save (older macOS, Intel)
// Save fails with ErrUnsupported before touching the machine.
func TestSaveUnsupported(t *testing.T) {
	d, hv := testDriver(t)
	m := bootTest(t, d, "src", false)
	hv.unsupported = errors.New("VZ save and restore need macOS 14 or later on Apple silicon")
	hv.takeCalls()
	_, err := d.Save(context.Background(), m, t.TempDir(), vmpool.SaveOptions{})
	if !errors.Is(err, errdefs.ErrUnsupported) || !strings.Contains(err.Error(), "macOS 14") {
		t.Fatalf("save error: %v", err)
	}
	if calls := hv.takeCalls(); len(calls) != 0 {
		t.Fatalf("machine touched: %q", calls)
	}
	if err := m.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// TestRestoreChecksTheRecord: a record whose identity differs from the
// saved machine's is refused before anything starts.
func TestRestoreChecksTheRecord(t *testing.T) {
	d, _ := testDriver(t)
	m := bootTest(t, d, "src", true)
	snap, err := d.Save(context.Background(), m, t.TempDir(), vmpool.SaveOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for name, mutate := range map[string]func(*vmpool.Snapshot){
		"identifier": func(s *vmpool.Snapshot) { s.MachineIdentifier = []byte("other") },
		"macs":       func(s *vmpool.Snapshot) { s.NetworkMACs = []string{"02:00:00:00:00:01"} },
		"resources":  func(s *vmpool.Snapshot) { s.Resources.VCPUs = 7 },
		"no state":   func(s *vmpool.Snapshot) { s.Dir = filepath.Dir(s.Disk) + "-gone" },
	} {
		t.Run(name, func(t *testing.T) {
			s := snap
			mutate(&s)
			dir := filepath.Join(t.TempDir(), "dst")
			_, err := d.Restore(context.Background(), vmpool.RestoreSpec{ID: "dst", Dir: dir, Snapshot: s})
			if !errors.Is(err, errdefs.ErrIntegrity) {
				t.Fatalf("restore: %v, want ErrIntegrity", err)
			}
			if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("dir left: %v", err)
			}
		})
	}
	_, err = d.Restore(context.Background(), vmpool.RestoreSpec{ID: "dst", Dir: t.TempDir(), Snapshot: vmpool.Snapshot{Dir: snap.Dir, Disk: snap.Disk}})
	if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "machine identifier") {
		t.Fatalf("restore without identifier: %v", err)
	}
}

// TestRestoreFailureCleansUp: a failed restore stops the VM and removes
// its directory, naming the step.
func TestRestoreFailureCleansUp(t *testing.T) {
	d, hv := testDriver(t)
	m := bootTest(t, d, "src", false)
	snap, err := d.Save(context.Background(), m, t.TempDir(), vmpool.SaveOptions{})
	if err != nil {
		t.Fatal(err)
	}
	hv.fail["restore"] = errors.New("incompatible")
	dir := filepath.Join(t.TempDir(), "dst")
	_, err = d.Restore(context.Background(), vmpool.RestoreSpec{ID: "dst", Dir: dir, Snapshot: snap})
	if err == nil || !strings.Contains(err.Error(), "restore machine state: incompatible") {
		t.Fatalf("restore: %v", err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("dir left: %v", err)
	}
	last := hv.vms[len(hv.vms)-1]
	waitClosed(t, last.Done(), time.Second, "the failed VM's Done")
}

// TestBootFailures: errors name the step, carry a class, and leave nothing
// behind.
func TestBootFailures(t *testing.T) {
	t.Run("start", func(t *testing.T) {
		d, hv := testDriver(t)
		hv.fail["start"] = errors.New("boom")
		dir := filepath.Join(t.TempDir(), "m")
		_, err := d.Boot(context.Background(), vmpool.BootSpec{ID: "m", Dir: dir, Image: testImage(t)})
		if err == nil || !strings.Contains(err.Error(), "vz: boot m: start: boom") {
			t.Fatalf("boot: %v", err)
		}
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("dir left: %v", err)
		}
	})
	t.Run("no agent", func(t *testing.T) {
		d, hv := testDriver(t)
		hv.dialFailures = 1 << 30
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		dir := filepath.Join(t.TempDir(), "m")
		_, err := d.Boot(ctx, vmpool.BootSpec{ID: "m", Dir: dir, Image: testImage(t)})
		if !errors.Is(err, errdefs.ErrTimeout) || !strings.Contains(err.Error(), "connect to the agent") {
			t.Fatalf("boot: %v", err)
		}
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("dir left: %v", err)
		}
		waitClosed(t, hv.vms[0].Done(), time.Second, "VM Done")
	})
	t.Run("invalid", func(t *testing.T) {
		d, hv := testDriver(t)
		img := testImage(t)
		for name, spec := range map[string]vmpool.BootSpec{
			"id":        {ID: "Bad/ID", Dir: t.TempDir(), Image: img},
			"dir":       {ID: "m", Dir: "relative", Image: img},
			"vcpus":     {ID: "m", Dir: filepath.Join(t.TempDir(), "m"), Image: img, Resources: vmpool.Resources{VCPUs: 64}},
			"memory":    {ID: "m", Dir: filepath.Join(t.TempDir(), "m"), Image: img, Resources: vmpool.Resources{MemoryMB: 64}},
			"arch":      {ID: "m", Dir: t.TempDir(), Image: vmpool.Image{Kernel: img.Kernel, Initramfs: img.Initramfs, RootDisk: img.RootDisk, Arch: "s390x"}},
			"no kernel": {ID: "m", Dir: t.TempDir(), Image: vmpool.Image{Initramfs: img.Initramfs, RootDisk: img.RootDisk}},
		} {
			_, err := d.Boot(context.Background(), spec)
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("%s: %v, want ErrInvalidArgument", name, err)
			}
		}
		if n := len(hv.vms); n != 0 {
			t.Fatalf("%d VMs made for invalid specs", n)
		}
	})
}

// TestStopIsIdempotent: Stop stops, removes the directory, closes Done, and
// a second Stop is harmless.
func TestStopIsIdempotent(t *testing.T) {
	d, hv := testDriver(t)
	m := bootTest(t, d, "m", false)
	for range 2 {
		if err := m.Stop(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	waitClosed(t, m.Done(), time.Second, "Done")
	if _, err := os.Stat(m.Dir()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("dir: %v", err)
	}
	if err := m.Ping(context.Background()); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("ping after stop: %v", err)
	}
	if got := callsLike(hv.takeCalls(), nil, "stop"); len(got) != 1 {
		t.Fatalf("stops: %q", got)
	}
}

// TestMachineDoneWhenTheVMStops: a VM that stops on its own closes Done.
func TestMachineDoneWhenTheVMStops(t *testing.T) {
	d, hv := testDriver(t)
	m := bootTest(t, d, "m", false)
	_ = hv.vms[0].Stop()
	waitClosed(t, m.Done(), time.Second, "Done")
}

// TestBootChoosesSaveableDevices: optional devices that would keep the
// machine from being saved are left out (the console is kept before
// entropy), the choice is part of the saved configuration, and a host that
// cannot save at all gets every device.
func TestBootChoosesSaveableDevices(t *testing.T) {
	tests := []struct {
		name                 string
		unsaveable           map[string]bool
		unsupported          error
		wantEntropy, wantCon bool
	}{
		{"all saveable", nil, nil, true, true},
		{"entropy blocks", map[string]bool{"entropy": true}, nil, false, true},
		{"console blocks", map[string]bool{"console": true}, nil, true, false},
		{"both block", map[string]bool{"entropy": true, "console": true}, nil, false, false},
		{"cannot save at all", nil, errors.New("macOS 13"), true, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, hv := testDriver(t)
			hv.unsaveable, hv.unsupported = tt.unsaveable, tt.unsupported
			m := bootTest(t, d, "m", false)
			if c := hv.vms[0].cfg; c.Entropy != tt.wantEntropy || c.Console != tt.wantCon {
				t.Fatalf("entropy %v console %v, want %v %v", c.Entropy, c.Console, tt.wantEntropy, tt.wantCon)
			}
			if tt.unsupported != nil {
				return
			}
			snap, err := d.Save(context.Background(), m, t.TempDir(), vmpool.SaveOptions{})
			if err != nil {
				t.Fatalf("save: %v", err)
			}
			r, err := d.Restore(context.Background(), vmpool.RestoreSpec{ID: "r", Dir: filepath.Join(t.TempDir(), "r"), Snapshot: snap})
			if err != nil {
				t.Fatalf("restore: %v", err)
			}
			defer r.Stop(context.Background())
			if c := hv.vms[len(hv.vms)-1].cfg; c.Entropy != tt.wantEntropy || c.Console != tt.wantCon {
				t.Fatalf("restored with entropy %v console %v", c.Entropy, c.Console)
			}
		})
	}
}
