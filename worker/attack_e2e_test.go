package worker_test

// The attacks of issue 8, tried for real: a worker as the README starts it
// (embedded NATS with authentication, the QEMU driver, confinement and the
// network guard), guests that try to get out, and clients that try to get in.
// Each subtest is one attack; its name says what the attacker tries, and it
// passes when the attack fails.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/worker"
)

// guestConnect tries a TCP connection from inside a guest and reports what
// it read (nc prints what the server sent) and how long the command took in
// the guest.
func (e *env) guestConnect(id, host string, port int, send string) (string, time.Duration) {
	e.t.Helper()
	cmd := fmt.Sprintf("printf %s | timeout 5 nc %s %d 2>&1 | head -c 300; echo; echo rc=$?", shellQuote(send), host, port)
	r := e.exec(id, cmd)
	return r.Stdout + r.Stderr, time.Duration(r.DurationMS) * time.Millisecond
}

// guestGet fetches url from inside a guest; ok when it answered body.
func (e *env) guestGet(id, url, body string) bool {
	e.t.Helper()
	// (busybox's wget -T crashes in the static build; timeout(1) bounds it.)
	r := e.exec(id, "timeout 5 wget -q -O- "+url+"; echo; echo rc=$?")
	return strings.Contains(r.Stdout, body)
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

func TestAttacks(t *testing.T) {
	// A host service that is not the worker's: guests must not reach it,
	// unless a create opens its port, which the operator allows here
	// (--egress-host-ports), with every other port (the worker's own
	// included: they are never open).
	hostLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hostSrv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "host-secret") })}
	go hostSrv.Serve(hostLn)
	t.Cleanup(func() { hostSrv.Close() })
	hostPort := hostLn.Addr().(*net.TCPAddr).Port
	e := startWorker(t, waitTemplates(), func(c *worker.Config) { c.EgressHostPorts = "1-65535" })
	th := newTestHost(t)

	natsPort := portOf(t, e.w.NATSURL())
	proxyPort := portOf(t, "tcp://"+e.w.ProxyAddr())

	attacker := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
	private := false
	victim := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", PublicTraffic: &private})
	e.startHTTPD(victim.SandboxID, 8000)

	t.Run("guest reaches the worker's NATS port", func(t *testing.T) {
		out, took := e.guestConnect(attacker.SandboxID, "10.0.2.2", natsPort, "")
		if strings.Contains(out, "INFO") {
			t.Fatalf("guest talked to the worker's NATS server: %q", out)
		}
		if took > time.Second {
			t.Errorf("connection attempt took %s; want a refusal within a second", took)
		}
	})

	t.Run("guest runs a command in another sandbox over NATS", func(t *testing.T) {
		body := `{"command":"touch /tmp/pwned"}`
		msg := fmt.Sprintf("CONNECT {\"verbose\":false}\r\nPUB firkin.sandbox.%s.exec %d\r\n%s\r\nPING\r\n", victim.SandboxID, len(body), body)
		if out, _ := e.guestConnect(attacker.SandboxID, "10.0.2.2", natsPort, msg); strings.Contains(out, "PONG") || strings.Contains(out, "INFO") {
			t.Fatalf("guest reached NATS: %q", out)
		}
		if r := e.exec(victim.SandboxID, "test -e /tmp/pwned && echo pwned || echo clean"); !strings.Contains(r.Stdout, "clean") {
			t.Fatalf("the victim ran the attacker's command: %+v", r)
		}
	})

	t.Run("guest reaches the port proxy", func(t *testing.T) {
		out, took := e.guestConnect(attacker.SandboxID, "10.0.2.2", proxyPort,
			fmt.Sprintf("GET / HTTP/1.0\r\ne2b-sandbox-id: %s\r\ne2b-sandbox-port: 8000\r\n\r\n", victim.SandboxID))
		if strings.Contains(out, "HTTP/") || strings.Contains(out, "hello-from-") {
			t.Fatalf("guest talked to the proxy: %q", out)
		}
		if took > time.Second {
			t.Errorf("connection attempt took %s; want a refusal within a second", took)
		}
	})

	t.Run("guest reaches a raw TCP route of a public sandbox", func(t *testing.T) {
		e.startHTTPD(attacker.SandboxID, 8000)
		route, err := e.c.Route(e.ctx(10*time.Second), attacker.SandboxID, 8000)
		if err != nil || route.TCP == "" {
			t.Fatalf("route of a public sandbox: %+v %v", route, err)
		}
		out, took := e.guestConnect(attacker.SandboxID, "10.0.2.2", portOf(t, "tcp://"+route.TCP), "GET / HTTP/1.0\r\n\r\n")
		if strings.Contains(out, "hello-from-") {
			t.Fatalf("guest reached a raw TCP route on the host: %q", out)
		}
		if took > time.Second {
			t.Errorf("connection attempt took %s; want a refusal within a second", took)
		}
	})

	t.Run("guest reaches another host loopback service", func(t *testing.T) {
		if e.guestGet(attacker.SandboxID, fmt.Sprintf("http://10.0.2.2:%d/", hostPort), "host-secret") {
			t.Fatal("guest reached a host loopback service")
		}
		out, took := e.guestConnect(attacker.SandboxID, "10.0.2.2", hostPort, "GET / HTTP/1.0\r\n\r\n")
		if strings.Contains(out, "host-secret") {
			t.Fatalf("guest reached a host loopback service: %q", out)
		}
		if took > time.Second {
			t.Errorf("connection attempt took %s; want a refusal within a second", took)
		}
	})

	t.Run("guest reaches a private address", func(t *testing.T) {
		if e.guestGet(attacker.SandboxID, th.URL(th.Private), th.Body) {
			t.Fatal("guest reached a private address without an allow entry")
		}
	})

	t.Run("guest reaches a link-local address", func(t *testing.T) {
		if e.guestGet(attacker.SandboxID, th.URL(th.LinkLocal), th.Body) {
			t.Fatal("guest reached a link-local address")
		}
	})

	t.Run("an allowed private host is reached, a denied one is not", func(t *testing.T) {
		allowed := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny",
			Egress: &subjects.EgressPolicy{Allow: []string{th.Private + "/32"}}})
		if !e.guestGet(allowed.SandboxID, th.URL(th.Private), th.Body) {
			t.Error("guest with an allow entry did not reach the test host")
		}
		if e.guestGet(allowed.SandboxID, th.URL(th.LinkLocal), th.Body) {
			t.Error("allowing one address opened another")
		}
		denied := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny",
			Egress: &subjects.EgressPolicy{Allow: []string{th.Private + "/32"}, Deny: []string{th.Private}}})
		if e.guestGet(denied.SandboxID, th.URL(th.Private), th.Body) {
			t.Error("deny did not win over allow")
		}
	})

	t.Run("host:port opens one host port and no other", func(t *testing.T) {
		dev := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny",
			Egress: &subjects.EgressPolicy{Allow: []string{fmt.Sprintf("host:%d", hostPort)}}})
		if !e.guestGet(dev.SandboxID, fmt.Sprintf("http://10.0.2.2:%d/", hostPort), "host-secret") {
			t.Error("host:port did not open the host port")
		}
		if out, _ := e.guestConnect(dev.SandboxID, "10.0.2.2", natsPort, ""); strings.Contains(out, "INFO") {
			t.Errorf("host:%d also opened the NATS port: %q", hostPort, out)
		}
		for _, own := range []int{natsPort, proxyPort} {
			_, err := e.c.Create(e.ctx(time.Minute), subjects.CreateSandboxRequest{TemplateID: "tiny",
				Egress: &subjects.EgressPolicy{Allow: []string{fmt.Sprintf("host:%d", own)}}})
			wantCode(t, fmt.Sprintf("host:%d (the worker's own port)", own), err, subjects.CodeInvalidRequest)
		}
	})

	t.Run("a bad egress entry", func(t *testing.T) {
		for _, bad := range []string{"10.0.0.0/33", "host:0", "host:99999", "exa mple.com", "-bad-.com", strings.Repeat("a", 300) + ".com", ""} {
			_, err := e.c.Create(e.ctx(time.Minute), subjects.CreateSandboxRequest{TemplateID: "tiny",
				Egress: &subjects.EgressPolicy{Allow: []string{bad}}})
			wantCode(t, fmt.Sprintf("egress allow %q", bad), err, subjects.CodeInvalidRequest)
		}
	})

	t.Run("network false reaches nothing", func(t *testing.T) {
		off := false
		sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", Network: &off})
		if e.guestGet(sb.SandboxID, th.URL(th.Private), th.Body) {
			t.Fatal("guest without network reached the test host")
		}
	})

	t.Run("anonymous NATS client", func(t *testing.T) {
		nc, err := nats.Connect(e.w.NATSURL(), nats.Timeout(2*time.Second), nats.NoReconnect())
		if err == nil {
			nc.Close()
			t.Fatal("the embedded server accepted an anonymous client")
		}
		if !strings.Contains(strings.ToLower(err.Error()), "authorization") {
			t.Errorf("anonymous connect: %v, want an authorization error", err)
		}
		// The client identity of the state dir works (e.nc is connected with it).
		if _, err := e.c.Get(e.ctx(10*time.Second), attacker.SandboxID); err != nil {
			t.Errorf("client nkey: %v", err)
		}
	})

	t.Run("a client makes the worker write KV or events through a reply subject", func(t *testing.T) {
		before, err := e.c.GetSnapshot(e.ctx(10*time.Second), "tiny")
		if err != nil {
			t.Fatal(err)
		}
		events, err := e.nc.SubscribeSync("firkin.events.killed." + victim.SandboxID)
		if err != nil {
			t.Fatal(err)
		}
		for _, req := range []struct{ subject, reply string }{
			{"firkin.pool.status", "$KV.firkin_snapshots.tiny"},
			{"$SRV.PING", "$KV.firkin_snapshots.tiny"},
			{"$SRV.INFO.firkin-worker", "$KV.firkin_sessions." + victim.SandboxID},
			{"firkin.sandbox." + victim.SandboxID + ".exec", "firkin.events.killed." + victim.SandboxID},
		} {
			if err := e.nc.PublishRequest(req.subject, req.reply, []byte(`{"command":"echo forged"}`)); err != nil {
				t.Fatal(err)
			}
		}
		if err := e.nc.Flush(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second) // what the worker would have answered
		after, err := e.c.GetSnapshot(e.ctx(10*time.Second), "tiny")
		if err != nil || after.MAC != before.MAC {
			t.Errorf("the template record changed: %v (mac %q → %q)", err, before.MAC, after.MAC)
		}
		if m, err := events.NextMsg(100 * time.Millisecond); err == nil {
			t.Errorf("a forged event was published: %q", m.Data)
		}
		if _, err := e.c.Get(e.ctx(10*time.Second), victim.SandboxID); err != nil {
			t.Errorf("the victim after the forged replies: %v", err)
		}
	})

	t.Run("list and get leak tokens", func(t *testing.T) {
		got, err := e.c.Get(e.ctx(10*time.Second), victim.SandboxID)
		if err != nil {
			t.Fatal(err)
		}
		if got.TrafficAccessToken != "" {
			t.Errorf("get carries tokens: %+v", got)
		}
		list, err := e.c.List(e.ctx(10 * time.Second))
		if err != nil {
			t.Fatal(err)
		}
		for _, sb := range list {
			if sb.TrafficAccessToken != "" {
				t.Errorf("list carries tokens: %+v", sb)
			}
		}
		if victim.TrafficAccessToken == "" {
			t.Error("create of a private sandbox returned no traffic token")
		}
	})

	t.Run("raw TCP into a private sandbox", func(t *testing.T) {
		route, err := e.c.Route(e.ctx(10*time.Second), victim.SandboxID, 8000)
		if err != nil {
			t.Fatal(err)
		}
		if route.TCP != "" {
			t.Fatalf("private sandbox got a raw TCP listener %s", route.TCP)
		}
		status := connect(t, e.w.ProxyAddr(), victim.SandboxID, 8000, "")
		if status != 401 {
			t.Errorf("CONNECT without a token: %d, want 401", status)
		}
		if status := connect(t, e.w.ProxyAddr(), victim.SandboxID, 8000, victim.TrafficAccessToken); status != 200 {
			t.Errorf("CONNECT with the token: %d, want 200", status)
		}
	})

	t.Run("the token of a killed sandbox opens its successor", func(t *testing.T) {
		id := "reused" + strconv.FormatInt(time.Now().UnixNano()%1e9, 10)
		first, err := e.c.Create(e.ctx(3*time.Minute), subjects.CreateSandboxRequest{TemplateID: "tiny", SandboxID: id, PublicTraffic: &private})
		if err != nil {
			t.Fatal(err)
		}
		oldToken := first.TrafficAccessToken
		if err := e.c.Kill(e.ctx(time.Minute), id); err != nil {
			t.Fatal(err)
		}
		second := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", SandboxID: id, PublicTraffic: &private})
		if second.TrafficAccessToken == oldToken {
			t.Fatal("the new sandbox got the old sandbox's token")
		}
		e.startHTTPD(id, 8000)
		if status := connect(t, e.w.ProxyAddr(), id, 8000, oldToken); status == 200 {
			t.Errorf("the killed sandbox's token opened its successor")
		}
		if status := connect(t, e.w.ProxyAddr(), id, 8000, second.TrafficAccessToken); status != 200 {
			t.Errorf("the new token: %d, want 200", status)
		}
	})

	t.Run("a forged snapshot record deletes a host directory or leaks a digest", func(t *testing.T) {
		victimDir := t.TempDir()
		secret := filepath.Join(victimDir, "secret")
		if err := os.WriteFile(secret, []byte("do not delete"), 0o600); err != nil {
			t.Fatal(err)
		}
		for _, mac := range []string{"", "v1:" + strings.Repeat("ab", 32)} {
			e.forgeSnapshotRecord("forged-1", victimDir, mac)
			_, err := e.c.Create(e.ctx(time.Minute), subjects.CreateSandboxRequest{SnapshotID: "forged-1"})
			if err == nil {
				t.Fatalf("a forged record (mac %q) was restored", mac)
			}
			if regexp.MustCompile(`[0-9a-f]{64}`).MatchString(err.Error()) || strings.Contains(err.Error(), victimDir) {
				t.Errorf("the refusal leaks a digest or a host path: %v", err)
			}
			// The worker may drop the forged record from KV, but never
			// touches a file it names.
			_ = e.c.DeleteSnapshot(e.ctx(30*time.Second), "forged-1")
			if _, serr := os.Stat(secret); serr != nil {
				t.Fatalf("the victim directory was touched: %v", serr)
			}
		}
	})

	t.Run("QEMU runs unprivileged, with seccomp, in a cgroup", func(t *testing.T) {
		pid := qemuPID(t, e.state, attacker.SandboxID)
		status := procStatus(t, pid)
		if uid := strings.Fields(status["Uid"]); len(uid) == 0 || uid[0] == "0" {
			t.Errorf("QEMU runs as uid %q", status["Uid"])
		}
		if status["Seccomp"] != "2" {
			t.Errorf("QEMU Seccomp: %q, want 2 (filter)", status["Seccomp"])
		}
		if status["NoNewPrivs"] != "1" {
			t.Errorf("QEMU NoNewPrivs: %q, want 1", status["NoNewPrivs"])
		}
		checkCgroupLimits(t, pid, attacker.Resources)
	})

	t.Run("a guest fills its console without end", func(t *testing.T) {
		// 2.5 MB, more than twice the cap, through the kernel console.
		r := e.exec(attacker.SandboxID, "head -c 2500000 /dev/zero | tr '\\0' x > /dev/console; echo done")
		if !strings.Contains(r.Stdout, "done") {
			t.Fatalf("console flood: %+v", r)
		}
		var total int64
		matches, _ := filepath.Glob(filepath.Join(e.state, "sandboxes", attacker.SandboxID, "console.log*"))
		for _, m := range matches {
			if st, err := os.Stat(m); err == nil {
				total += st.Size()
			}
		}
		if total == 0 || total > consoleCap {
			t.Errorf("console files hold %d bytes; want 1..%d", total, consoleCap)
		}
		if r := e.exec(attacker.SandboxID, "echo alive"); !strings.Contains(r.Stdout, "alive") {
			t.Errorf("sandbox after the flood: %+v", r)
		}
	})
}

// consoleCap is the driver's default cap on a machine's console files.
const consoleCap = 1 << 20

func portOf(t *testing.T, url string) int {
	t.Helper()
	i := strings.LastIndex(url, ":")
	p, err := strconv.Atoi(strings.TrimRight(url[i+1:], "/"))
	if err != nil {
		t.Fatalf("port of %q: %v", url, err)
	}
	return p
}

// connect sends CONNECT sandbox-port through the proxy and returns the status.
func connect(t *testing.T, proxyAddr, id string, port int, token string) int {
	t.Helper()
	c, err := net.DialTimeout("tcp", proxyAddr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	req := fmt.Sprintf("CONNECT %d-%s.localhost:%d HTTP/1.1\r\nHost: %d-%s.localhost\r\n", port, id, port, port, id)
	if token != "" {
		req += "e2b-traffic-access-token: " + token + "\r\n"
	}
	if _, err := fmt.Fprint(c, req+"\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: "CONNECT"})
	if err != nil {
		t.Fatalf("CONNECT reply: %v", err)
	}
	return resp.StatusCode
}

// forgeSnapshotRecord writes a snapshot record into KV as an attacker with
// KV write access would, pointing it at dir.
func (e *env) forgeSnapshotRecord(id, dir, mac string) {
	e.t.Helper()
	rec := subjects.SnapshotRecord{SnapshotID: id, Kind: subjects.KindContinuation, Location: dir,
		WorkerID: e.w.ID(), SizeBytes: 13, SHA256: strings.Repeat("0", 64), CreatedAt: time.Now().UTC(),
		Artifacts: []subjects.Artifact{{Name: "secret", SizeBytes: 13, SHA256: strings.Repeat("0", 64)}}, MAC: mac}
	data, err := json.Marshal(rec)
	if err != nil {
		e.t.Fatal(err)
	}
	nc := e.workerConn()
	js, err := nc.JetStream()
	if err != nil {
		e.t.Fatal(err)
	}
	kv, err := js.KeyValue("firkin_snapshots")
	if err != nil {
		e.t.Fatal(err)
	}
	if _, err := kv.Put(id, data); err != nil {
		e.t.Fatal(err)
	}
}

// qemuPID finds the QEMU process of sandbox id.
func qemuPID(t *testing.T, state, id string) int {
	t.Helper()
	procs := qemuProcesses(filepath.Join(state, "sandboxes", id))
	if len(procs) != 1 {
		t.Fatalf("QEMU processes of %s: %q", id, procs)
	}
	pid, err := strconv.Atoi(procs[0][:strings.IndexByte(procs[0], ':')])
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// procStatus reads /proc/pid/status into a map.
func procStatus(t *testing.T, pid int) map[string]string {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, line := range strings.Split(string(data), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			out[k] = strings.TrimSpace(v)
		}
	}
	return out
}

// checkCgroupLimits finds the firkin cgroup(s) of pid and checks memory
// (guest RAM plus a bounded overhead), CPU (its vCPUs) and pids limits.
func checkCgroupLimits(t *testing.T, pid int, res subjects.Resources) {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		t.Fatal(err)
	}
	mounts, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	// mount point of each v1 controller, and of the v2 hierarchy
	mountOf := map[string]string{}
	for _, line := range strings.Split(string(mounts), "\n") {
		f := strings.Fields(line)
		if len(f) < 4 {
			continue
		}
		switch f[2] {
		case "cgroup2":
			mountOf[""] = f[1]
		case "cgroup":
			for _, opt := range strings.Split(f[3], ",") {
				mountOf[opt] = f[1]
			}
		}
	}
	limits := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 || !strings.Contains(parts[2], "/firkin/") {
			continue
		}
		for _, ctl := range strings.Split(parts[1], ",") {
			dir := filepath.Join(mountOf[ctl], parts[2])
			var files []string
			switch ctl {
			case "":
				files = []string{"memory.max", "cpu.max", "pids.max"}
			case "memory":
				files = []string{"memory.limit_in_bytes"}
			case "cpu":
				files = []string{"cpu.cfs_quota_us", "cpu.cfs_period_us"}
			case "pids":
				files = []string{"pids.max"}
			}
			for _, f := range files {
				if b, err := os.ReadFile(filepath.Join(dir, f)); err == nil {
					limits[f] = strings.TrimSpace(string(b))
				}
			}
		}
	}
	ram := int64(res.MemoryMB) << 20
	mem := limits["memory.limit_in_bytes"]
	if v, ok := limits["memory.max"]; ok && mem == "" {
		mem = v
	}
	if n, err := strconv.ParseInt(mem, 10, 64); err != nil || n < ram || n > ram+(1<<30) {
		t.Errorf("memory limit %q for %d MiB of guest RAM (cgroup files %v)", mem, res.MemoryMB, limits)
	}
	quota, period := limits["cpu.cfs_quota_us"], limits["cpu.cfs_period_us"]
	if v, ok := limits["cpu.max"]; ok && quota == "" {
		quota, period, _ = strings.Cut(v, " ")
	}
	q, err1 := strconv.Atoi(quota)
	p, err2 := strconv.Atoi(period)
	if err1 != nil || err2 != nil || p <= 0 || q != res.VCPUs*p {
		t.Errorf("cpu limit %q/%q for %d vCPUs", quota, period, res.VCPUs)
	}
	if n, err := strconv.Atoi(limits["pids.max"]); err != nil || n <= 0 || n > 4096 {
		t.Errorf("pids limit %q", limits["pids.max"])
	}
}
