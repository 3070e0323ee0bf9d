package jail

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

func TestMain(m *testing.M) {
	Main() // jail processes of this test binary stop here
	if root := os.Getenv("JAIL_TEST_PARENT"); root != "" {
		parentOfJail(root)
		return
	}
	os.Exit(m.Run())
}

// parentOfJail is the test binary as the parent of a jail (for
// TestJailDiesWithParent): it starts `sleep 60` jailed with DieWithParent,
// prints its pid and waits to be killed.
func parentOfJail(root string) {
	cmd, err := Command(Spec{Path: "/bin/sleep", Args: []string{"sleep", "60"}, Dir: "/", Root: root,
		UID: RangeBase + 1, GID: RangeBase, DieWithParent: true})
	if err == nil {
		err = cmd.Start()
	}
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	fmt.Println(cmd.Process.Pid)
	cmd.Wait()
}

// requireRoot fails the test when the process cannot make namespaces,
// cgroups or change uids, saying so.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("jail: this test needs root (mount namespaces, cgroups, uid changes): run it with sudo")
	}
}

// testRange claims a uid range in the shared lock dir, so parallel test
// processes (and a worker on the same host) never share ids.
func testRange(t *testing.T) Range {
	t.Helper()
	r, release, err := AcquireRange(DefaultLockDir)
	if err != nil {
		t.Fatalf("AcquireRange: %v", err)
	}
	t.Cleanup(func() { release() })
	return r
}

func TestAcquireRangeTwoAcquirers(t *testing.T) {
	dir := t.TempDir()
	a, releaseA, err := AcquireRange(dir)
	if err != nil {
		t.Fatal(err)
	}
	b, releaseB, err := AcquireRange(dir, a.Index) // prefers a's range: taken
	if err != nil {
		t.Fatal(err)
	}
	if a.Index == b.Index {
		t.Fatalf("two acquirers got the same range %d", a.Index)
	}
	if a.First != RangeBase+uint32(a.Index)*RangeSize || a.Count != RangeSize || a.GID() != a.First {
		t.Fatalf("range %+v: wrong bounds", a)
	}
	if a.Contains(b.First) || !b.Contains(b.First+RangeSize-1) || b.Contains(b.First+RangeSize) {
		t.Fatalf("ranges %+v and %+v overlap or are cut short", a, b)
	}
	// A restarted worker gets its recorded range back once it is free.
	if err := releaseA(); err != nil {
		t.Fatal(err)
	}
	_ = releaseA() // idempotent
	c, releaseC, err := AcquireRange(dir, a.Index)
	if err != nil {
		t.Fatal(err)
	}
	if c.Index != a.Index {
		t.Fatalf("preferred range %d is free but got %d", a.Index, c.Index)
	}
	releaseB()
	releaseC()
}

func TestAcquireRangeAcrossProcesses(t *testing.T) {
	dir := t.TempDir()
	a, release, err := AcquireRange(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	// Another process holding the lock of range a+1: the next acquirer
	// here must skip both.
	lock := filepath.Join(dir, strconv.Itoa(a.Index+1)+".lock")
	cmd := exec.Command("flock", "-x", lock, "sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatalf("flock(1): %v", err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	deadline := time.Now().Add(5 * time.Second)
	for exec.Command("flock", "-n", "-x", lock, "true").Run() == nil { // not yet held
		if time.Now().After(deadline) {
			t.Fatalf("the other process never took %s", lock)
		}
		time.Sleep(20 * time.Millisecond)
	}
	b, releaseB, err := AcquireRange(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer releaseB()
	if b.Index == a.Index || b.Index == a.Index+1 {
		t.Fatalf("got range %d, held by this process (%d) or another one (%d)", b.Index, a.Index, a.Index+1)
	}
}

// A range nobody holds the lock of but whose uids a process still runs as
// (a machine of a worker killed with --keep-machines) is skipped, unless it
// is the caller's preferred one.
func TestAcquireRangeSkipsRangeInUse(t *testing.T) {
	requireRoot(t)
	const n = 250 // far above what parallel tests take in the shared lock dir
	for _, i := range []int{n, n + 1} {
		if rangesInUse("/proc")[i] {
			t.Skipf("range %d already has processes on this host", i)
		}
	}
	// An orphan of range n: a process as one of its uids (saved and file
	// system ones included).
	orphan := exec.Command("/bin/sleep", "60")
	orphan.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: RangeAt(n).First + 5, Gid: RangeAt(n).GID()}}
	if err := orphan.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { orphan.Process.Kill(); orphan.Wait() })
	if !rangesInUse("/proc")[n] {
		t.Fatalf("rangesInUse misses range %d of pid %d", n, orphan.Process.Pid)
	}

	// A lock dir of this test's own, where every range but n and n+1 is
	// held (flocks on other open files of this process conflict too).
	dir := t.TempDir()
	for i := 0; i < RangeCount; i++ {
		if i == n || i == n+1 {
			continue
		}
		f, err := os.OpenFile(filepath.Join(dir, strconv.Itoa(i)+".lock"), os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			t.Fatal(err)
		}
	}
	r, release, err := AcquireRange(dir)
	if err != nil {
		t.Fatal(err)
	}
	if r.Index != n+1 {
		t.Fatalf("got range %d, want %d: range %d has a process as uid %d", r.Index, n+1, n, RangeAt(n).First+5)
	}
	// With n+1 held too, nothing is left: n is not handed out.
	if r2, _, err := AcquireRange(dir); !errors.Is(err, errdefs.ErrCapacity) {
		t.Fatalf("AcquireRange = %d, %v; want ErrCapacity (range %d is in use)", r2.Index, err, n)
	}
	release()
	// The worker whose state recorded n (its own orphans) takes it back.
	r, release, err = AcquireRange(dir, n)
	if err != nil || r.Index != n {
		t.Fatalf("AcquireRange(prefer %d) = %d, %v; want the preferred range", n, r.Index, err)
	}
	release()
	// Once the orphan is gone, n is free for anyone again.
	orphan.Process.Kill()
	orphan.Wait()
	r, release, err = AcquireRange(dir)
	if err != nil || r.Index != n {
		t.Fatalf("AcquireRange = %d, %v; want %d once its process is gone", r.Index, err, n)
	}
	release()
}

func TestStatusIDs(t *testing.T) {
	status := "Name:\tqemu\nUmask:\t0022\nPid:\t2000000007\nUid:\t0\t0\t2000065541\t0\nGid:\t1\t2\t3\t4\nGroups:\t2000000000\n"
	got := statusIDs([]byte(status))
	want := []uint32{0, 0, 2000065541, 0, 1, 2, 3, 4}
	if !slices.Equal(got, want) {
		t.Fatalf("statusIDs = %v, want %v (Uid and Gid lines only)", got, want)
	}
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "42"), 0o755)
	os.MkdirAll(filepath.Join(dir, "self"), 0o755)
	os.WriteFile(filepath.Join(dir, "42", "status"), []byte(status), 0o644)
	os.WriteFile(filepath.Join(dir, "self", "status"), []byte("Uid:\t2000000001\t0\t0\t0\n"), 0o644)
	if busy := rangesInUse(dir); len(busy) != 1 || !busy[1] {
		t.Fatalf("rangesInUse = %v, want range 1 only (a saved uid; pid directories only)", busy)
	}
}

func TestAllocatorRoundRobin(t *testing.T) {
	r := Range{Index: 0, First: RangeBase, Count: 5} // uids First+1..First+4
	a := NewAllocator(r)
	u1, _ := a.Allocate()
	u2, _ := a.Allocate()
	if u1 != r.First+1 || u2 != r.First+2 {
		t.Fatalf("first uids %d %d, want %d %d (the range's first id is the group)", u1, u2, r.First+1, r.First+2)
	}
	a.Release(u1)
	u3, _ := a.Allocate()
	if u3 == u1 {
		t.Fatalf("released uid %d handed out again at once", u1)
	}
	a.Reserve(r.First + 4) // a reattached machine
	u4, _ := a.Allocate()
	if u4 != u1 {
		t.Fatalf("after the round wrapped: got %d, want the released %d", u4, u1)
	}
	if _, err := a.Allocate(); err == nil {
		t.Fatal("allocated from a full range")
	}
	a.Release(u3)
	if u, err := a.Allocate(); err != nil || u != u3 {
		t.Fatalf("Allocate = %d, %v; want the one free uid %d", u, err, u3)
	}
	a.Reserve(r.First + 99) // outside: ignored
	a.Reserve(r.First)      // the group: ignored
}

func TestJailRunsConfined(t *testing.T) {
	requireRoot(t)
	r := testRange(t)
	cg, err := OpenCgroups("firkin/" + r.ID())
	if err != nil {
		t.Fatalf("OpenCgroups: %v", err)
	}
	t.Cleanup(func() { cg.Close() })
	g, err := cg.Create("jailtest", Limits{MemoryBytes: 64 << 20, CPUs: 1, Pids: 16})
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	t.Cleanup(func() { g.Remove() })

	uid := r.First + 7
	work := filepath.Join(t.TempDir(), "work")
	if err := os.Mkdir(work, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(work, int(uid), int(r.GID())); err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(t.TempDir(), "secret")
	os.WriteFile(secret, []byte("x"), 0o600)
	script := `id -u; id -G; grep -E "NoNewPrivs|Uid" /proc/self/status; ls -A /; cat /proc/self/cgroup; echo ok > out; test -e /proc/1/status && echo sees-init || echo hidden; cat ` + secret + ` 2>/dev/null && echo LEAK; true`
	cmd, err := Command(Spec{Path: "/bin/sh", Args: []string{"sh", "-c", script}, Dir: work,
		Root: t.TempDir(), Binds: []Bind{{Path: work, Writable: true}}, UID: uid, GID: r.GID(),
		Cgroups: g.Dirs(), DieWithParent: true})
	if err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("jail: %v\nstderr: %s", err, stderr.String())
	}
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	t.Logf("jail output:\n%s", stdout.String())
	want := func(cond bool, what string) {
		t.Helper()
		if !cond {
			t.Errorf("%s; output:\n%s\nstderr: %s", what, stdout.String(), stderr.String())
		}
	}
	want(lines[0] == strconv.Itoa(int(uid)), "id -u is not the machine uid")
	want(lines[1] == strconv.Itoa(int(r.GID())), "id -G is not the range group alone")
	want(slices.Contains(lines, "NoNewPrivs:\t1"), "NoNewPrivs is not 1")
	u := strconv.Itoa(int(uid))
	want(slices.Contains(lines, "Uid:\t"+u+"\t"+u+"\t"+u+"\t"+u), "not every uid is the machine's")
	top := strings.Split(work, "/")[1] // the work dir's first path element
	root := []string{"bin", "dev", "etc", "lib", "lib64", "proc", "sbin", "usr", top}
	var got []string
	for _, l := range lines[4:] {
		if strings.Contains(l, ":") {
			break
		}
		got = append(got, l)
	}
	slices.Sort(root)
	root = slices.Compact(root)
	var wantRoot []string
	for _, e := range root {
		if _, err := os.Lstat("/" + e); err == nil || e == "proc" || e == top {
			wantRoot = append(wantRoot, e)
		}
	}
	want(slices.Equal(got, wantRoot), "root is "+strings.Join(got, " ")+", want "+strings.Join(wantRoot, " "))
	want(strings.Contains(stdout.String(), ":/firkin/"+r.ID()+"/jailtest\n") || strings.Contains(stdout.String(), "/firkin/"+r.ID()+"/jailtest\n"),
		"/proc/self/cgroup does not name the machine cgroup")
	want(lines[len(lines)-1] == "hidden", "the jail's /proc shows other users' processes (pid 1)")
	want(!strings.Contains(stdout.String(), "LEAK"), "a host file outside the binds was readable")
	if b, err := os.ReadFile(filepath.Join(work, "out")); err != nil || string(b) != "ok\n" {
		t.Errorf("the writable bind did not take the write: %q %v", b, err)
	}
	if st, err := os.Stat(filepath.Join(work, "out")); err != nil || st.Sys().(*syscall.Stat_t).Uid != uid {
		t.Errorf("a file the jailed program made is not owned by its uid (%v)", err)
	}
}

// A jail has the host's resolver configuration (slirp needs a nameserver).
func TestJailResolvConf(t *testing.T) {
	requireRoot(t)
	want := "nameserver " + FallbackNameserver + "\n"
	if src, ok := resolvedFile(ResolvConf); ok {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		want = string(b)
	}
	cmd, err := Command(Spec{Path: "/bin/sh", Args: []string{"sh", "-c", "cat /etc/resolv.conf; echo x >> /etc/resolv.conf 2>/dev/null && echo WRITABLE; true"},
		Dir: "/", Root: t.TempDir(), UID: RangeBase + 1, GID: RangeBase, DieWithParent: true})
	if err != nil {
		t.Fatal(err)
	}
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("jail: %v: %s", err, stderr.String())
	}
	if out.String() != want {
		t.Fatalf("the jail's /etc/resolv.conf is %q, want %q", out.String(), want)
	}

	// A link (systemd-resolved's stub) resolves to its target; a dangling
	// one or a directory to none.
	dir := t.TempDir()
	target := filepath.Join(dir, "stub-resolv.conf")
	os.WriteFile(target, []byte("nameserver 127.0.0.53\n"), 0o644)
	os.Symlink(target, filepath.Join(dir, "link"))
	os.Symlink(filepath.Join(dir, "missing"), filepath.Join(dir, "dangling"))
	if src, ok := resolvedFile(filepath.Join(dir, "link")); !ok || src != target {
		t.Errorf("resolvedFile(link) = %q, %v; want %q", src, ok, target)
	}
	for _, p := range []string{filepath.Join(dir, "dangling"), dir} {
		if src, ok := resolvedFile(p); ok {
			t.Errorf("resolvedFile(%s) = %q, want none", p, src)
		}
	}
}

func TestJailSetupFailure(t *testing.T) {
	requireRoot(t)
	cmd, err := Command(Spec{Path: "/bin/true", Args: []string{"true"}, Dir: "/", Root: t.TempDir(),
		Binds: []Bind{{Path: "/nonexistent-firkin-path"}}})
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err = cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != ExitSetup {
		t.Fatalf("exit = %v, want status %d", err, ExitSetup)
	}
	if s := stderr.String(); !strings.HasPrefix(s, "firkin-jail: bind /nonexistent-firkin-path: ") || strings.Count(s, "\n") != 1 {
		t.Fatalf("stderr %q: want one line naming the failed bind", s)
	}
}

func TestSpecValidate(t *testing.T) {
	for _, s := range []Spec{
		{Path: "sh", Args: []string{"sh"}, Dir: "/", Root: "/r"},
		{Path: "/bin/sh", Dir: "/", Root: "/r"},
		{Path: "/bin/sh", Args: []string{"sh"}, Dir: "/a/../b", Root: "/r"},
		{Path: "/bin/sh", Args: []string{"sh"}, Dir: "/", Root: "/r", Binds: []Bind{{Path: "/"}}},
		{Path: "/bin/sh", Args: []string{"sh"}, Dir: "/", Root: "/r", UID: 5},
	} {
		if err := s.Validate(); err == nil {
			t.Errorf("Validate(%+v) = nil, want an error", s)
		}
	}
}

func TestProbe(t *testing.T) {
	requireRoot(t)
	t0 := time.Now()
	if err := Probe(t.TempDir(), RangeBase, RangeBase); err != nil {
		t.Fatalf("Probe: %v", err)
	}
	t.Logf("probe: %v", time.Since(t0))
	if err := Probe("relative", 0, 0); err == nil {
		t.Fatal("Probe with a bad root succeeded")
	}
}

// The fds in Spec.ExtraFiles reach the program as 3, 4, …; nothing else
// does.
func TestJailPassesExtraFiles(t *testing.T) {
	requireRoot(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	// An fd of the parent without close-on-exec: inherited by the jail
	// process, it must not reach the program.
	leak, err := os.Open("/dev/null")
	if err != nil {
		t.Fatal(err)
	}
	defer leak.Close()
	if _, err := unix.FcntlInt(leak.Fd(), unix.F_SETFD, 0); err != nil {
		t.Fatal(err)
	}
	cmd, err := Command(Spec{Path: "/bin/sh", Args: []string{"sh", "-c", `echo via3 >&3; exec 3>&-; ls /proc/self/fd | tr '\n' ' '`},
		Dir: "/", Root: t.TempDir(), ExtraFiles: []*os.File{w}})
	if err != nil {
		t.Fatal(err)
	}
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	err = cmd.Run()
	w.Close()
	if err != nil {
		t.Fatalf("jail: %v: %s", err, stderr.String())
	}
	got, _ := io.ReadAll(r)
	if string(got) != "via3\n" {
		t.Errorf("fd 3 carried %q", got)
	}
	// 0-2, and the directory ls reads (the lowest free fd: 3 once closed).
	if out.String() != "0 1 2 3 " {
		t.Errorf("fds in the jail: %q, want stdio and ls's own", out.String())
	}
}

// A jail started with DieWithParent gets SIGKILL when its parent dies,
// although its uid changed (which clears the parent-death signal).
func TestJailDiesWithParent(t *testing.T) {
	requireRoot(t)
	parent := exec.Command("/proc/self/exe", "-test.run=^$")
	parent.Env = append(os.Environ(), "JAIL_TEST_PARENT="+t.TempDir())
	out, err := parent.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := parent.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { parent.Process.Kill(); parent.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	pid, perr := strconv.Atoi(strings.TrimSpace(line))
	if err != nil || perr != nil {
		t.Fatalf("parent said %q (%v)", line, err)
	}
	// The jail has exec'd sleep as the machine uid once /proc shows it so.
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if strings.Contains(string(b), "Uid:\t"+strconv.Itoa(RangeBase+1)) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("jail %d never ran sleep as its uid: %s", pid, b)
		}
		time.Sleep(10 * time.Millisecond)
	}
	parent.Process.Kill()
	parent.Wait()
	deadline = time.Now().Add(10 * time.Second)
	for {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil || strings.Contains(string(b), ") Z ") {
			return // gone (or a zombie waiting for init)
		}
		if time.Now().After(deadline) {
			syscall.Kill(pid, syscall.SIGKILL)
			t.Fatalf("jail %d outlived its parent", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
