package worker_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/backend"
	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/worker"
)

// median is the p50 of ds.
func median(ds []time.Duration) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

// TestPauseResume pauses and resumes a sandbox three times in a row: a
// background process started with proc.start (busybox httpd) keeps
// running with the same pid and keeps answering through its port route,
// and a file written before the first pause (and appended to after every
// resume) is whole. While paused the sandbox holds no machine, answers get
// with state paused, refuses exec (conflict) and its route answers 503.
func TestPauseResume(t *testing.T) {
	e := startWorker(t)
	sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", TimeoutS: 600, Metadata: map[string]string{"suite": "lifecycle"}})
	id := sb.SandboxID
	e.exec(id, "echo before-pause > /root/keep; sync")
	p, err := e.c.StartProcess(e.ctx(time.Minute), id, subjects.ProcStartRequest{
		Command: "mkdir -p /srv && echo paused-page > /srv/index.html && exec httpd -f -p 8000 -h /srv", Tag: "web", Background: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	pid, cmd := p.PID(), p.ID()
	_ = p.Close()
	route, err := e.c.Route(e.ctx(10*time.Second), id, 8000)
	if err != nil {
		t.Fatal(err)
	}
	url := "http://127.0.0.1:" + route.URL[strings.LastIndex(route.URL, ":")+1:] + "/"
	hdr := map[string]string{"e2b-sandbox-id": id, "e2b-sandbox-port": "8000"}
	eventually(t, 30*time.Second, "httpd through the proxy", func() error {
		if code, body := httpGet(t, url, hdr); code != 200 || body != "paused-page\n" {
			return fmt.Errorf("GET: %d %q", code, body)
		}
		return nil
	})

	var pauses, resumes []time.Duration
	want := "before-pause\n"
	for round := 1; round <= 3; round++ {
		t0 := time.Now()
		paused, err := e.c.Pause(e.ctx(3*time.Minute), id)
		pauses = append(pauses, time.Since(t0))
		if err != nil {
			t.Fatalf("round %d: pause: %v", round, err)
		}
		if paused.State != subjects.StatePaused || paused.Paused == nil || paused.Paused.SnapshotID == "" {
			t.Fatalf("round %d: pause reply %+v", round, paused)
		}
		if got, err := e.c.Get(e.ctx(10*time.Second), id); err != nil || got.State != subjects.StatePaused {
			t.Fatalf("round %d: get while paused: %+v %v", round, got, err)
		}
		if u := e.w.Backend().Usage(); u.Sandboxes != 0 {
			t.Errorf("round %d: a paused sandbox holds an admission reservation: %+v", round, u)
		}
		if n := len(qemuProcesses(e.state)); n != 0 {
			t.Errorf("round %d: %d machines run while the only sandbox is paused", round, n)
		}
		_, err = e.c.Exec(e.ctx(10*time.Second), id, subjects.ExecRequest{Command: "true"})
		wantCode(t, "exec while paused", err, subjects.CodeConflict)
		if code, _ := httpGet(t, url, hdr); code != 503 {
			t.Errorf("round %d: route while paused: %d, want 503", round, code)
		}
		if page, err := e.c.ListPage(e.ctx(10*time.Second), subjects.ListSandboxesRequest{State: subjects.StatePaused, Metadata: map[string]string{"suite": "lifecycle"}}); err != nil ||
			len(page.Sandboxes) != 1 || page.Sandboxes[0].SandboxID != id {
			t.Errorf("round %d: list paused: %+v %v", round, page, err)
		}

		t0 = time.Now()
		resumed, err := e.c.Resume(e.ctx(3*time.Minute), id, subjects.ResumeRequest{})
		resumes = append(resumes, time.Since(t0))
		if err != nil {
			t.Fatalf("round %d: resume: %v", round, err)
		}
		if resumed.State != subjects.StateRunning || resumed.Generation != sb.Generation || resumed.Paused != nil {
			t.Fatalf("round %d: resume reply %+v", round, resumed)
		}
		if r := e.exec(id, "cat /root/keep"); r.Stdout != want {
			t.Fatalf("round %d: file after resume = %q, want %q", round, r.Stdout, want)
		}
		line := fmt.Sprintf("after-resume-%d\n", round)
		e.exec(id, "printf '"+strings.TrimSuffix(line, "\n")+"\\n' >> /root/keep; sync")
		want += line
		procs, err := e.c.ListProcesses(e.ctx(10*time.Second), id)
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, pi := range procs {
			if pi.CommandID == cmd && pi.PID == pid && pi.State == subjects.ProcRunning {
				found = true
			}
		}
		if !found {
			t.Errorf("round %d: httpd (%s, pid %d) not running after resume: %+v", round, cmd, pid, procs)
		}
		if r := e.exec(id, fmt.Sprintf("kill -0 %d && echo alive", pid)); r.Stdout != "alive\n" {
			t.Errorf("round %d: httpd pid %d gone: %+v", round, pid, r)
		}
		eventually(t, 20*time.Second, "route after resume", func() error {
			if code, body := httpGet(t, url, hdr); code != 200 || body != "paused-page\n" {
				return fmt.Errorf("GET: %d %q", code, body)
			}
			return nil
		})
	}
	if r := e.exec(id, "cat /root/keep"); r.Stdout != want {
		t.Fatalf("file at the end = %q, want %q", r.Stdout, want)
	}
	t.Logf("pause p50 %v (%v), resume p50 %v (%v), accel %s", median(pauses), pauses, median(resumes), resumes, e.w.Backend().Accelerator())

	// Killed, the sandbox's pause snapshots (a chain of three) go too.
	if err := e.c.Kill(e.ctx(time.Minute), id); err != nil {
		t.Fatal(err)
	}
	eventually(t, time.Minute, "pause snapshots deleted", func() error {
		list, err := e.c.ListSnapshots(e.ctx(10 * time.Second))
		if err != nil {
			return err
		}
		for _, r := range list {
			if strings.HasPrefix(r.SnapshotID, id+"-pause-") {
				return fmt.Errorf("%s still listed", r.SnapshotID)
			}
		}
		return nil
	})
}

// TestPauseOnTimeoutAndAutoResume: a sandbox created with on_timeout pause
// is paused at its deadline, not killed, and resumes with its files; one
// created with auto_resume is resumed by an exec.
func TestPauseOnTimeoutAndAutoResume(t *testing.T) {
	e := startWorker(t)
	t.Run("on_timeout pause", func(t *testing.T) {
		sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", TimeoutS: 5, OnTimeout: subjects.OnTimeoutPause})
		e.exec(sb.SandboxID, "echo kept > /root/f; sync")
		eventually(t, 2*time.Minute, "paused at the deadline", func() error {
			got, err := e.c.Get(e.ctx(10*time.Second), sb.SandboxID)
			if err != nil || got.State != subjects.StatePaused {
				return fmt.Errorf("get: %+v %v", got, err)
			}
			return nil
		})
		got, err := e.c.Resume(e.ctx(3*time.Minute), sb.SandboxID, subjects.ResumeRequest{TimeoutS: 300})
		if err != nil || got.State != subjects.StateRunning || time.Until(got.EndAt) < 200*time.Second {
			t.Fatalf("resume: %+v %v", got, err)
		}
		if r := e.exec(sb.SandboxID, "cat /root/f"); r.Stdout != "kept\n" {
			t.Fatalf("after resume: %+v", r)
		}
	})
	t.Run("bad on_timeout", func(t *testing.T) {
		_, err := e.c.Create(e.ctx(time.Minute), subjects.CreateSandboxRequest{TemplateID: "tiny", OnTimeout: "sleep"})
		wantCode(t, "on_timeout sleep", err, subjects.CodeInvalidRequest)
	})
	t.Run("auto_resume on exec", func(t *testing.T) {
		sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", TimeoutS: 600, AutoResume: true})
		e.exec(sb.SandboxID, "echo auto > /root/f; sync")
		if _, err := e.c.Pause(e.ctx(3*time.Minute), sb.SandboxID); err != nil {
			t.Fatal(err)
		}
		if r := e.exec(sb.SandboxID, "cat /root/f"); r.Stdout != "auto\n" {
			t.Fatalf("exec on a paused auto_resume sandbox: %+v", r)
		}
		if got, err := e.c.Get(e.ctx(10*time.Second), sb.SandboxID); err != nil || got.State != subjects.StateRunning {
			t.Fatalf("get after auto-resume: %+v %v", got, err)
		}
		// Traffic through the proxy resumes it too.
		url := e.serveWoke(t, sb.SandboxID)
		hdr := map[string]string{"e2b-sandbox-id": sb.SandboxID, "e2b-sandbox-port": "8000"}
		eventually(t, 30*time.Second, "httpd up", func() error {
			if code, _ := httpGet(t, url, hdr); code != 200 {
				return fmt.Errorf("GET: %d", code)
			}
			return nil
		})
		if _, err := e.c.Pause(e.ctx(3*time.Minute), sb.SandboxID); err != nil {
			t.Fatal(err)
		}
		if code, body := httpGet(t, url, hdr); code != 200 || body != "woke\n" {
			t.Fatalf("GET through the proxy to a paused auto_resume sandbox: %d %q", code, body)
		}
		if got, err := e.c.Get(e.ctx(10*time.Second), sb.SandboxID); err != nil || got.State != subjects.StateRunning {
			t.Fatalf("get after auto-resume by traffic: %+v %v", got, err)
		}
	})
	t.Run("traffic without the token does not wake a private sandbox", func(t *testing.T) {
		private := false
		sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", TimeoutS: 600, AutoResume: true, PublicTraffic: &private})
		url := e.serveWoke(t, sb.SandboxID)
		anon := map[string]string{"e2b-sandbox-id": sb.SandboxID, "e2b-sandbox-port": "8000"}
		withToken := map[string]string{"e2b-sandbox-id": sb.SandboxID, "e2b-sandbox-port": "8000", "e2b-traffic-access-token": sb.TrafficAccessToken}
		eventually(t, 30*time.Second, "httpd up", func() error {
			if code, _ := httpGet(t, url, withToken); code != 200 {
				return fmt.Errorf("GET: %d", code)
			}
			return nil
		})
		if _, err := e.c.Pause(e.ctx(3*time.Minute), sb.SandboxID); err != nil {
			t.Fatal(err)
		}
		for range 3 {
			if code, _ := httpGet(t, url, anon); code != 401 {
				t.Fatalf("GET without the token to a paused private sandbox: %d, want 401", code)
			}
		}
		if got, err := e.c.Get(e.ctx(10*time.Second), sb.SandboxID); err != nil || got.State != subjects.StatePaused {
			t.Fatalf("a request without the token woke the sandbox: %+v %v", got, err)
		}
		if code, body := httpGet(t, url, withToken); code != 200 || body != "woke\n" {
			t.Fatalf("GET with the token: %d %q", code, body)
		}
	})
}

// TestPauseSurvivesWorkerRestart pauses a sandbox, stops the worker (a
// paused sandbox is not ended by a worker stop), starts a new worker on
// the same state directory and resumes it there with its file.
func TestPauseSurvivesWorkerRestart(t *testing.T) {
	testenv.RequireQEMU(t, runtime.GOARCH)
	img := testenv.Image(t, runtime.GOARCH)
	logs := &syncWriter{}
	cfg := worker.Config{
		StateDir: t.TempDir(), NATSListen: "127.0.0.1:-1", ProxyListen: "127.0.0.1:0",
		AgentBinary: testenv.AgentBinary(t, runtime.GOARCH), Image: &img, Accel: "auto",
		Pool: map[string]int{}, WaitTemplates: true,
		Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	start := func() (*worker.Worker, *client.Client) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		w, err := worker.Start(ctx, cfg)
		if err != nil {
			t.Fatalf("start worker: %v\n%s", err, tail(logs.String(), 4000))
		}
		nc, err := nats.Connect(w.NATSURL(), w.ClientOptions()...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		return w, client.New(nc)
	}
	stop := func(w *worker.Worker) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := w.Stop(ctx); err != nil {
			t.Errorf("stop worker: %v", err)
		}
	}
	defer func() {
		if t.Failed() {
			t.Logf("worker log (tail):\n%s", tail(logs.String(), 6000))
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	w1, c1 := start()
	sb, err := c1.Create(ctx, subjects.CreateSandboxRequest{TemplateID: "tiny", TimeoutS: 600})
	if err != nil {
		stop(w1)
		t.Fatal(err)
	}
	if _, err := c1.Exec(ctx, sb.SandboxID, subjects.ExecRequest{Command: "echo overnight > /root/f; sync"}); err != nil {
		stop(w1)
		t.Fatal(err)
	}
	if _, err := c1.Pause(ctx, sb.SandboxID); err != nil {
		stop(w1)
		t.Fatal(err)
	}
	stop(w1)

	w2, c2 := start()
	defer stop(w2)
	got, err := c2.Get(ctx, sb.SandboxID)
	if err != nil || got.State != subjects.StatePaused {
		t.Fatalf("get after the restart: %+v %v", got, err)
	}
	if _, err := c2.Resume(ctx, sb.SandboxID, subjects.ResumeRequest{}); err != nil {
		t.Fatalf("resume after the restart: %v", err)
	}
	r, err := c2.Exec(ctx, sb.SandboxID, subjects.ExecRequest{Command: "cat /root/f"})
	if err != nil || r.Stdout != "overnight\n" {
		t.Fatalf("file after resume on the restarted worker: %+v %v", r, err)
	}
	if err := c2.Kill(ctx, sb.SandboxID); err != nil {
		t.Error(err)
	}
}

// TestFork forks a running sandbox three times: the source goes on
// running; each fork runs, has its own id and token, its own MAC address
// and random stream, the source's file and running process, and a file
// changed in one is unchanged in the others.
func TestFork(t *testing.T) {
	e := startWorker(t)
	private := false
	src := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", TimeoutS: 600, Metadata: map[string]string{"role": "source"},
		PublicTraffic: &private, Env: map[string]string{"GREETING": "from-create"}, AutoResume: true, OnTimeout: subjects.OnTimeoutPause})
	e.exec(src.SandboxID, "echo original > /root/f; sync")
	p, err := e.c.StartProcess(e.ctx(time.Minute), src.SandboxID, subjects.ProcStartRequest{Command: "exec sleep 100000", Tag: "sleeper", Background: true})
	if err != nil {
		t.Fatal(err)
	}
	_ = p.Close()
	web, err := e.c.StartProcess(e.ctx(time.Minute), src.SandboxID, subjects.ProcStartRequest{
		Command: "mkdir -p /srv && hostname > /srv/index.html && exec httpd -f -p 8000 -h /srv", Tag: "web", Background: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	_ = web.Close()
	route, err := e.c.Route(e.ctx(10*time.Second), src.SandboxID, 8000)
	if err != nil {
		t.Fatal(err)
	}
	proxyURL := "http://127.0.0.1:" + route.URL[strings.LastIndex(route.URL, ":")+1:] + "/"
	// get asks sandbox id's port 8000 through the proxy with token tok.
	get := func(id, tok string) (int, string) {
		return httpGet(t, proxyURL, map[string]string{"e2b-sandbox-id": id, "e2b-sandbox-port": "8000", "e2b-traffic-access-token": tok})
	}
	eventually(t, 30*time.Second, "source's httpd through the proxy", func() error {
		if code, body := get(src.SandboxID, src.TrafficAccessToken); code != 200 || body != src.SandboxID+"\n" {
			return fmt.Errorf("GET: %d %q", code, body)
		}
		return nil
	})
	t0 := time.Now()
	reply, err := e.c.Fork(e.ctx(6*time.Minute), src.SandboxID, subjects.ForkRequest{Count: 3, Metadata: map[string]string{"role": "fork"}})
	if err != nil {
		t.Fatalf("fork: %v", err)
	}
	t.Logf("fork of 3: %v", time.Since(t0))
	if time.Since(t0) > 30*time.Second {
		for _, l := range strings.Split(e.logs.String(), "\n") {
			if strings.Contains(l, "component=qemu") || strings.Contains(l, "component=runtime") || strings.Contains(l, "component=agent") {
				t.Log(l)
			}
		}
	}
	for _, sb := range reply.Sandboxes {
		t.Cleanup(func() { _ = e.c.Kill(context.Background(), sb.SandboxID) })
	}
	if len(reply.Sandboxes) != 3 || reply.SourceID != src.SandboxID || reply.SnapshotID == "" {
		t.Fatalf("fork reply %+v", reply)
	}
	all := append([]subjects.Sandbox{src}, reply.Sandboxes...)
	ids, macs, seeds, tokens := map[string]bool{}, map[string]string{}, map[string]string{}, map[string]bool{}
	for i, sb := range all {
		if i > 0 && (sb.State != subjects.StateRunning || sb.TrafficAccessToken == "" || sb.ForkedFrom != src.SandboxID || sb.Metadata["role"] != "fork") {
			t.Errorf("fork record %+v", sb)
		}
		ids[sb.SandboxID], tokens[sb.TrafficAccessToken] = true, true
		r := e.exec(sb.SandboxID, "cat /root/f; cat /sys/class/net/eth0/address; head -c 16 /dev/urandom | od -x | head -1; hostname; ps | grep -q '[s]leep 100000' && echo sleeping")
		lines := strings.Split(strings.TrimSpace(r.Stdout), "\n")
		if len(lines) != 5 || lines[0] != "original" || lines[3] != sb.SandboxID || lines[4] != "sleeping" {
			t.Fatalf("%s: %q (stderr %q)", sb.SandboxID, r.Stdout, r.Stderr)
		}
		for other, mac := range macs {
			if mac == lines[1] {
				t.Errorf("%s and %s share MAC %s", sb.SandboxID, other, mac)
			}
		}
		for other, seed := range seeds {
			if seed == lines[2] {
				t.Errorf("%s and %s read the same random bytes %s", sb.SandboxID, other, seed)
			}
		}
		macs[sb.SandboxID], seeds[sb.SandboxID] = lines[1], lines[2]
		t.Logf("%s: mac %s ip %s", sb.SandboxID, lines[1], strings.TrimSpace(e.exec(sb.SandboxID, "ip -4 -o addr show eth0 | awk '{print $4}'").Stdout))
	}
	if t.Failed() {
		for _, l := range strings.Split(e.logs.String(), "\n") {
			if strings.Contains(l, "network identity") || strings.Contains(l, "fork") && strings.Contains(l, "level=WARN") {
				t.Log(l)
			}
		}
	}
	if len(ids) != 4 || len(tokens) != 4 {
		t.Errorf("ids %v tokens %d: want 4 distinct", ids, len(tokens))
	}
	// The source's create settings and routes are the forks' too; each
	// fork answers on the source's routed port with its own token only.
	for _, sb := range reply.Sandboxes {
		if sb.PublicTraffic || !sb.AutoResume || sb.OnTimeout != subjects.OnTimeoutPause {
			t.Errorf("fork %s settings: public %v auto_resume %v on_timeout %q", sb.SandboxID, sb.PublicTraffic, sb.AutoResume, sb.OnTimeout)
		}
		if r := e.exec(sb.SandboxID, "echo $GREETING"); r.Stdout != "from-create\n" {
			t.Errorf("fork %s create env: GREETING=%q", sb.SandboxID, r.Stdout)
		}
		if rts := reply.Routes[sb.SandboxID]; len(rts) != 1 || !strings.HasPrefix(rts[0].Host, "8000-"+sb.SandboxID+".") || rts[0].TCP != "" {
			t.Errorf("fork %s routes %+v, want port 8000 without a raw listener", sb.SandboxID, rts)
		}
		if code, body := get(sb.SandboxID, sb.TrafficAccessToken); code != 200 || body != src.SandboxID+"\n" {
			t.Errorf("fork %s through the proxy with its token: %d %q", sb.SandboxID, code, body)
		}
		if code, _ := get(sb.SandboxID, src.TrafficAccessToken); code != 403 {
			t.Errorf("fork %s with the source's token: %d, want 403", sb.SandboxID, code)
		}
		if code, _ := get(src.SandboxID, sb.TrafficAccessToken); code != 403 {
			t.Errorf("source with fork %s's token: %d, want 403", sb.SandboxID, code)
		}
	}
	if code, _ := get(src.SandboxID, src.TrafficAccessToken); code != 200 {
		t.Errorf("source after the fork: %d", code)
	}
	if r := e.exec(src.SandboxID, "echo $GREETING"); r.Stdout != "from-create\n" {
		t.Errorf("source create env after the fork: %q", r.Stdout)
	}

	changed := reply.Sandboxes[1].SandboxID
	e.exec(changed, "echo changed > /root/f; touch /root/only-here; sync")
	for _, sb := range all {
		r := e.exec(sb.SandboxID, "cat /root/f; ls /root/only-here 2>/dev/null || echo absent")
		want := "original\nabsent\n"
		if sb.SandboxID == changed {
			want = "changed\n/root/only-here\n"
		}
		if r.Stdout != want {
			t.Errorf("%s after a change in %s: %q, want %q", sb.SandboxID, changed, r.Stdout, want)
		}
	}
	_, err = e.c.Fork(e.ctx(time.Minute), src.SandboxID, subjects.ForkRequest{Count: 9})
	wantCode(t, "fork of 9", err, subjects.CodeInvalidRequest)

	// The fork snapshots are intermediate: once the source and every fork
	// ended, neither their records nor their files are left.
	forkSnaps := func() (left []string) {
		recs, err := e.w.Backend().ListSnapshots(e.ctx(10 * time.Second))
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range recs {
			if strings.HasPrefix(r.SnapshotID, src.SandboxID+"-fork") {
				left = append(left, "record "+r.SnapshotID)
			}
		}
		dirs, _ := os.ReadDir(filepath.Join(e.state, "snapshots"))
		for _, d := range dirs {
			if strings.HasPrefix(d.Name(), src.SandboxID+"-fork") {
				left = append(left, "dir "+d.Name())
			}
		}
		return left
	}
	if left := forkSnaps(); len(left) < 2 {
		t.Errorf("while the forks run: fork snapshots %v, want the fork and shared-memory snapshots", left)
	}
	for _, sb := range all {
		if err := e.c.Kill(e.ctx(time.Minute), sb.SandboxID); err != nil {
			t.Errorf("kill %s: %v", sb.SandboxID, err)
		}
	}
	eventually(t, 30*time.Second, "fork snapshots deleted", func() error {
		if left := forkSnaps(); len(left) > 0 {
			return fmt.Errorf("left: %v", left)
		}
		return nil
	})
}

// TestLifecycleBench measures fork of 1, 4 and 8, and the host memory
// (PSS of the QEMU processes) of 8 forks against 8 independent sandboxes.
// It runs only with FIRKIN_LIFECYCLE_BENCH=1 (many machines at once).
func TestLifecycleBench(t *testing.T) {
	if os.Getenv("FIRKIN_LIFECYCLE_BENCH") == "" {
		t.Skip("set FIRKIN_LIFECYCLE_BENCH=1 to measure fork times and memory")
	}
	e := startWorker(t, func(c *worker.Config) {
		c.Limits = backend.Limits{MaxSessions: 64, MaxVCPUs: 64, MaxMemoryMB: 16 << 10}
	})
	pss := func(ids []string) (total int) {
		for _, id := range ids {
			sb, err := e.c.Get(e.ctx(10*time.Second), id)
			if err != nil {
				t.Fatal(err)
			}
			procs := qemuProcesses(sb.Dir)
			if len(procs) != 1 {
				t.Fatalf("%s: %d QEMU processes", id, len(procs))
			}
			pid, _ := strconv.Atoi(strings.SplitN(procs[0], ":", 2)[0])
			data, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
			if err != nil {
				t.Fatal(err)
			}
			for _, line := range strings.Split(string(data), "\n") {
				if f := strings.Fields(line); len(f) >= 2 && f[0] == "Pss:" {
					kib, _ := strconv.Atoi(f[1])
					total += kib
				}
			}
		}
		return total
	}
	kill := func(ids []string) {
		for _, id := range ids {
			_ = e.c.Kill(context.Background(), id)
		}
	}
	src := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", TimeoutS: 1200})
	e.exec(src.SandboxID, "echo x > /root/f")
	var forkIDs []string
	for _, n := range []int{1, 4, 8} {
		t0 := time.Now()
		reply, err := e.c.Fork(e.ctx(10*time.Minute), src.SandboxID, subjects.ForkRequest{Count: n})
		if err != nil {
			t.Fatalf("fork %d: %v", n, err)
		}
		d := time.Since(t0)
		var ids []string
		for _, sb := range reply.Sandboxes {
			ids = append(ids, sb.SandboxID)
			e.exec(sb.SandboxID, "true")
		}
		t.Logf("fork of %d: %v (%v per fork)", n, d.Round(time.Millisecond), (d / time.Duration(n)).Round(time.Millisecond))
		if n == 8 {
			forkIDs = ids
		} else {
			kill(ids)
		}
	}
	time.Sleep(2 * time.Second)
	forkPSS := pss(forkIDs)
	kill(forkIDs)
	var indep []string
	for range 8 {
		sb, err := e.c.Create(e.ctx(3*time.Minute), subjects.CreateSandboxRequest{TemplateID: "tiny", TimeoutS: 600})
		if err != nil {
			t.Fatal(err)
		}
		indep = append(indep, sb.SandboxID)
		e.exec(sb.SandboxID, "echo x > /root/f")
	}
	defer kill(indep)
	time.Sleep(2 * time.Second)
	indepPSS := pss(indep)
	t.Logf("host PSS of 8 forks: %d MiB (%d MiB each); of 8 independent sandboxes: %d MiB (%d MiB each)",
		forkPSS>>10, forkPSS>>10/8, indepPSS>>10, indepPSS>>10/8)
}

// TestPausedSandboxMovesToAnotherWorker pauses a sandbox on the second
// worker of a cluster, stops that worker for good, and resumes the
// sandbox on the first through firkin.sandbox.resume: its record moves by
// compare-and-set, the pause snapshot comes from the artifact store, and
// its file is there.
func TestPausedSandboxMovesToAnotherWorker(t *testing.T) {
	e := startWorker(t, clusterOpts)
	m2 := joinWorker(t, e, clusterOpts)
	ctx := e.ctx(10 * time.Minute)
	sb, err := e.createOn(ctx, m2.w.ID(), subjects.CreateSandboxRequest{TemplateID: "tiny", TimeoutS: 600})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.c.Kill(context.Background(), sb.SandboxID) })
	e.exec(sb.SandboxID, "echo moved > /root/f; sync")
	paused, err := e.c.Pause(ctx, sb.SandboxID)
	if err != nil {
		t.Fatal(err)
	}
	// While its worker is live, another worker does not take it.
	_, err = e.w.Backend().TakeOver(ctx, subjects.TakeOverRequest{SandboxID: sb.SandboxID}, func(string) bool { return true })
	wantCode(t, "take over from a live worker", err, subjects.CodeConflict)
	eventually(t, 2*time.Minute, "pause snapshot uploaded", func() error {
		if !strings.Contains(m2.logs.String(), "snapshot artifacts uploaded") || !strings.Contains(m2.logs.String(), paused.Paused.SnapshotID) {
			return fmt.Errorf("not yet")
		}
		return nil
	})
	m2.crashed = true // stopped here; its cleanup's second stop may complain
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	err = m2.w.Stop(sctx)
	cancel()
	if err != nil {
		t.Fatalf("stop second worker: %v", err)
	}
	eventually(t, 30*time.Second, "second worker gone", func() error {
		if ws := e.workers(); len(ws) != 1 {
			return fmt.Errorf("%d members", len(ws))
		}
		return nil
	})
	got, err := e.c.TakeOver(ctx, subjects.TakeOverRequest{SandboxID: sb.SandboxID})
	if err != nil {
		t.Fatalf("take over: %v", err)
	}
	if got.State != subjects.StateRunning || got.ClientID != e.w.ID() || got.Generation != sb.Generation {
		t.Fatalf("taken over: %+v", got)
	}
	if r := e.exec(sb.SandboxID, "cat /root/f"); r.Stdout != "moved\n" {
		t.Fatalf("file on the new worker: %+v", r)
	}
}

// serveWoke starts httpd on port 8000 of sandbox id serving "woke", routes
// the port and returns the proxy URL to GET (with the sandbox headers).
func (e *env) serveWoke(t *testing.T, id string) string {
	t.Helper()
	p, err := e.c.StartProcess(e.ctx(time.Minute), id, subjects.ProcStartRequest{
		Command: "mkdir -p /srv && echo woke > /srv/index.html && exec httpd -f -p 8000 -h /srv", Background: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	_ = p.Close()
	route, err := e.c.Route(e.ctx(10*time.Second), id, 8000)
	if err != nil {
		t.Fatal(err)
	}
	return "http://127.0.0.1:" + route.URL[strings.LastIndex(route.URL, ":")+1:] + "/"
}
