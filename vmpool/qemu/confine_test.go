//go:build linux

package qemu

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/jail"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// statusField returns a field of /proc/pid/status ("Uid", "NoNewPrivs").
func statusField(t *testing.T, pid int, name string) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, name+":"); ok {
			return strings.Join(strings.Fields(v), " ")
		}
	}
	t.Fatalf("no %s in /proc/%d/status", name, pid)
	return ""
}

func owner(t *testing.T, path string) (uid, gid uint32, perm os.FileMode) {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	s := st.Sys().(*syscall.Stat_t)
	return s.Uid, s.Gid, st.Mode().Perm()
}

// A root worker's QEMU runs as a uid of its own from the driver's range,
// with no_new_privs, in a cgroup with the machine's limits, in a mount
// namespace holding only what it needs; Stop removes the cgroup; a
// template save leaves root-owned snapshot files its clones can read.
func TestConfinedMachine(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("confinement needs a root worker: run the test as root")
	}
	d := testDriver(t)
	first, count, ok := d.UIDRange()
	if !ok || count != jail.RangeSize-1 || !jail.InAnyRange(first) {
		t.Fatalf("UIDRange = %d, %d, %v", first, count, ok)
	}
	gid := first - 1
	m := bootTest(t, d, vmpool.BootSpec{ID: "conf1", SnapshotReady: true, Resources: vmpool.Resources{VCPUs: 2, MemoryMB: 256}})
	var c vmpool.Machine = m
	uid := c.(vmpool.Confined).UID()
	if uid < first || uid >= first+count {
		t.Fatalf("UID %d outside the range [%d, %d)", uid, first, first+count)
	}
	u := strconv.Itoa(int(uid))
	if got := statusField(t, m.PID(), "Uid"); got != strings.Repeat(u+" ", 3)+u {
		t.Errorf("/proc/%d/status Uid: %s, want %s everywhere", m.PID(), got, u)
	}
	if got := statusField(t, m.PID(), "Gid"); got != strings.Repeat(strconv.Itoa(int(gid))+" ", 3)+strconv.Itoa(int(gid)) {
		t.Errorf("Gid: %s, want the range's group %d", got, gid)
	}
	if got := statusField(t, m.PID(), "Groups"); got != strconv.Itoa(int(gid)) {
		t.Errorf("Groups: %q, want only %d", got, gid)
	}
	if got := statusField(t, m.PID(), "NoNewPrivs"); got != "1" {
		t.Errorf("NoNewPrivs: %s", got)
	}
	if got := statusField(t, m.PID(), "Seccomp"); got != "2" {
		t.Errorf("Seccomp: %s, want 2 (filter mode: QEMU's sandbox)", got)
	}
	// The machine and socket dirs are root's (QEMU cannot plant links
	// there); what QEMU writes is its own; the console log is the worker's.
	for _, p := range []string{m.Dir(), m.sockDir} {
		if du, dg, perm := owner(t, p); du != 0 || dg != gid || perm != 0o710 {
			t.Errorf("%s: %d:%d %o, want 0:%d 0710", p, du, dg, perm, gid)
		}
	}
	for _, p := range []string{filepath.Dir(m.cfg.QMP), m.cfg.Disk, m.cfg.MemPath} {
		if fu, _, perm := owner(t, p); fu != uid || perm&0o077 != 0 {
			t.Errorf("%s: uid %d mode %o, want %d and no access for others", p, fu, perm, uid)
		}
	}
	if fu, _, perm := owner(t, m.cfg.Console); fu != 0 || perm != 0o600 {
		t.Errorf("console log: uid %d mode %o, want root's 0600", fu, perm)
	}
	if fu, fg, perm := owner(t, m.cfg.ConsoleSock); fu != 0 || fg != gid || perm != 0o660 {
		t.Errorf("console socket: %d:%d %o, want 0:%d 0660", fu, fg, perm, gid)
	}
	// The console works from inside the jail: the guest ran once QEMU had
	// connected, so its first line is in the log.
	if tl := m.ConsoleTail(1 << 20); !strings.Contains(tl, "msg=booted") {
		t.Errorf("console log of a confined machine misses the agent's first line:\n%s", tl)
	}
	// What QEMU sees as /: the system paths and the machine's own paths only.
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/root", m.PID()))
	if err != nil {
		t.Fatal(err)
	}
	var root []string
	for _, e := range ents {
		root = append(root, e.Name())
	}
	for _, bad := range []string{"root", "home", "work", "boot", "opt", "srv"} {
		if slices.Contains(root, bad) {
			t.Errorf("QEMU's root has /%s: %v", bad, root)
		}
	}
	// The base disk is not there: QEMU has it as a descriptor only.
	base := m.image.RootDisk
	if _, err := os.Stat(fmt.Sprintf("/proc/%d/root%s", m.PID(), base)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("QEMU's root has the base disk %s (%v)", base, err)
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d/root/etc/passwd", m.PID())); err == nil {
		t.Error("QEMU's root has /etc/passwd")
	}
	// slirp needs a nameserver to forward the guest's DNS to.
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/root/etc/resolv.conf", m.PID())); err != nil || !strings.Contains(string(b), "nameserver") {
		t.Errorf("QEMU's root has no /etc/resolv.conf with a nameserver: %q, %v", b, err)
	}
	t.Logf("QEMU's root: %v; memory after boot: %s", root, memory(t, m.PID()))

	// The cgroup: limits and membership.
	dirs := m.Cgroup()
	if len(dirs) == 0 {
		t.Fatal("no cgroup")
	}
	read := func(ctl string, files ...string) string {
		t.Helper()
		dir := m.cgroup.Dir(ctl)
		for _, f := range files {
			if b, err := os.ReadFile(filepath.Join(dir, f)); err == nil {
				return strings.TrimSpace(string(b))
			}
		}
		t.Fatalf("no %v in the %s cgroup %q", files, ctl, dir)
		return ""
	}
	wantMem := strconv.Itoa((256 + DefaultMemoryOverheadMB) << 20)
	if got := read("memory", "memory.max", "memory.limit_in_bytes"); got != wantMem {
		t.Errorf("memory limit %s, want %s", got, wantMem)
	}
	if got := read("cpu", "cpu.max", "cpu.cfs_quota_us"); got != "200000" && got != "200000 100000" {
		t.Errorf("cpu quota %s, want 2 vCPUs' worth", got)
	}
	if got := read("pids", "pids.max"); got != "130" {
		t.Errorf("pids.max %s, want 130", got)
	}
	for _, dir := range dirs {
		procs, _ := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
		if !slices.Contains(strings.Fields(string(procs)), strconv.Itoa(m.PID())) {
			t.Errorf("qemu %d not in %s (%q)", m.PID(), dir, procs)
		}
	}
	// The guest fills most of its RAM: QEMU stays within the limit.
	out := run(t, m, `set -- $(grep MemAvailable /proc/meminfo); n=$(( $2 / 1024 - 40 )); d=/dev/shm; [ -d $d ] || d=/tmp; dd if=/dev/zero of=$d/fill bs=1048576 count=$n 2>/dev/null; echo $n; rm -f $d/fill`)
	t.Logf("the guest filled %s MiB", strings.TrimSpace(out))
	peak := read("memory", "memory.peak", "memory.max_usage_in_bytes")
	t.Logf("cgroup memory peak once the guest filled its RAM: %s MiB; QEMU %s", strconv.Itoa(atoi(peak)>>20), memory(t, m.PID()))
	var st machineState
	if err := readJSON(filepath.Join(m.Dir(), stateFile), &st); err != nil || st.UID != uid || !slices.Equal(st.Cgroup, dirs) {
		t.Errorf("machine.json: uid %d cgroup %v (%v)", st.UID, st.Cgroup, err)
	}
	run(t, m, "echo confined > /root/c")

	// A template save: snapshot files are root's 0600, but for the memory
	// file the clones map by path, shared with the group.
	snap := save(t, d, m, vmpool.SaveOptions{Kind: vmpool.Template, Stop: true})
	if _, _, perm := owner(t, snap.Dir); perm != 0o700 {
		t.Errorf("snapshot dir mode %o", perm)
	}
	for name, mode := range map[string]os.FileMode{snapState: 0o600, layerName(1): 0o600, snapMem: templateMemMode, snapConfig: 0o600} {
		fu, fg, perm := owner(t, filepath.Join(snap.Dir, name))
		if fu != 0 || perm != mode || (mode != 0o600 && fg != gid) {
			t.Errorf("%s: %d:%d %o, want 0:%d %o", name, fu, fg, perm, gid, mode)
		}
	}
	checkSnapshotPrivate(t, snap.Dir)
	for _, dir := range dirs {
		if _, err := os.Stat(dir); !os.IsNotExist(err) {
			t.Errorf("cgroup %s still there after Stop (%v)", dir, err)
		}
	}
	// A clone, as another uid, maps the template's memory and reads its layers.
	clone := restore(t, d, "conf2", snap, false)
	if clone.UID() == uid {
		t.Errorf("the clone reuses uid %d at once", uid)
	}
	if out := run(t, clone, "cat /root/c"); out != "confined\n" {
		t.Errorf("clone sees %q", out)
	}
	if got := statusField(t, clone.PID(), "Seccomp"); got != "2" {
		t.Errorf("clone's Seccomp: %s", got)
	}
	// A continuation of the clone while it runs on, restored as a third
	// confined machine: state and layers reach QEMU as descriptors.
	run(t, clone, "echo second > /root/d")
	cont := save(t, d, clone, vmpool.SaveOptions{Kind: vmpool.Continuation})
	for _, name := range []string{snapState, layerName(1), layerName(2)} {
		if fu, _, perm := owner(t, filepath.Join(cont.Dir, name)); fu != 0 || perm != 0o600 {
			t.Errorf("continuation %s: uid %d mode %o, want root's 0600", name, fu, perm)
		}
	}
	checkSnapshotPrivate(t, cont.Dir)
	if out := run(t, clone, "cat /root/d"); out != "second\n" {
		t.Errorf("the clone after its save: %q", out)
	}
	third := restore(t, d, "conf3", cont, false)
	if out := run(t, third, "cat /root/c /root/d"); out != "confined\nsecond\n" {
		t.Errorf("the continuation sees %q", out)
	}
	if third.UID() == 0 || third.UID() == clone.UID() {
		t.Errorf("the continuation runs as uid %d (clone %d)", third.UID(), clone.UID())
	}
}

// checkSnapshotPrivate checks that every file of the snapshot in dir is
// root's 0600 but a template's memory file and the image's boot files
// (links to the image's own).
func checkSnapshotPrivate(t *testing.T, dir string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		switch e.Name() {
		case snapMem, kernelFile, initramfsFile:
			continue
		}
		if fu, _, perm := owner(t, filepath.Join(dir, e.Name())); fu != 0 || perm != 0o600 {
			t.Errorf("snapshot file %s: uid %d mode %o, want root's 0600", e.Name(), fu, perm)
		}
	}
}

// The console socket takes only QEMU's connection: another process's
// (another machine's QEMU of the same group, say) is dropped unread.
func TestConsoleChecksPeer(t *testing.T) {
	dir := shortDir(t)
	sock, path := filepath.Join(dir, consoleSock), filepath.Join(dir, consoleFile)
	exited := make(chan struct{})
	defer close(exited)
	dial := func(msg string) {
		t.Helper()
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = c.Write([]byte(msg))
		buf := make([]byte, 1)
		_ = c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		_, _ = c.Read(buf) // EOF at once when dropped
		c.Close()
	}
	c, err := listenConsole(sock, path, 1<<16, 0, exited, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	c.expect(os.Getpid() + 1) // not us
	dial("forged\n")
	select {
	case <-c.connected:
		t.Error("a connection of another process counts as QEMU's")
	default:
	}
	c.close()
	if b, _ := os.ReadFile(path); len(b) != 0 {
		t.Errorf("the log took another process's bytes: %q", b)
	}
	c, err = listenConsole(sock, path, 1<<16, 0, exited, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	c.expect(os.Getpid())
	dial("genuine\n")
	select {
	case <-c.connected:
	case <-time.After(5 * time.Second):
		t.Error("the expected peer's connection was not taken")
	}
	for i := 0; i < 250 && consoleTail(path, 100) != "genuine\n"; i++ {
		time.Sleep(20 * time.Millisecond)
	}
	c.close()
	if b, _ := os.ReadFile(path); string(b) != "genuine\n" {
		t.Errorf("the log holds %q, want the peer's line", b)
	}
}

// A driver told not to confine (or a non-root worker) says so once at start
// and hands out no uids.
func TestUnconfinedDriverSaysSo(t *testing.T) {
	var logs strings.Builder
	d, err := New(WithStateDir(t.TempDir()), WithConfine(false), WithAccel(AccelTCG),
		WithLogger(slog.New(slog.NewTextHandler(&logs, nil))))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, _, ok := d.UIDRange(); ok {
		t.Error("UIDRange ok for an unconfined driver")
	}
	if !strings.Contains(logs.String(), "confinement: off") || strings.Count(logs.String(), "confinement") != 1 {
		t.Errorf("start log: %q", logs.String())
	}
	if got := (&Machine{}).UID(); got != uint32(os.Geteuid()) {
		t.Errorf("an unconfined machine's UID is %d, want the worker's %d", got, os.Geteuid())
	}
}

// The worker talks only to sockets its QEMU listens on: a socket of
// another process (a link a QEMU put in its socket directory) is refused.
func TestDialChecksPeer(t *testing.T) {
	path := filepath.Join(shortDir(t), "s.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := dialUnix(ctx, path, os.Getpid(), nil)
	if err != nil {
		t.Fatalf("dial own socket: %v", err)
	}
	c.Close()
	if _, err := dialUnix(ctx, path, os.Getpid()+1, nil); !errors.Is(err, errdefs.ErrIntegrity) {
		t.Fatalf("dial another process's socket: %v, want ErrIntegrity", err)
	}
}

// A snapshot file made under another range (or before confinement) is
// opened up to this driver's group; a file the worker did not make is not.
func TestShareWithMachines(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("confinement needs a root worker: run the test as root")
	}
	d := testDriver(t)
	first, _, ok := d.UIDRange()
	if !ok {
		t.Fatal("driver not confined")
	}
	dir := t.TempDir()
	mine, other := filepath.Join(dir, "layer"), filepath.Join(dir, "host")
	for _, p := range []string{mine, other} {
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chown(mine, 0, int(jail.RangeBase+7*jail.RangeSize)); err != nil { // another range's group
		t.Fatal(err)
	}
	if err := os.Chown(other, 0, 42); err != nil { // like /etc/shadow
		t.Fatal(err)
	}
	if err := d.shareWithMachines(mine, true); err != nil {
		t.Fatalf("share a snapshot file: %v", err)
	}
	if _, g, perm := owner(t, mine); g != first-1 || perm != 0o660 {
		t.Errorf("shared file: group %d mode %o, want %d 0660", g, perm, first-1)
	}
	if err := d.shareWithMachines(other, false); err == nil {
		t.Error("a file of another group was opened up")
	}
	if _, g, perm := owner(t, other); g != 42 || perm != 0o600 {
		t.Errorf("the refused file changed: group %d mode %o", g, perm)
	}
}

// Reattach takes the uid and gid a machine.json names only together and
// from the machine ranges: never a host group for the console socket, nor
// a uid for the allocator, from a record alone.
func TestReattachRejectsForeignIDs(t *testing.T) {
	d, err := New(WithStateDir(t.TempDir()), WithConfine(false), WithAccel(AccelTCG))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	in := uint32(jail.RangeBase + 1)
	for _, ids := range [][2]uint32{{0, 5}, {5, 5}, {in, 0}, {in, 5}, {0, in}} {
		dir := t.TempDir()
		st := machineState{ID: "m", Dir: dir, PID: os.Getpid(), UID: ids[0], GID: ids[1]}
		if err := writeJSON(filepath.Join(dir, stateFile), st); err != nil {
			t.Fatal(err)
		}
		if _, err := d.Reattach(context.Background(), dir); !errors.Is(err, errdefs.ErrIntegrity) {
			t.Errorf("uid %d gid %d: Reattach = %v, want an integrity error", ids[0], ids[1], err)
		}
	}
}
