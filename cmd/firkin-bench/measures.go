package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/worker"
)

// coldBoot is (a): a create that boots the tiny image, to first stdout.
func (b *bench) coldBoot() (Result, error) {
	var samples []float64
	for range b.n {
		d, src, err := b.firstStdout(subjects.CreateSandboxRequest{TemplateID: "tiny", ColdBoot: true})
		if err != nil {
			return Result{}, err
		}
		if src != subjects.SourceBoot {
			return Result{}, fmt.Errorf("cold boot create came from %s", src)
		}
		samples = append(samples, ms(d))
	}
	return summarize("(a) cold boot create -> first stdout", "ms", samples, "", nil), nil
}

// restoreCreate is (b): a create restored from the template snapshot with an
// empty pool, to first stdout.
func (b *bench) restoreCreate() (Result, error) {
	if _, err := b.c.SetPool(b.ctx, "tiny", 0); err != nil {
		return Result{}, err
	}
	var samples []float64
	for range b.n {
		d, src, err := b.firstStdout(subjects.CreateSandboxRequest{TemplateID: "tiny"})
		if err != nil {
			return Result{}, err
		}
		if src != subjects.SourceRestore {
			return Result{}, fmt.Errorf("restore create came from %s", src)
		}
		samples = append(samples, ms(d))
	}
	return summarize("(b) restore create (empty pool) -> first stdout", "ms", samples, "p50 <= 300",
		func(r Result) bool { return r.P50 <= 300 }), nil
}

// poolCreate is (c): a create served by the warm pool, to first stdout. The
// pool is allowed to refill between samples.
func (b *bench) poolCreate() (Result, error) {
	if _, err := b.c.SetPool(b.ctx, "tiny", 2); err != nil {
		return Result{}, err
	}
	var samples []float64
	for range b.n {
		if err := b.waitPool("tiny", 2); err != nil {
			return Result{}, err
		}
		d, src, err := b.firstStdout(subjects.CreateSandboxRequest{TemplateID: "tiny"})
		if err != nil {
			return Result{}, err
		}
		if src != subjects.SourcePool {
			return Result{}, fmt.Errorf("pool create came from %s", src)
		}
		samples = append(samples, ms(d))
	}
	return summarize("(c) pool create -> first stdout", "ms", samples, "p50 <= 25, p95 <= 40",
		func(r Result) bool { return r.P50 <= 25 && r.P95 <= 40 }), nil
}

func (b *bench) waitPool(tid string, ready int) error {
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		st, err := b.c.PoolStatus(b.ctx)
		if err != nil {
			return err
		}
		for _, t := range st.Templates {
			if t.TemplateID == tid && t.Ready >= ready {
				return nil
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("pool of %s did not reach %d ready", tid, ready)
}

// withSandbox runs fn with a fresh tiny sandbox and kills it afterwards.
func (b *bench) withSandbox(fn func(id string) error) error {
	ctx, cancel := context.WithTimeout(b.ctx, 3*time.Minute)
	defer cancel()
	sb, err := b.c.Create(ctx, subjects.CreateSandboxRequest{TemplateID: "tiny"})
	if err != nil {
		return err
	}
	defer func() { _ = b.c.Kill(context.Background(), sb.SandboxID) }()
	return fn(sb.SandboxID)
}

// execRoundTrip is (d): exec of `echo hi` in a running sandbox.
func (b *bench) execRoundTrip(n int) (Result, error) {
	return b.execRoundTripOf(n, "(d) exec round trip (echo hi)", subjects.ExecRequest{Command: "echo hi"})
}

// execArgvRoundTrip is (r): exec of echo with argv ["hi"], no shell.
func (b *bench) execArgvRoundTrip(n int) (Result, error) {
	return b.execRoundTripOf(n, "(r) exec round trip, argv (echo [hi], no shell)", subjects.ExecRequest{Command: "echo", Args: []string{"hi"}})
}

// execPaced is (s): exec of echo hi with a pause between commands, as an
// agent or a person uses a sandbox (think, run, read, think), rather than
// back to back as (d) does: work the guest does between commands (the
// warm shells' start-up) is off the measured path here, and on it in (d).
func (b *bench) execPaced(n int, pause time.Duration) (Result, error) {
	return b.execRoundTripPaced(n, fmt.Sprintf("(s) exec round trip (echo hi), %s apart", pause), subjects.ExecRequest{Command: "echo hi"}, pause)
}

func (b *bench) execRoundTripOf(n int, name string, req subjects.ExecRequest) (Result, error) {
	return b.execRoundTripPaced(n, name, req, 0)
}

func (b *bench) execRoundTripPaced(n int, name string, req subjects.ExecRequest, pause time.Duration) (Result, error) {
	var samples []float64
	var inGuest int64 // the reply's duration_ms: the guest call as the worker timed it
	err := b.withSandbox(func(id string) error {
		for i := 0; i < n+10; i++ { // the first few warm the translation cache
			time.Sleep(pause)
			start := time.Now()
			r, err := b.c.Exec(b.ctx, id, req)
			if err != nil {
				return err
			}
			if r.Stdout != "hi\n" {
				return fmt.Errorf("echo hi gave %q", r.Stdout)
			}
			if i >= 10 {
				samples = append(samples, ms(time.Since(start)))
				inGuest += r.DurationMS
			}
		}
		return nil
	})
	name = fmt.Sprintf("%s (guest call mean %.1f ms)", name, float64(inGuest)/float64(max(len(samples), 1)))
	return summarize(name, "ms", samples, "p50 <= 5, p95 <= 10", func(r Result) bool { return r.P50 <= 5 && r.P95 <= 10 }), err
}

// snapshotSave is (e): a continuation snapshot of a running sandbox.
func (b *bench) snapshotSave() (Result, error) {
	var samples []float64
	err := b.withSandbox(func(id string) error {
		for i := range b.n {
			name := fmt.Sprintf("bench-%d-%d", time.Now().UnixNano(), i)
			start := time.Now()
			if _, err := b.c.Snapshot(b.ctx, id, subjects.SnapshotRequest{Name: name}); err != nil {
				return err
			}
			samples = append(samples, ms(time.Since(start)))
			defer func() { _ = b.c.DeleteSnapshot(context.Background(), name) }()
		}
		return nil
	})
	return summarize("(e) continuation snapshot save", "ms", samples, "p95 <= 200", func(r Result) bool { return r.P95 <= 200 }), err
}

// idleRSS is (f): the host memory of idle sandboxes' QEMU processes, as PSS
// (shared template pages counted once across the clones).
func (b *bench) idleRSS() (Result, error) {
	const count = 4
	var ids []string
	defer func() {
		for _, id := range ids {
			_ = b.c.Kill(context.Background(), id)
		}
	}()
	if _, err := b.c.SetPool(b.ctx, "tiny", 0); err != nil {
		return Result{}, err
	}
	for range count {
		sb, err := b.c.Create(b.ctx, subjects.CreateSandboxRequest{TemplateID: "tiny"})
		if err != nil {
			return Result{}, err
		}
		ids = append(ids, sb.SandboxID)
		if _, err := b.c.Exec(b.ctx, sb.SandboxID, subjects.ExecRequest{Command: "true"}); err != nil {
			return Result{}, err
		}
	}
	time.Sleep(2 * time.Second) // idle
	var samples []float64
	for _, id := range ids {
		sb, err := b.c.Get(b.ctx, id)
		if err != nil {
			return Result{}, err
		}
		pid, err := qemuPID(sb.Dir)
		if err != nil {
			return Result{}, err
		}
		pss, err := pssKiB(pid)
		if err != nil {
			return Result{}, err
		}
		samples = append(samples, float64(pss)/1024)
	}
	return summarize("(f) host PSS per idle sandbox", "MiB", samples, "<= 48", func(r Result) bool { return r.P95 <= 48 }), nil
}

// natsFloor is (g): a raw request round trip from the client connection to
// an echo responder on the worker's service identity (clients may only
// request firkin.>, and only the worker's service connection may serve it).
func (b *bench) natsFloor(n int) (Result, error) {
	var opts []nats.Option
	if b.w.ClientNkeyFile() != "" {
		opts = append(opts, client.NkeyFile(filepath.Join(b.stateDir, worker.ServiceSeedFile)))
	}
	responder, err := nats.Connect(b.w.NATSURL(), opts...)
	if err != nil {
		return Result{}, err
	}
	defer responder.Close()
	sub, err := responder.Subscribe("firkin.bench.echo", func(m *nats.Msg) { _ = m.Respond(m.Data) })
	if err != nil {
		return Result{}, err
	}
	defer sub.Unsubscribe()
	if err := responder.Flush(); err != nil {
		return Result{}, err
	}
	var samples []float64
	for i := 0; i < n+10; i++ {
		start := time.Now()
		if _, err := b.nc.Request("firkin.bench.echo", []byte("hi"), 5*time.Second); err != nil {
			return Result{}, err
		}
		if i >= 10 {
			samples = append(samples, ms(time.Since(start)))
		}
	}
	return summarize("(g) raw NATS request round trip", "ms", samples, "", nil), nil
}

// proxyThroughput is (h): requests through the port proxy to busybox httpd
// in a sandbox, against the same server fetched inside the guest with wget.
func (b *bench) proxyThroughput() (Result, error) {
	var res Result
	err := b.withSandbox(func(id string) error {
		if _, err := b.c.Exec(b.ctx, id, subjects.ExecRequest{Command: "mkdir -p /srv && echo hello > /srv/index.html && httpd -p 8000 -h /srv"}); err != nil {
			return err
		}
		route, err := b.c.Route(b.ctx, id, 8000)
		if err != nil {
			return err
		}
		hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
		// Dial the proxy by address and route by Host: *.localhost need not
		// resolve on every host.
		proxyURL := "http://127.0.0.1:" + route.URL[strings.LastIndex(route.URL, ":")+1:] + "/"
		get := func() error {
			req, _ := http.NewRequest("GET", proxyURL, nil)
			req.Host = route.Host
			resp, err := hc.Do(req)
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			if _, err := io.Copy(io.Discard, resp.Body); err != nil {
				return err
			}
			if resp.StatusCode != 200 {
				return fmt.Errorf("proxy answered %s", resp.Status)
			}
			return nil
		}
		for range 10 {
			if err := get(); err != nil {
				return err
			}
		}
		var samples []float64
		for range 200 {
			start := time.Now()
			if err := get(); err != nil {
				return err
			}
			samples = append(samples, ms(time.Since(start)))
		}
		// Throughput with 8 clients for 3 s.
		var mu sync.Mutex
		count := 0
		stop := time.Now().Add(3 * time.Second)
		var wg sync.WaitGroup
		for range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for time.Now().Before(stop) {
					if get() == nil {
						mu.Lock()
						count++
						mu.Unlock()
					}
				}
			}()
		}
		wg.Wait()
		// The same server from inside the guest: 50 wget fetches in one exec.
		r, err := b.c.Exec(b.ctx, id, subjects.ExecRequest{Command: "time sh -c 'i=0; while [ $i -lt 50 ]; do wget -q -O /dev/null http://127.0.0.1:8000/; i=$((i+1)); done'"})
		if err != nil {
			return err
		}
		inGuestUS := parseTimeReal(r.Stderr) * 1e6 / 50
		res = summarize(fmt.Sprintf("(h) HTTP GET through the proxy (%.0f req/s with 8 clients; wget inside the guest %.2f ms/req)",
			float64(count)/3, inGuestUS/1000), "ms", samples, "", nil)
		return nil
	})
	return res, err
}

func qemuPID(dir string) (int, error) {
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmd, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(cmd), "qemu-system") && strings.Contains(string(cmd), dir) {
			return pid, nil
		}
	}
	return 0, fmt.Errorf("no QEMU process for %s", dir)
}

func pssKiB(pid int) (int, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) >= 2 && fields[0] == "Pss:" {
			return strconv.Atoi(fields[1])
		}
	}
	return 0, fmt.Errorf("no Pss in smaps_rollup of %d", pid)
}

// parseTimeReal reads busybox time's "real\t0m 1.23s" line, in seconds.
func parseTimeReal(out string) float64 {
	for _, line := range strings.Split(out, "\n") {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(line), "real"); ok {
			var m, sec float64
			if _, err := fmt.Sscanf(strings.TrimSpace(rest), "%fm %fs", &m, &sec); err == nil {
				return m*60 + sec
			}
		}
	}
	return 0
}

// outputThroughput is (i): a command printing 30 MB (`yes | head -c
// 30000000`), timed from request to reply, which comes once every byte is
// stored in FIRKIN_LOGS; in MB/s. The name also gives how fast the guest
// makes that output with nobody reading it (to /dev/null).
func (b *bench) outputThroughput() (Result, error) {
	const total = 30_000_000
	var samples []float64
	var inGuest float64
	err := b.withSandbox(func(id string) error {
		r, err := b.c.Exec(b.ctx, id, subjects.ExecRequest{Command: fmt.Sprintf("time sh -c 'yes | head -c %d >/dev/null'", total)})
		if err != nil {
			return err
		}
		if s := parseTimeReal(r.Stderr); s > 0 {
			inGuest = total / s / 1e6
		}
		for range max(b.n/3, 3) {
			start := time.Now()
			r, err := b.c.Exec(b.ctx, id, subjects.ExecRequest{Command: fmt.Sprintf("yes | head -c %d", total), TimeoutMS: 600_000})
			if err != nil {
				return err
			}
			if r.ExitCode != 0 || r.LogsDroppedBytes != 0 {
				return fmt.Errorf("yes | head: exit %d, %d bytes not in the log stream", r.ExitCode, r.LogsDroppedBytes)
			}
			samples = append(samples, total/time.Since(start).Seconds()/1e6)
		}
		return nil
	})
	return summarize(fmt.Sprintf("(i) exec output into FIRKIN_LOGS, 30 MB (guest alone %.0f MB/s)", inGuest), "MB/s", samples, "p50 >= 50",
		func(r Result) bool { return r.P50 >= 50 }), err
}
