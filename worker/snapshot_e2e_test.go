package worker_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/worker"
)

// withPool sets warm pool targets and waits for templates before returning.
func withPool(targets map[string]int) envOption {
	return func(c *worker.Config) {
		c.Pool = targets
		c.WaitTemplates = true
	}
}

func waitTemplates() envOption { return func(c *worker.Config) { c.WaitTemplates = true } }

// TestSnapshotSoakLoop is the seed's soak loop through NATS: a file written
// before the snapshot is in the restored sandbox, one written after is not.
func TestSnapshotSoakLoop(t *testing.T) {
	e := startWorker(t, waitTemplates())
	src := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
	if src.Source != subjects.SourceRestore {
		t.Errorf("create with a template snapshot and no pool: source %q, want restore", src.Source)
	}
	e.exec(src.SandboxID, "echo before > /tmp/marker; echo disk-before > /root/disk-marker; sync")
	rec, err := e.c.Snapshot(e.ctx(2*time.Minute), src.SandboxID, subjects.SnapshotRequest{Name: "soak-1"})
	if err != nil {
		t.Fatal(err)
	}
	if rec.SnapshotID != "soak-1" || rec.Kind != subjects.KindContinuation || rec.SizeBytes <= 0 || len(rec.SHA256) != 64 ||
		rec.WorkerID != e.w.ID() || rec.Driver != "qemu" || rec.SourceSandboxID != src.SandboxID || rec.CreatedAt.IsZero() {
		t.Fatalf("snapshot record = %+v", rec)
	}
	// The record is in the KV bucket as it was returned.
	js, _ := jetstream.New(e.nc)
	kv, err := js.KeyValue(e.ctx(10*time.Second), "firkin_snapshots")
	if err != nil {
		t.Fatal(err)
	}
	entry, err := kv.Get(e.ctx(10*time.Second), "soak-1")
	if err != nil {
		t.Fatal(err)
	}
	var stored subjects.SnapshotRecord
	if err := json.Unmarshal(entry.Value(), &stored); err != nil || stored.SHA256 != rec.SHA256 || stored.Location != rec.Location {
		t.Fatalf("KV record = %+v, %v", stored, err)
	}
	// The source keeps running; what it writes now is not in the snapshot.
	e.exec(src.SandboxID, "echo after > /tmp/marker; echo disk-after > /root/disk-marker; echo new > /root/late; sync")
	if _, err := e.c.Snapshot(e.ctx(time.Minute), src.SandboxID, subjects.SnapshotRequest{Name: "soak-1"}); subjects.CodeOf(err) != subjects.CodeConflict {
		t.Errorf("taken name: %v, want conflict", err)
	}
	if err := e.c.Kill(e.ctx(time.Minute), src.SandboxID); err != nil {
		t.Fatal(err)
	}
	clone := e.create(subjects.CreateSandboxRequest{SnapshotID: "soak-1"})
	if clone.Source != subjects.SourceRestore {
		t.Errorf("source %q, want restore", clone.Source)
	}
	r := e.exec(clone.SandboxID, "cat /tmp/marker /root/disk-marker; test -e /root/late && echo LATE; hostname")
	if want := "before\ndisk-before\n" + clone.SandboxID + "\n"; r.Stdout != want {
		t.Fatalf("restored sandbox sees %q, want %q", r.Stdout, want)
	}
	// The clone's clock was set from the host's after the restore.
	r = e.exec(clone.SandboxID, "date +%s")
	var guest int64
	fmt.Sscan(r.Stdout, &guest)
	if d := time.Now().Unix() - guest; d < -5 || d > 5 {
		t.Errorf("guest clock off by %ds after restore", d)
	}
	// A snapshot a live sandbox sits on cannot be deleted.
	if err := e.c.DeleteSnapshot(e.ctx(10*time.Second), "soak-1"); subjects.CodeOf(err) != subjects.CodeConflict {
		t.Errorf("delete snapshot in use: %v, want conflict", err)
	}
	if err := e.c.Kill(e.ctx(time.Minute), clone.SandboxID); err != nil {
		t.Fatal(err)
	}
	if err := e.c.DeleteSnapshot(e.ctx(10*time.Second), "soak-1"); err != nil {
		t.Fatalf("delete unused snapshot: %v", err)
	}
	if _, err := os.Stat(rec.Location); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("snapshot files left after delete: %v", err)
	}
	if _, err := e.c.GetSnapshot(e.ctx(10*time.Second), "soak-1"); subjects.CodeOf(err) != subjects.CodeSnapshotNotFound {
		t.Errorf("get deleted snapshot: %v", err)
	}
}

// TestClonesAreIndependent restores two sandboxes from one snapshot: neither
// sees the other's writes, on disk or in memory.
func TestClonesAreIndependent(t *testing.T) {
	e := startWorker(t, waitTemplates())
	a := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
	b := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
	e.exec(a.SandboxID, "echo a > /root/who; echo a > /tmp/who; sync")
	e.exec(b.SandboxID, "echo b > /root/who; echo b > /tmp/who; sync")
	for _, sb := range []subjects.Sandbox{a, b} {
		want := map[string]string{a.SandboxID: "a\na\n", b.SandboxID: "b\nb\n"}[sb.SandboxID]
		if r := e.exec(sb.SandboxID, "cat /root/who /tmp/who"); r.Stdout != want {
			t.Errorf("%s sees %q, want %q", sb.SandboxID, r.Stdout, want)
		}
	}
	// Entropy was reseeded: the two clones draw different random numbers.
	ra := e.exec(a.SandboxID, "head -c 16 /dev/urandom | od -An -tx1")
	rb := e.exec(b.SandboxID, "head -c 16 /dev/urandom | od -An -tx1")
	if ra.Stdout == rb.Stdout {
		t.Errorf("clones drew the same random bytes %q", ra.Stdout)
	}
}

// TestContinuationWhileWriting snapshots a sandbox whose source keeps writing
// and restores a consistent file system.
func TestContinuationWhileWriting(t *testing.T) {
	e := startWorker(t, waitTemplates())
	src := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
	e.exec(src.SandboxID, `cat > /root/writer.sh <<'EOF'
i=0
while true; do i=$((i+1)); echo $i > /root/counter.tmp; mv /root/counter.tmp /root/counter; echo $i >> /root/log; done
EOF`)
	r, err := e.c.Exec(e.ctx(time.Minute), src.SandboxID, subjects.ExecRequest{Command: "sh /root/writer.sh >/dev/null 2>&1 & echo $! > /root/writer.pid; echo started"})
	if err != nil || r.Stdout != "started\n" {
		t.Fatalf("start writer: %+v %v", r, err)
	}
	eventually(t, 20*time.Second, "writer running", func() error {
		if r := e.exec(src.SandboxID, "cat /root/counter"); strings.TrimSpace(r.Stdout) == "" {
			return errors.New("no counter yet")
		}
		return nil
	})
	for i := range 2 {
		name := fmt.Sprintf("busy-%d", i)
		if _, err := e.c.Snapshot(e.ctx(2*time.Minute), src.SandboxID, subjects.SnapshotRequest{Name: name}); err != nil {
			t.Fatal(err)
		}
		clone := e.create(subjects.CreateSandboxRequest{SnapshotID: name})
		// The writer goes on in the clone (its memory came along); stop it
		// and check that the counter and the log agree: the writer renames
		// the counter into place, then appends to the log, so the counter is
		// the log's last line or one ahead, and the log has no gap.
		r := e.exec(clone.SandboxID, "p=$(cat /root/writer.pid); kill $p; while kill -0 $p 2>/dev/null; do sleep 0.05; done; c=$(cat /root/counter); l=$(tail -n1 /root/log); n=$(wc -l < /root/log); echo $c $l $n")
		var c, l, n int
		if _, err := fmt.Sscan(r.Stdout, &c, &l, &n); err != nil || c <= 0 || (c != l && c != l+1) || n != l {
			dump := e.exec(clone.SandboxID, "tr '\\n' ' ' < /root/log; ps")
			t.Fatalf("clone of %s: counter/log inconsistent: %q (%v)\nlog: %s", name, r.Stdout, err, dump.Stdout)
		}
		if err := e.c.Kill(e.ctx(time.Minute), clone.SandboxID); err != nil {
			t.Fatal(err)
		}
	}
	// The source is still alive and writing.
	r1 := e.exec(src.SandboxID, "cat /root/counter")
	eventually(t, 10*time.Second, "source keeps writing", func() error {
		if r2 := e.exec(src.SandboxID, "cat /root/counter"); r2.Stdout == r1.Stdout {
			return errors.New("counter did not move")
		}
		return nil
	})
}

// TestWarmPool serves creates from the pool, refills it, never hands out a
// machine whose agent does not answer, and drains on pool.set 0.
func TestWarmPool(t *testing.T) {
	e := startWorker(t, withPool(map[string]int{"tiny": 2}))
	poolReady := func(want int) func() error {
		return func() error {
			st, err := e.c.PoolStatus(e.ctx(5 * time.Second))
			if err != nil {
				return err
			}
			for _, tpl := range st.Templates {
				if tpl.TemplateID == "tiny" && tpl.Ready == want && tpl.InProgress == 0 {
					return nil
				}
			}
			return fmt.Errorf("pool status %+v, want %d ready", st, want)
		}
	}
	eventually(t, 2*time.Minute, "pool filled", poolReady(2))
	sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
	if sb.Source != subjects.SourcePool {
		t.Fatalf("source %q, want pool", sb.Source)
	}
	if r := e.exec(sb.SandboxID, "hostname"); r.Stdout != sb.SandboxID+"\n" {
		t.Errorf("pooled sandbox hostname %q, want its id", r.Stdout)
	}
	eventually(t, 2*time.Minute, "pool refilled", poolReady(2))

	// Warm machines run with a tenth of the CPU share of the ones in use,
	// so their fills do not slow the commands of handed-out machines.
	if w, ok := cpuWeightOf(t, filepath.Base(sb.Dir)); ok && w != 100 {
		t.Errorf("taken machine's CPU weight %d, want 100", w)
	}
	for _, p := range qemuProcesses(filepath.Join(e.state, "sandboxes", "warm-")) {
		if strings.Contains(p, sb.Dir+"/") {
			continue
		}
		i := strings.Index(p, "/sandboxes/warm-")
		id := p[i+len("/sandboxes/") : i+len("/sandboxes/warm-")+12]
		if w, ok := cpuWeightOf(t, id); ok && w != 10 {
			t.Errorf("warm machine %s: CPU weight %d, want 10", id, w)
		}
	}

	// Freeze both warm machines: their agents cannot answer, so a create
	// must not get one of them.
	var warm []string
	for _, p := range qemuProcesses(filepath.Join(e.state, "sandboxes", "warm-")) {
		if !strings.Contains(p, sb.Dir+"/") {
			warm = append(warm, p)
		}
	}
	if len(warm) != 2 {
		t.Fatalf("want 2 warm QEMU processes, have %v", warm)
	}
	var frozenDirs []string
	for _, p := range warm {
		i := strings.Index(p, "/sandboxes/warm-")
		frozenDirs = append(frozenDirs, p[i:i+len("/sandboxes/warm-")+12])
		var pid int
		fmt.Sscan(strings.SplitN(p, ":", 2)[0], &pid)
		if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGCONT) })
	}
	sb2 := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
	for _, d := range frozenDirs {
		if strings.HasSuffix(sb2.Dir, d) {
			t.Fatalf("frozen warm machine %s reached a caller", d)
		}
	}
	if r := e.exec(sb2.SandboxID, "echo ok"); r.Stdout != "ok\n" {
		t.Fatalf("sandbox after discarded warm machines: %+v", r)
	}
	eventually(t, 2*time.Minute, "pool refilled after discarding", poolReady(2))

	if _, err := e.c.SetPool(e.ctx(10*time.Second), "tiny", 0); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "pool drained", poolReady(0))
	eventually(t, 30*time.Second, "warm machines stopped", func() error {
		var procs []string
		for _, p := range qemuProcesses(filepath.Join(e.state, "sandboxes", "warm-")) {
			if !strings.Contains(p, sb.Dir+"/") && !strings.Contains(p, sb2.Dir+"/") {
				procs = append(procs, p)
			}
		}
		if len(procs) > 0 {
			return fmt.Errorf("still running: %v", procs)
		}
		return nil
	})
}

// cpuWeightOf is the cpu.weight of machine id's cgroup (cgroup v1's
// cpu.shares counted as weight: 1024 is 100), found under /sys/fs/cgroup
// in a "firkin" group; false when the host gives machines no cgroup.
func cpuWeightOf(t *testing.T, id string) (int, bool) {
	t.Helper()
	var found string
	_ = filepath.WalkDir("/sys/fs/cgroup", func(p string, d os.DirEntry, err error) error {
		switch {
		case err != nil:
			return filepath.SkipDir
		case !d.IsDir():
			return nil
		case strings.Count(p, "/") > 10:
			return filepath.SkipDir
		}
		if d.Name() == id && strings.Contains(p, "/firkin/") {
			found = p
			return filepath.SkipAll
		}
		return nil
	})
	if found == "" {
		return 0, false
	}
	if b, err := os.ReadFile(filepath.Join(found, "cpu.weight")); err == nil {
		w, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		return w, true
	}
	b, err := os.ReadFile(filepath.Join(found, "cpu.shares"))
	if err != nil {
		return 0, false
	}
	shares, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return (shares*100 + 512) / 1024, true
}

// TestTemplateBuild builds a template whose ready command succeeds and one
// whose ready command never does.
func TestTemplateBuild(t *testing.T) {
	e := startWorker(t, waitTemplates())
	rec, err := e.c.BuildTemplate(e.ctx(5*time.Minute), subjects.BuildTemplateRequest{
		TemplateID: "web",
		Steps:      []string{"mkdir -p /srv && echo '<h1>hi</h1>' > /srv/index.html", "echo built > /root/built"},
		Envs:       map[string]string{"APP_MODE": "prod"},
		StartCmd:   "httpd -p 8000 -h /srv",
		ReadyCmd:   "wget -q -O- http://127.0.0.1:8000/ | grep -q hi",
	})
	if err != nil {
		t.Fatal(err)
	}
	if rec.Kind != subjects.KindTemplate || rec.TemplateMetadata.StartCmd == "" || rec.TemplateMetadata.Envs["APP_MODE"] != "prod" {
		t.Fatalf("template record = %+v", rec)
	}
	sb := e.create(subjects.CreateSandboxRequest{TemplateID: "web"})
	r := e.exec(sb.SandboxID, `cat /root/built; echo $APP_MODE; wget -q -O- http://127.0.0.1:8000/`)
	if r.Stdout != "built\nprod\n<h1>hi</h1>\n" {
		t.Fatalf("sandbox from template sees %q", r.Stdout)
	}
	// The build's progress is in the log stream under firkin.logs.build.web.
	js, _ := jetstream.New(e.nc)
	stream, err := js.Stream(e.ctx(10*time.Second), "FIRKIN_LOGS")
	if err != nil {
		t.Fatal(err)
	}
	last, err := stream.GetLastMsgForSubject(e.ctx(10*time.Second), "firkin.logs.build.web")
	if err != nil || !strings.Contains(string(last.Data), "template web ready") {
		t.Errorf("last build log event: %v, %v", last, err)
	}

	start := time.Now()
	_, err = e.c.BuildTemplate(e.ctx(5*time.Minute), subjects.BuildTemplateRequest{
		TemplateID: "never", ReadyCmd: "false", ReadyTimeoutS: 3,
	})
	wantCode(t, "ready command that never succeeds", err, subjects.CodeTemplateBuildFailed)
	if err != nil && !strings.Contains(err.Error(), "ready command") {
		t.Errorf("error does not say what failed: %v", err)
	}
	if d := time.Since(start); d > time.Minute {
		t.Errorf("failed build took %s", d)
	}
	_, err = e.c.BuildTemplate(e.ctx(5*time.Minute), subjects.BuildTemplateRequest{TemplateID: "broken", Steps: []string{"exit 7"}})
	wantCode(t, "failing step", err, subjects.CodeTemplateBuildFailed)
	if procs := qemuProcesses(filepath.Join(e.state, "sandboxes", "build-")); len(procs) != 0 {
		t.Errorf("build machines left running: %v", procs)
	}
}

// TestSnapshotIntegrity refuses to restore an artifact that no longer
// matches its record, and refuses records that were forged or edited in the
// KV bucket: they name no host path the worker uses and their errors leak no
// digest or path.
func TestSnapshotIntegrity(t *testing.T) {
	// A state directory the worker makes itself is 0700.
	e := startWorker(t, waitTemplates(), func(c *worker.Config) { c.StateDir = filepath.Join(c.StateDir, "state") })
	if st, err := os.Stat(e.state); err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("state dir: %v %v, want mode 0700", st.Mode(), err)
	}
	src := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
	rec, err := e.c.Snapshot(e.ctx(2*time.Minute), src.SandboxID, subjects.SnapshotRequest{Name: "tamper"})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(rec.MAC, "v1:") || rec.Generation == "" ||
		rec.Location != filepath.Join(e.state, "snapshots", "tamper."+rec.Generation) {
		t.Fatalf("record mac %q, generation %q, location %q", rec.MAC, rec.Generation, rec.Location)
	}
	if st, err := os.Stat(rec.Location); err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("snapshot dir: %v %v, want mode 0700", st.Mode(), err)
	}
	if st, err := os.Stat(filepath.Join(rec.Location, "snapshot.json")); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("snapshot.json: %v %v, want mode 0600", st.Mode(), err)
	}
	testForgedRecords(t, e, src, rec)

	var state string
	for _, a := range rec.Artifacts {
		if a.Name != "snapshot.json" && a.SizeBytes > 0 {
			state = filepath.Join(rec.Location, a.Name)
			break
		}
	}
	f, err := os.OpenFile(state, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	// Same size, one byte changed: only the sha256 can tell.
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, 100); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0xff
	if _, err := f.WriteAt(b, 100); err != nil {
		t.Fatal(err)
	}
	f.Close()
	_, err = e.c.Create(e.ctx(time.Minute), subjects.CreateSandboxRequest{SnapshotID: "tamper"})
	wantCode(t, "restore of a tampered snapshot", err, subjects.CodeInvalidRequest)
	if err != nil && !strings.Contains(err.Error(), "sha256") {
		t.Errorf("error does not name the check: %v", err)
	}
	wantNoLeak(t, "restore of a tampered snapshot", err, e.state)
	if err := os.Truncate(state, 10); err != nil {
		t.Fatal(err)
	}
	_, err = e.c.Create(context.Background(), subjects.CreateSandboxRequest{SnapshotID: "tamper"})
	if err == nil || !strings.Contains(err.Error(), "bytes") {
		t.Errorf("restore of a truncated snapshot: %v", err)
	}
}

var hexDigest = regexp.MustCompile(`[0-9a-fA-F]{64}`)

// wantNoLeak fails when err's message carries a sha256 digest or one of the
// paths.
func wantNoLeak(t *testing.T, what string, err error, paths ...string) {
	t.Helper()
	if err == nil {
		return
	}
	if hexDigest.MatchString(err.Error()) {
		t.Errorf("%s: error leaks a digest: %v", what, err)
	}
	for _, p := range paths {
		if strings.Contains(err.Error(), p) {
			t.Errorf("%s: error leaks path %s: %v", what, p, err)
		}
	}
}

// testForgedRecords writes snapshot records into the KV bucket as anyone with
// write access could, and checks the worker uses none of them.
func testForgedRecords(t *testing.T, e *env, src subjects.Sandbox, legit subjects.SnapshotRecord) {
	js, _ := jetstream.New(e.workerConn()) // KV writes need the worker's identity
	kv, err := js.KeyValue(e.ctx(10*time.Second), "firkin_snapshots")
	if err != nil {
		t.Fatal(err)
	}
	put := func(key string, rec subjects.SnapshotRecord) {
		t.Helper()
		data, err := json.Marshal(rec)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := kv.Put(e.ctx(10*time.Second), key, data); err != nil {
			t.Fatal(err)
		}
	}
	// A victim directory with a file whose digest the attacker wants to learn
	// (and then one the attacker already knows, so only the mac can tell).
	victim := t.TempDir()
	secret := []byte("victim secret\n")
	if err := os.WriteFile(filepath.Join(victim, "secret"), secret, 0o600); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(secret)
	victimIntact := func(what string) {
		t.Helper()
		if got, err := os.ReadFile(filepath.Join(victim, "secret")); err != nil || !bytes.Equal(got, secret) {
			t.Errorf("%s: victim file %q, %v", what, got, err)
		}
	}
	forged := subjects.SnapshotRecord{
		SnapshotID: "forged", Names: []string{"forged"}, Location: victim, Kind: subjects.KindContinuation,
		WorkerID: e.w.ID(), Driver: "qemu", Generation: "abcdef", Resources: legit.Resources,
		Artifacts: []subjects.Artifact{{Name: "secret", SizeBytes: int64(len(secret)), SHA256: strings.Repeat("0", 64)}},
		MAC:       "v1:" + strings.Repeat("0", 64),
	}
	put("forged", forged)
	_, err = e.c.Create(e.ctx(time.Minute), subjects.CreateSandboxRequest{SnapshotID: "forged"})
	wantCode(t, "restore of a forged record", err, subjects.CodeInvalidRequest)
	if err != nil && !strings.Contains(err.Error(), "failed authentication") {
		t.Errorf("restore of a forged record: %v, want an authentication failure", err)
	}
	wantNoLeak(t, "restore of a forged record", err, victim, e.state)
	_, err = e.c.GetSnapshot(e.ctx(10*time.Second), "forged")
	wantCode(t, "get of a forged record", err, subjects.CodeInvalidRequest)
	err = e.c.DeleteSnapshot(e.ctx(10*time.Second), "forged")
	wantCode(t, "delete of a forged record", err, subjects.CodeInvalidRequest)
	wantNoLeak(t, "delete of a forged record", err, victim, e.state)
	victimIntact("delete of a forged record")

	// The same with the right digest, the worker's own snapshot directory as
	// location, and no mac at all (a record from before records were signed).
	forged.SnapshotID, forged.Names, forged.MAC = "forged-old", []string{"forged-old"}, ""
	forged.Artifacts[0].SHA256 = hex.EncodeToString(sum[:])
	put("forged-old", forged)
	_, err = e.c.Create(e.ctx(time.Minute), subjects.CreateSandboxRequest{SnapshotID: "forged-old"})
	wantCode(t, "restore of an unsigned record", err, subjects.CodeInvalidRequest)
	if err != nil && !strings.Contains(err.Error(), "make the snapshot again") {
		t.Errorf("restore of an unsigned record: %v, want a hint to make it again", err)
	}
	wantNoLeak(t, "restore of an unsigned record", err, victim, e.state)
	// Deleting an unsigned record removes the record and touches no file.
	if err := e.c.DeleteSnapshot(e.ctx(10*time.Second), "forged-old"); err != nil {
		t.Errorf("delete of an unsigned record: %v", err)
	}
	victimIntact("delete of an unsigned record")
	if _, err := kv.Get(e.ctx(10*time.Second), "forged-old"); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Errorf("unsigned record still in the bucket: %v", err)
	}

	// A legitimate record edited (a bigger machine) or stored under another
	// key is refused too.
	edited := legit
	edited.Resources.MemoryMB *= 2
	put("tamper", edited)
	_, err = e.c.Create(e.ctx(time.Minute), subjects.CreateSandboxRequest{SnapshotID: "tamper"})
	wantCode(t, "restore of an edited record", err, subjects.CodeInvalidRequest)
	wantNoLeak(t, "restore of an edited record", err, e.state)
	put("tamper-copy", legit)
	_, err = e.c.GetSnapshot(e.ctx(10*time.Second), "tamper-copy")
	wantCode(t, "get of a record stored under another key", err, subjects.CodeInvalidRequest)
	if list, err := e.c.ListSnapshots(e.ctx(10 * time.Second)); err != nil {
		t.Error(err)
	} else {
		for _, r := range list {
			if strings.HasPrefix(r.SnapshotID, "forged") || r.SnapshotID == "tamper-copy" ||
				(r.SnapshotID == "tamper" && r.Resources != legit.Resources) {
				t.Errorf("list carries a refused record: %s %+v", r.SnapshotID, r.Resources)
			}
		}
	}
	if err := kv.Delete(e.ctx(10*time.Second), "tamper-copy"); err != nil {
		t.Fatal(err)
	}
	put("tamper", legit)
	if got, err := e.c.GetSnapshot(e.ctx(10*time.Second), "tamper"); err != nil || got.MAC != legit.MAC {
		t.Fatalf("legitimate record after restoring it: %+v %v", got, err)
	}

	// Names that are no KV keys, and unknown templates, are refused before
	// anything runs.
	for _, name := range []string{".hidden", "trailing.", "a..b", "a/b", "a=b"} {
		_, err := e.c.Snapshot(e.ctx(time.Minute), src.SandboxID, subjects.SnapshotRequest{Name: name})
		wantCode(t, "snapshot name "+name, err, subjects.CodeInvalidRequest)
		_, err = e.c.Create(e.ctx(time.Minute), subjects.CreateSandboxRequest{SnapshotID: name})
		wantCode(t, "create from snapshot "+name, err, subjects.CodeInvalidRequest)
	}
	_, err = e.c.SetPool(e.ctx(10*time.Second), "no-such-template", 0)
	wantCode(t, "pool.set of an unknown template", err, subjects.CodeInvalidRequest)
	_, err = e.c.SetPool(e.ctx(10*time.Second), "no-such-template", 2)
	wantCode(t, "pool.set of an unknown template", err, subjects.CodeInvalidRequest)
	if st, err := e.c.PoolStatus(e.ctx(10 * time.Second)); err != nil {
		t.Error(err)
	} else {
		for _, tpl := range st.Templates {
			if tpl.TemplateID == "no-such-template" {
				t.Errorf("unknown template in the pool: %+v", tpl)
			}
		}
	}
}

// TestUnsignedTemplateRecordIsRebuilt starts a worker on a state directory
// whose built-in template record was written before records were signed
// (and names a victim directory): the template is rebuilt and works, and the
// victim directory is untouched.
func TestUnsignedTemplateRecordIsRebuilt(t *testing.T) {
	state := t.TempDir()
	victim := t.TempDir()
	if err := os.WriteFile(filepath.Join(victim, "keep"), []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	old := subjects.SnapshotRecord{SnapshotID: "tiny", TemplateID: "tiny", Names: []string{"tiny"}, Location: victim,
		Kind: subjects.KindTemplate, Driver: "qemu", Resources: subjects.Resources{VCPUs: 1, MemoryMB: 256},
		Artifacts: []subjects.Artifact{{Name: "keep", SizeBytes: 4}}}
	data, _ := json.Marshal(old)
	if err := os.MkdirAll(filepath.Join(state, "templates"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(state, "templates", "tiny.json"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	e := startWorker(t, func(c *worker.Config) { c.StateDir = state })
	if !strings.Contains(e.logs.String(), "template record refused") {
		t.Errorf("the unsigned template record was not reported")
	}
	sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
	if sb.Source != subjects.SourceRestore {
		t.Errorf("create from the rebuilt template: source %q, want restore", sb.Source)
	}
	if r := e.exec(sb.SandboxID, "echo ok"); r.Stdout != "ok\n" {
		t.Errorf("exec: %+v", r)
	}
	if got, err := os.ReadFile(filepath.Join(victim, "keep")); err != nil || string(got) != "keep" {
		t.Errorf("victim file %q, %v", got, err)
	}
}
