package worker_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/worker"
)

// poolEntry is template's entry of the worker's pool status.
func (e *env) poolEntry(template string) subjects.PoolTemplateStatus {
	e.t.Helper()
	st, err := e.c.PoolStatus(e.ctx(10 * time.Second))
	if err != nil {
		e.t.Fatalf("pool.status: %v", err)
	}
	for _, p := range st.Templates {
		if p.TemplateID == template {
			return p
		}
	}
	return subjects.PoolTemplateStatus{TemplateID: template}
}

// TestWarmFillGuestNeverAnswers: a template whose real guest restores and
// answers the agent handshake but never finishes the fill's warm-up command
// (its /etc/profile sleeps in every login shell once armed). The fill's
// deadline stops that machine and counts it (pool.status fill_timeouts),
// while the fill of another template and a create of it go on meanwhile.
func TestWarmFillGuestNeverAnswers(t *testing.T) {
	const fillTimeout = 10 * time.Second
	e := startWorker(t, func(c *worker.Config) { c.FillTimeout = fillTimeout })
	// Armed by the ready command, after the build's last login shell read
	// the profile: the template's snapshot has it armed, the build did not
	// hang.
	_, err := e.c.BuildTemplate(e.ctx(3*time.Minute), subjects.BuildTemplateRequest{
		TemplateID: "mute",
		Steps:      []string{`printf '[ -e /etc/firkin-mute ] && exec sleep 100000\n' >>/etc/profile`},
		ReadyCmd:   "touch /etc/firkin-mute",
	})
	if err != nil {
		t.Fatalf("build the mute template: %v", err)
	}
	if _, err := e.c.SetPool(e.ctx(10*time.Second), "mute", 1); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "the mute template's fill started", func() error {
		if p := e.poolEntry("mute"); p.InProgress != 1 {
			return fmt.Errorf("%+v", p)
		}
		return nil
	})
	muteStarted := time.Now()
	if _, err := e.c.SetPool(e.ctx(10*time.Second), "tiny", 1); err != nil {
		t.Fatal(err)
	}
	// Meanwhile: tiny's fill completes and a create of tiny answers, both
	// before the mute fill's deadline.
	sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
	if out := e.exec(sb.SandboxID, "echo meanwhile"); out.Stdout != "meanwhile\n" {
		t.Fatalf("exec in a tiny sandbox during the mute fill: %+v", out)
	}
	created := time.Since(muteStarted)
	var tinyReady time.Duration
	eventually(t, 2*fillTimeout, "tiny's pool filled", func() error {
		if p := e.poolEntry("tiny"); p.Ready < 1 {
			return fmt.Errorf("%+v", p)
		}
		tinyReady = time.Since(muteStarted)
		return nil
	})
	if m := e.poolEntry("mute"); m.FillTimeouts != 0 || m.Ready != 0 {
		t.Fatalf("mute %+v when tiny was ready, want its first fill still running", m)
	}
	t.Logf("during the hung fill: a tiny create and exec answered %s, tiny's pool filled %s after the mute fill started",
		created.Round(time.Millisecond), tinyReady.Round(time.Millisecond))

	var mute subjects.PoolTemplateStatus
	eventually(t, 3*fillTimeout, "the mute fill timed out", func() error {
		if mute = e.poolEntry("mute"); mute.FillTimeouts < 1 {
			return fmt.Errorf("%+v", mute)
		}
		return nil
	})
	counted := time.Since(muteStarted)
	if _, err := e.c.SetPool(e.ctx(10*time.Second), "mute", 0); err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`fill timed out after ([0-9.]+m?s)`).FindStringSubmatch(mute.LastError)
	if m == nil {
		t.Fatalf("mute last_error %q, want the fill's timeout", mute.LastError)
	}
	took, err := time.ParseDuration(m[1])
	if err != nil {
		t.Fatal(err)
	}
	// took is the fill's time with its machine stopped: the deadline, then
	// the kill of the warm-up command and the stop.
	t.Logf("mute fill: %s until stopped and counted (deadline %s, %s from deadline to stopped); counted %s after it started; last_error %q",
		took, fillTimeout, (took - fillTimeout).Round(time.Millisecond), counted.Round(time.Millisecond), mute.LastError)
	if took < fillTimeout || took > fillTimeout+10*time.Second {
		t.Errorf("mute fill took %s, want its deadline %s plus at most 10 s to stop the machine", took, fillTimeout)
	}

	// The mute machines (the counted one, and a refill started before the
	// target went to 0) end; tiny's warm machine and the sandbox remain.
	if err := e.c.Kill(e.ctx(time.Minute), sb.SandboxID); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*fillTimeout+30*time.Second, "only tiny's warm machine left", func() error {
		if p := e.poolEntry("mute"); p.InProgress != 0 || p.Ready != 0 {
			return fmt.Errorf("mute %+v", p)
		}
		if u := e.w.Backend().Usage(); u.Sandboxes != 0 || u.Warm != 1 {
			return fmt.Errorf("admission %+v", u)
		}
		if p := qemuProcesses(filepath.Join(e.state, "sandboxes")); len(p) != 1 {
			return fmt.Errorf("QEMU processes: %q", p)
		}
		entries, _ := os.ReadDir(filepath.Join(e.state, "sandboxes"))
		if len(entries) != 1 {
			return fmt.Errorf("machine dirs: %v", entries)
		}
		return nil
	})
}

// TestWorkerKilledDuringSave: the worker process is killed with SIGKILL
// while it saves a snapshot (its state file being written). After the
// restart the half-written snapshot directory is swept and logged, the
// snapshot id is absent (or whole: never a record naming missing files),
// the source sandbox is reattached (its paused machine continued) with its
// disk intact and can be saved again, and a clean stop leaves no QEMU
// process, machine directory or nft table.
func TestWorkerKilledDuringSave(t *testing.T) {
	testenv.RequireQEMU(t, runtime.GOARCH)
	agentBin := testenv.AgentBinary(t, runtime.GOARCH)
	_ = testenv.Image(t, runtime.GOARCH) // the worker builds its own copy from the same cached inputs
	bin := workerBinary(t)
	state := t.TempDir()
	natsAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	args := []string{"--state-dir", state, "--nats-listen", natsAddr, "--proxy-listen", "127.0.0.1:0",
		"--agent", agentBin, "--accel", "tcg", "--pool", "tiny=0", "--keep-machines"}
	shareDebCache(t, state)
	first := startBinary(t, bin, args...)
	table := regexp.MustCompile(`"table":"(firkin_[A-Za-z0-9_]+)"`).FindStringSubmatch(first.log())
	if table == nil {
		t.Fatal("the worker logged no nft table")
	}
	nc, err := nats.Connect("nats://"+natsAddr, client.NkeyFile(filepath.Join(state, "client.nk")),
		nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	c := client.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	sb, err := c.Create(ctx, subjects.CreateSandboxRequest{TemplateID: "tiny"})
	if err != nil {
		t.Fatal(err)
	}
	// Memory the save must write: the kill lands while it is written.
	if _, err := c.Exec(ctx, sb.SandboxID, subjects.ExecRequest{Command: "echo survived > /root/mark; sync; head -c 48000000 /dev/urandom > /tmp/ballast"}); err != nil {
		t.Fatal(err)
	}

	saved := make(chan error, 1)
	go func() {
		// The worker's NATS server dies with it: the request ends by its
		// own deadline.
		sctx, scancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer scancel()
		_, err := c.Snapshot(sctx, sb.SandboxID, subjects.SnapshotRequest{Name: "crashsnap"})
		saved <- err
	}()
	snapshots := filepath.Join(state, "snapshots")
	var stateFile string
	var written int64
	deadline := time.Now().Add(time.Minute)
	for stateFile == "" {
		if time.Now().After(deadline) {
			t.Fatal("the save never started writing its state file")
		}
		if m, _ := filepath.Glob(filepath.Join(snapshots, "crashsnap.*", "state")); len(m) == 1 {
			if st, err := os.Stat(m[0]); err == nil && st.Size() > 0 {
				stateFile, written = m[0], st.Size()
				break
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
	_ = first.cmd.Process.Kill()
	<-first.done
	killedAt := time.Now()
	half := filepath.Dir(stateFile)
	st, _ := os.Stat(stateFile)
	t.Logf("worker killed with %d bytes of the state file written (%d a moment later); snapshot dir %s", written, st.Size(), filepath.Base(half))
	if len(qemuProcesses(filepath.Join(state, "sandboxes"))) != 1 {
		t.Fatalf("the sandbox's machine did not outlive the crash (--keep-machines): %q", qemuProcesses(state))
	}

	select {
	case err := <-saved:
		t.Logf("the snapshot request: %v", err) // an answer only if the save beat the kill
	case <-time.After(30 * time.Second):
		t.Fatal("the snapshot request never ended")
	}
	restart := time.Now()
	second := startBinary(t, bin, args...)
	t.Logf("restarted in %s (%s after the kill); the source's machine was paused and continued: %v", time.Since(restart).Round(time.Millisecond),
		time.Since(killedAt).Round(time.Millisecond), strings.Contains(second.log(), "machine was paused; continuing it"))
	// The id is absent and its directory swept, or (the save finished
	// before the kill landed) whole.
	if rec, err := c.GetSnapshot(ctx, "crashsnap"); err == nil {
		t.Logf("the save was recorded before the kill (generation %s): checking it is whole", rec.Generation)
		for _, a := range rec.Artifacts {
			fi, err := os.Stat(filepath.Join(state, "snapshots", "crashsnap."+rec.Generation, a.Name))
			if err != nil || fi.Size() != a.SizeBytes {
				t.Errorf("snapshot record names %s (%d bytes): %v", a.Name, a.SizeBytes, err)
			}
		}
		if err := c.DeleteSnapshot(ctx, "crashsnap"); err != nil {
			t.Fatal(err)
		}
	} else if subjects.CodeOf(err) != subjects.CodeSnapshotNotFound {
		t.Fatalf("get snapshot: %v", err)
	} else {
		if _, err := os.Stat(half); !os.IsNotExist(err) {
			t.Errorf("the half-written snapshot dir is still there: %v", err)
		}
		if !strings.Contains(second.log(), "removed a snapshot directory without a record") || !strings.Contains(second.log(), filepath.Base(half)) {
			t.Errorf("the restarted worker did not log the sweep of %s", filepath.Base(half))
		}
	}
	// The source was reattached: its paused machine continued, its disk
	// as before, and it saves and restores again.
	r, err := c.Exec(ctx, sb.SandboxID, subjects.ExecRequest{Command: "cat /root/mark; ls -l /tmp/ballast | wc -l"})
	if err != nil || r.Stdout != "survived\n1\n" {
		t.Fatalf("exec in the source sandbox after the restart: %+v %v", r, err)
	}
	if _, err := c.Snapshot(ctx, sb.SandboxID, subjects.SnapshotRequest{Name: "crashsnap"}); err != nil {
		t.Fatalf("save the source again after the restart: %v", err)
	}
	again, err := c.Create(ctx, subjects.CreateSandboxRequest{SnapshotID: "crashsnap"})
	if err != nil {
		t.Fatalf("restore the new save: %v", err)
	}
	if r, err := c.Exec(ctx, again.SandboxID, subjects.ExecRequest{Command: "cat /root/mark"}); err != nil || r.Stdout != "survived\n" {
		t.Fatalf("exec in the restored sandbox: %+v %v", r, err)
	}
	for _, id := range []string{again.SandboxID, sb.SandboxID} {
		if err := c.Kill(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.DeleteSnapshot(ctx, "crashsnap"); err != nil {
		t.Fatal(err)
	}
	_ = second.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-second.done:
	case <-time.After(90 * time.Second):
		t.Fatal("the worker did not stop")
	}
	if p := qemuProcesses(state); len(p) != 0 {
		t.Errorf("QEMU processes left: %q", p)
	}
	if entries, _ := os.ReadDir(filepath.Join(state, "sandboxes")); len(entries) != 0 {
		t.Errorf("machine dirs left: %v", entries)
	}
	if m, _ := filepath.Glob(filepath.Join(snapshots, "crashsnap.*")); len(m) != 0 {
		t.Errorf("snapshot dirs left: %v", m)
	}
	if out, err := exec.Command("nft", "list", "table", "inet", table[1]).CombinedOutput(); err == nil {
		t.Errorf("nft table %s left after the stop:\n%s", table[1], out)
	}
}

// mountTmpfs mounts a tmpfs of size bytes on a new directory and unmounts
// it when the test ends (after the cleanups registered later, such as the
// worker's stop).
func mountTmpfs(t *testing.T, size uint64) string {
	t.Helper()
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", fmt.Sprintf("size=%d,mode=0700", size), "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a tmpfs (needs root): %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
	return dir
}

// resizeTmpfs gives the tmpfs at dir room for free more bytes than it
// holds now, and returns the free bytes statfs then reports.
func resizeTmpfs(t *testing.T, dir string, free uint64) uint64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	used := (st.Blocks - st.Bfree) * uint64(st.Bsize)
	if out, err := exec.Command("mount", "-o", fmt.Sprintf("remount,size=%d", used+free), dir).CombinedOutput(); err != nil {
		t.Fatalf("resize the tmpfs: %v: %s", err, out)
	}
	return freeBytes(t, dir)
}

func freeBytes(t *testing.T, dir string) uint64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return st.Bavail * uint64(st.Bsize)
}

// TestDiskPressureDuringSaveAndRestore: the worker's state directory is a
// file system the test fills. A save that runs out of space while QEMU
// writes the state file, a save and a restore below the free-space floor
// the test sets: each answers disk_pressure through NATS, the source
// sandbox keeps running, and no snapshot or machine directory is left
// half-written. With room again, the same restore works.
func TestDiskPressureDuringSaveAndRestore(t *testing.T) {
	const floor = 8 << 20
	state := mountTmpfs(t, 4<<30)
	// The embedded NATS server's store lives elsewhere (as an external
	// server's would): a full state directory must not take JetStream down.
	if err := os.Symlink(t.TempDir(), filepath.Join(state, "nats")); err != nil {
		t.Fatal(err)
	}
	e := startWorker(t, func(c *worker.Config) { c.StateDir, c.MinFreeDiskBytes = state, floor })
	sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
	// Nothing of the guest's left to write back: a full disk during the
	// test would otherwise pause the guest on its next disk write.
	e.exec(sb.SandboxID, "echo alive > /root/mark; sync")
	if _, err := e.c.Snapshot(e.ctx(time.Minute), sb.SandboxID, subjects.SnapshotRequest{Name: "roomy"}); err != nil {
		t.Fatalf("save with room: %v", err)
	}
	snapshotDirs := func() []string {
		m, _ := filepath.Glob(filepath.Join(state, "snapshots", "*"))
		return m
	}
	machineDirs := func() []string {
		m, _ := filepath.Glob(filepath.Join(state, "sandboxes", "*"))
		return m
	}
	dirsBefore, machinesBefore := snapshotDirs(), machineDirs()
	sourceRuns := func(what string) {
		t.Helper()
		r, err := e.c.Exec(e.ctx(time.Minute), sb.SandboxID, subjects.ExecRequest{Command: "cat /root/mark"})
		if err != nil || r.Stdout != "alive\n" {
			t.Fatalf("source sandbox after %s: %+v %v", what, r, err)
		}
		if d := snapshotDirs(); len(d) != len(dirsBefore) {
			t.Errorf("after %s: snapshot dirs %v, want %v", what, d, dirsBefore)
		}
		if d := machineDirs(); len(d) != len(machinesBefore) {
			t.Errorf("after %s: machine dirs %v, want %v", what, d, machinesBefore)
		}
	}

	// 1. Room above the floor, not for the state file: QEMU's write fails.
	free := resizeTmpfs(t, state, floor+1<<20)
	t0 := time.Now()
	_, err := e.c.Snapshot(e.ctx(time.Minute), sb.SandboxID, subjects.SnapshotRequest{Name: "full"})
	wantCode(t, "save that fills the disk", err, subjects.CodeDiskPressure)
	t.Logf("save with %d KiB free (floor %d KiB): %v after %s", free>>10, floor>>10, err, time.Since(t0).Round(time.Millisecond))
	if after := freeBytes(t, state); after+256<<10 < free {
		t.Errorf("%d KiB free after the failed save, %d KiB before: something was left", after>>10, free>>10)
	}
	sourceRuns("the save that filled the disk")
	_, err = e.c.Snapshot(e.ctx(time.Minute), sb.SandboxID, subjects.SnapshotRequest{Name: "full", Stop: true})
	wantCode(t, `a "stop": true save that fills the disk`, err, subjects.CodeDiskPressure)
	sourceRuns(`the "stop": true save that filled the disk`)
	if _, err := e.c.GetSnapshot(e.ctx(10*time.Second), "full"); subjects.CodeOf(err) != subjects.CodeSnapshotNotFound {
		t.Errorf("snapshot of the failed save: %v, want snapshot_not_found", err)
	}

	// 2. Below the floor: refused before anything is written.
	free = resizeTmpfs(t, state, floor/2)
	_, err = e.c.Snapshot(e.ctx(time.Minute), sb.SandboxID, subjects.SnapshotRequest{Name: "full"})
	wantCode(t, "save below the floor", err, subjects.CodeDiskPressure)
	_, err = e.c.Create(e.ctx(time.Minute), subjects.CreateSandboxRequest{SnapshotID: "roomy"})
	wantCode(t, "restore below the floor", err, subjects.CodeDiskPressure)
	t.Logf("restore with %d KiB free: %v", free>>10, err)
	sourceRuns("a save and a restore below the floor")

	// 3. Room again: the same restore works.
	resizeTmpfs(t, state, 2<<30)
	restored := e.create(subjects.CreateSandboxRequest{SnapshotID: "roomy"})
	if out := e.exec(restored.SandboxID, "cat /root/mark"); out.Stdout != "alive\n" {
		t.Fatalf("restored sandbox: %+v", out)
	}
}

// TestNATSServerRestartedUnderLoad: an exec prints 1 KiB lines at a steady
// rate while the external nats-server the worker uses is shut down and
// started again. Output of the outage waits, bounded (the log publisher's
// window of unacknowledged events, then the guest's stream), and is in
// FIRKIN_LOGS after the reconnect; whatever is not is counted in the
// reply's logs_dropped_bytes and a system log event: never lost in
// silence.
func TestNATSServerRestartedUnderLoad(t *testing.T) {
	addr, start := restartableNATS(t)
	srv := start()
	t.Cleanup(func() { srv.Shutdown() })
	e := startWorker(t, func(c *worker.Config) { c.NATSURL = "nats://" + addr })
	// Not during the template's upload (see TestNATSServerRestarted).
	eventually(t, 2*time.Minute, "the template uploaded", func() error {
		if !strings.Contains(e.logs.String(), "snapshot artifacts uploaded") {
			return errors.New("not yet")
		}
		return nil
	})
	nc, err := nats.Connect("nats://"+addr, nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	c := client.New(nc)
	sb, err := c.Create(e.ctx(3*time.Minute), subjects.CreateSandboxRequest{TemplateID: "tiny", TimeoutS: 600})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Kill(context.Background(), sb.SandboxID) })

	// A short outage: held and stored afterwards. One longer than the log
	// window's stall (10 s): the held output is stored afterwards, what
	// comes after the stall is dropped and counted.
	for _, tc := range []struct {
		outage time.Duration
		lines  int  // 20 a second
		drops  bool // the stall must have dropped output
	}{{1500 * time.Millisecond, 100, false}, {11 * time.Second, 300, true}} {
		t.Run(tc.outage.String(), func(t *testing.T) {
			restart := func() {
				srv.Shutdown()
				time.Sleep(tc.outage)
				srv = start()
			}
			if dropped := outageUnderLoad(t, e, c, sb.SandboxID, tc.lines, restart); tc.drops && dropped == 0 {
				t.Errorf("nothing dropped in an outage of %s, longer than the log window's stall", tc.outage)
			}
		})
	}
}

// outageUnderLoad runs an exec printing numbered 1 KiB lines, 20 a
// second, calls restart (the NATS server's outage) once some are stored,
// and checks that every line missing from the log stream is counted. It
// returns the reply's logs_dropped_bytes.
func outageUnderLoad(t *testing.T, e *env, c *client.Client, id string, lines int, restart func()) int64 {
	type result struct {
		r   subjects.ExecReply
		err error
	}
	done := make(chan result, 1)
	go func() {
		r, err := c.Exec(e.ctx(2*time.Minute), id, subjects.ExecRequest{Command: fmt.Sprintf(
			`pad=$(head -c 1000 /dev/zero | tr '\0' x); i=0; while [ $i -lt %d ]; do echo "line-$i $pad"; i=$((i+1)); sleep 0.05; done`, lines)})
		done <- result{r, err}
	}()
	// Some output of this command stored, then the outage.
	started := time.Now()
	eventually(t, time.Minute, "output in the log stream", func() error {
		page, err := c.Logs(e.ctx(10*time.Second), id, subjects.LogsRequest{Limit: 1000})
		if err != nil {
			return err
		}
		for _, ev := range page.Events {
			if at, err := time.Parse(time.RFC3339Nano, ev.Timestamp); err == nil && ev.Source == subjects.SourceStdout && at.After(started) {
				return nil
			}
		}
		return errors.New("none yet")
	})
	down := time.Now()
	restart()
	up := time.Now()

	var res result
	select {
	case res = <-done:
	case <-time.After(90 * time.Second):
		t.Fatal("no exec reply after the restart")
	}
	if res.err != nil || res.r.ExitCode != 0 {
		t.Fatalf("exec across the restart: %+v %v", res.r, res.err)
	}
	// Everything the command printed, as the log stream has it.
	var out strings.Builder
	var outage, system int
	var events []subjects.LogEvent
	cursor := uint64(0)
	for range 100 {
		page, err := c.Logs(e.ctx(10*time.Second), id, subjects.LogsRequest{Cursor: cursor, Limit: 200})
		if err != nil {
			t.Fatal(err)
		}
		events = append(events, page.Events...)
		if len(page.Events) == 0 || page.NextCursor == cursor {
			break
		}
		cursor = page.NextCursor
	}
	for _, ev := range events {
		if ev.CommandID != res.r.CommandID {
			continue
		}
		switch ev.Source {
		case subjects.SourceStdout:
			out.WriteString(ev.Message)
			if at, err := time.Parse(time.RFC3339Nano, ev.Timestamp); err == nil && at.After(down) && at.Before(up) {
				outage += len(ev.Message)
			}
		case subjects.SourceSystem:
			system++
			t.Logf("system log event: %s", ev.Message)
		}
	}
	got := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	seen := map[string]int{}
	for _, l := range got {
		seen[strings.Fields(l + " ")[0]]++
	}
	missing := 0
	for i := range lines {
		switch seen[fmt.Sprintf("line-%d", i)] {
		case 0:
			missing += len(fmt.Sprintf("line-%d ", i)) + 1000 + 1
		case 1:
		default:
			t.Errorf("line-%d is %d times in the log stream", i, seen[fmt.Sprintf("line-%d", i)])
		}
	}
	t.Logf("outage %s; exec took %d ms (%d ms of output); %d bytes of output reached the worker during the outage and were stored after the reconnect; %d of %d lines stored, %d bytes missing, logs_dropped_bytes %d, %d system events",
		up.Sub(down).Round(time.Millisecond), res.r.DurationMS, lines*50, outage, lines-missing/1008, lines, missing, res.r.LogsDroppedBytes, system)
	// When the worker's connections were back (each reconnects with its
	// own backoff, up to 10 s apart).
	for _, l := range strings.Split(e.logs.String(), "\n") {
		if !strings.Contains(l, `msg="reconnected to NATS"`) || !strings.HasPrefix(l, "time=") {
			continue
		}
		if at, err := time.Parse(time.RFC3339Nano, strings.Fields(l)[0][len("time="):]); err == nil && at.After(down) {
			t.Logf("%s after the server was back: %s", (at.Sub(up)).Round(time.Millisecond), l[strings.Index(l, "connection="):])
		}
	}
	if int64(missing) > res.r.LogsDroppedBytes {
		t.Errorf("%d bytes of output missing from the log stream but only %d counted as dropped: lost in silence", missing, res.r.LogsDroppedBytes)
	}
	if res.r.LogsDroppedBytes > 0 && system == 0 {
		t.Error("output dropped without a system log event saying so")
	}
	if outage == 0 {
		t.Error("no output reached the worker during the outage: the test did not test buffering")
	}
	return res.r.LogsDroppedBytes
}
