package worker_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/worker"
)

// readUntil reads r until what it read contains want (or d passes) and
// returns what it read.
func readUntil(t *testing.T, r io.Reader, want string, d time.Duration) string {
	t.Helper()
	got := make(chan string, 1)
	var seen strings.Builder
	var done = make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			n, err := r.Read(buf)
			seen.Write(buf[:n])
			if strings.Contains(seen.String(), want) {
				got <- seen.String()
				return
			}
			if err != nil {
				got <- seen.String()
				return
			}
		}
	}()
	select {
	case s := <-got:
		if !strings.Contains(s, want) {
			t.Fatalf("output ended without %q: %q", want, tail(s, 2000))
		}
		return s
	case <-time.After(d):
		t.Fatalf("no %q in the output within %s", want, d)
		return ""
	}
}

// TestProcesses drives processes through the real NATS path into a real
// guest: a background server that outlives its client, a shell on a PTY,
// signals, a slow reader, and the latency from proc.start to first output.
func TestProcesses(t *testing.T) {
	e := startWorker(t)
	sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", TimeoutS: 600})
	id := sb.SandboxID

	t.Run("background server outlives its client", func(t *testing.T) {
		nc1 := e.clientConn()
		c1 := client.New(nc1)
		p, err := c1.StartProcess(e.ctx(time.Minute), id, subjects.ProcStartRequest{
			Command:    "mkdir -p /srv && echo proc-index > /srv/index.html && echo started-web && exec httpd -f -v -p 8000 -h /srv",
			Tag:        "web",
			Background: true,
		})
		if err != nil {
			t.Fatal(err)
		}
		cmd, pid := p.ID(), p.PID()
		if pid <= 0 || subjects.ValidateCommandID(cmd) != nil {
			t.Fatalf("start reply: command %q pid %d", cmd, pid)
		}
		_ = p.Close()
		nc1.Close() // the client that started it is gone

		c2 := client.New(e.clientConn())
		list, err := c2.ListProcesses(e.ctx(time.Minute), id)
		if err != nil {
			t.Fatal(err)
		}
		var found *subjects.ProcInfo
		for i := range list {
			if list[i].CommandID == cmd {
				found = &list[i]
			}
		}
		if found == nil || found.Tag != "web" || found.State != subjects.ProcRunning || found.PID != pid || !found.Background ||
			!strings.Contains(found.Command, "httpd") || found.StartedAt.IsZero() {
			t.Fatalf("list = %+v, want running %s (pid %d, tag web)", list, cmd, pid)
		}

		// Live output on an inbox of the new client, from now on.
		inbox := nats.NewInbox()
		live, err := c2.Conn().SubscribeSync(inbox)
		if err != nil {
			t.Fatal(err)
		}
		var conn subjects.ProcConnectReply
		if err := c2.Request(e.ctx(time.Minute), subjects.Default.Sandbox(id, subjects.ProcVerb(cmd, subjects.ProcOpConnect)),
			subjects.ProcConnectRequest{OutputSubject: inbox}, &conn); err != nil {
			t.Fatal(err)
		}
		if conn.State != subjects.ProcRunning || conn.LogStream != "FIRKIN_LOGS" || conn.LogSubject != subjects.Default.Logs(id) ||
			len(conn.Live) != 2 || conn.Live[1] != inbox || !conn.ReplayFrom.Before(conn.StartedAt) {
			t.Fatalf("connect = %+v", conn)
		}
		// A live subject outside the client's inbox is refused.
		err = c2.Request(e.ctx(time.Minute), subjects.Default.Sandbox(id, subjects.ProcVerb(cmd, subjects.ProcOpConnect)),
			subjects.ProcConnectRequest{OutputSubject: "firkin.logs.x"}, nil)
		wantCode(t, "connect with a foreign output subject", err, subjects.CodeInvalidRequest)

		// The replay from the log stream starts at its first byte.
		p2, err := c2.ConnectProcess(e.ctx(time.Minute), id, cmd)
		if err != nil {
			t.Fatal(err)
		}
		defer p2.Close()
		out := p2.Output()
		readUntil(t, out, "started-web\n", time.Minute)
		if r := e.exec(id, "wget -q -O- http://127.0.0.1:8000/"); r.Stdout != "proc-index\n" {
			t.Fatalf("wget through the background server: %+v", r)
		}
		readUntil(t, out, "response:200", time.Minute)
		// Live: numbered from 1 on this subject, until the request's log
		// line (the marker may come first: the subject was added while
		// the process ran, and gets output from the moment it was added).
		var seq int
		for {
			m, err := live.NextMsg(30 * time.Second)
			if err != nil {
				t.Fatalf("live output: %v", err)
			}
			seq++
			if m.Header.Get(subjects.ProcSeqHeader) != fmt.Sprint(seq) || m.Header.Get(subjects.ProcCommandHeader) != cmd {
				t.Fatalf("live message %d: %v %q", seq, m.Header, m.Data)
			}
			if strings.Contains(string(m.Data), "response:200") {
				if m.Header.Get(subjects.ProcStreamHeader) != subjects.ProcStreamStderr {
					t.Fatalf("httpd's log on %v", m.Header)
				}
				break
			}
		}

		// TERM ends it; the exit says so, live and in the log stream.
		if err := p2.Signal(e.ctx(time.Minute), "term"); err != nil {
			t.Fatal(err)
		}
		go func() { _, _ = io.Copy(io.Discard, out) }()
		exit, err := p2.Wait(e.ctx(time.Minute))
		if err != nil || exit.Signal != "TERM" || exit.ExitCode != 128+15 || exit.CommandID != cmd {
			t.Fatalf("exit after TERM = %+v, %v", exit, err)
		}
		m, err := live.NextMsg(30 * time.Second)
		if err != nil || m.Header.Get(subjects.ProcStreamHeader) != subjects.ProcStreamExit || m.Header.Get(subjects.ProcSeqHeader) != fmt.Sprint(seq+1) {
			t.Fatalf("live exit: %v %v", m, err)
		}
		var lexit subjects.ProcExit
		if json.Unmarshal(m.Data, &lexit) != nil || lexit.Signal != "TERM" {
			t.Fatalf("live exit body %q", m.Data)
		}
		eventually(t, 30*time.Second, "listed as exited", func() error {
			list, err := c2.ListProcesses(e.ctx(time.Minute), id)
			for _, pi := range list {
				if pi.CommandID == cmd && pi.State == subjects.ProcExited && pi.Exit != nil && pi.Exit.Signal == "TERM" {
					return nil
				}
			}
			return fmt.Errorf("%+v %v", list, err)
		})
		err = c2.Request(e.ctx(time.Minute), subjects.Default.Sandbox(id, subjects.ProcVerb(cmd, subjects.ProcOpSignal)),
			subjects.ProcSignalRequest{Signal: "TERM"}, nil)
		wantCode(t, "signal an exited process", err, subjects.CodeInvalidRequest)
		// Connecting after the exit replays the whole output and the exit.
		q, err := c2.ConnectProcess(e.ctx(time.Minute), id, cmd)
		if err != nil {
			t.Fatal(err)
		}
		defer q.Close()
		all, err := io.ReadAll(q.Output())
		if err != nil || !strings.HasPrefix(string(all), "started-web\n") || !strings.Contains(string(all), "response:200") {
			t.Fatalf("replay after exit: %q, %v", all, err)
		}
		if exit, err := q.Wait(e.ctx(time.Minute)); err != nil || exit.Signal != "TERM" {
			t.Fatalf("exit replayed = %+v, %v", exit, err)
		}
	})

	t.Run("shell on a PTY with resize", func(t *testing.T) {
		p, err := e.c.StartProcess(e.ctx(time.Minute), id, subjects.ProcStartRequest{
			Command: "sh -i", PTY: &subjects.PTYSize{Cols: 80, Rows: 24}, Env: map[string]string{"PS1": "$ "},
		})
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		out := p.Output()
		in := p.Stdin()
		if _, err := io.WriteString(in, "stty size\n"); err != nil {
			t.Fatal(err)
		}
		readUntil(t, out, "24 80", time.Minute)
		if err := p.Resize(e.ctx(time.Minute), 132, 43); err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(in, "stty size; echo $((6*7))\n"); err != nil {
			t.Fatal(err)
		}
		readUntil(t, out, "42", time.Minute)
		if _, err := io.WriteString(in, "stty size\n"); err != nil {
			t.Fatal(err)
		}
		readUntil(t, out, "43 132", time.Minute)
		if _, err := io.WriteString(in, "exit 5\n"); err != nil {
			t.Fatal(err)
		}
		go func() { _, _ = io.Copy(io.Discard, out) }()
		exit, err := p.Wait(e.ctx(time.Minute))
		if err != nil || exit.ExitCode != 5 || exit.Signal != "" {
			t.Fatalf("exit = %+v, %v", exit, err)
		}
		// Resizing a process without a terminal is refused.
		q, err := e.c.StartProcess(e.ctx(time.Minute), id, subjects.ProcStartRequest{Command: "sleep 30"})
		if err != nil {
			t.Fatal(err)
		}
		wantCode(t, "resize without a pty", q.Resize(e.ctx(time.Minute), 10, 10), subjects.CodeInvalidRequest)
		if err := q.Signal(e.ctx(time.Minute), "KILL"); err != nil {
			t.Fatal(err)
		}
		if exit, err := q.Wait(e.ctx(time.Minute)); err != nil || exit.Signal != "KILL" || exit.ExitCode != 137 {
			t.Fatalf("exit after KILL = %+v, %v", exit, err)
		}
	})

	t.Run("signals end processes with their signal", func(t *testing.T) {
		for _, sig := range []string{"TERM", "INT", "HUP"} {
			p, err := e.c.StartProcess(e.ctx(time.Minute), id, subjects.ProcStartRequest{Command: "sleep", Args: []string{"1000"}})
			if err != nil {
				t.Fatal(err)
			}
			if err := p.Signal(e.ctx(time.Minute), "SIG"+sig); err != nil {
				t.Fatal(err)
			}
			exit, err := p.Wait(e.ctx(time.Minute))
			if err != nil || exit.Signal != sig || exit.ExitCode != 128+subjects.Signals[sig] {
				t.Fatalf("%s: exit = %+v, %v", sig, exit, err)
			}
			_ = p.Close()
		}
		err := e.c.Request(e.ctx(time.Minute), subjects.Default.Sandbox(id, subjects.ProcVerb("k0000000000a", subjects.ProcOpSignal)),
			subjects.ProcSignalRequest{Signal: "TERM"}, nil)
		wantCode(t, "signal an unknown process", err, subjects.CodeInvalidRequest)
	})

	t.Run("stdin in order, exec streams", func(t *testing.T) {
		p, err := e.c.StartProcess(e.ctx(time.Minute), id, subjects.ProcStartRequest{Command: "cat"})
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		out := p.Output()
		// Pipelined writes, not waiting for replies: the worker keeps their order.
		var want strings.Builder
		subj := subjects.Default.Sandbox(id, subjects.ProcVerb(p.ID(), subjects.ProcOpStdin))
		var calls []*nats.Msg
		replies := make(chan *nats.Msg, 64)
		sub, err := e.nc.ChanSubscribe(nats.NewInbox(), replies)
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Unsubscribe()
		for i := range 40 {
			line := fmt.Sprintf("line %02d\n", i)
			want.WriteString(line)
			m := &nats.Msg{Subject: subj, Reply: sub.Subject, Data: []byte(line)}
			calls = append(calls, m)
			if err := e.nc.PublishMsg(m); err != nil {
				t.Fatal(err)
			}
		}
		for range calls {
			select {
			case r := <-replies:
				if r.Header.Get("Nats-Service-Error-Code") != "" {
					t.Fatalf("stdin reply %s", r.Data)
				}
			case <-time.After(time.Minute):
				t.Fatal("stdin replies missing")
			}
		}
		if err := p.Stdin().Close(); err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(out)
		if err != nil || string(got) != want.String() {
			t.Fatalf("cat echoed %q (%v), want %q", got, err, want.String())
		}
		if exit, err := p.Wait(e.ctx(time.Minute)); err != nil || exit.ExitCode != 0 {
			t.Fatalf("exit = %+v, %v", exit, err)
		}

		// exec with stream_subject: the output live, then the exit.
		inbox := nats.NewInbox()
		live, err := e.nc.SubscribeSync(inbox)
		if err != nil {
			t.Fatal(err)
		}
		r, err := e.c.Exec(e.ctx(time.Minute), id, subjects.ExecRequest{Command: "echo streamed; exit 4", StreamSubject: inbox})
		if err != nil || r.ExitCode != 4 || r.Stdout != "streamed\n" {
			t.Fatalf("exec = %+v, %v", r, err)
		}
		m1, err1 := live.NextMsg(10 * time.Second)
		m2, err2 := live.NextMsg(10 * time.Second)
		if err1 != nil || err2 != nil || string(m1.Data) != "streamed\n" || m2.Header.Get(subjects.ProcStreamHeader) != subjects.ProcStreamExit {
			t.Fatalf("exec stream: %v %v %v %v", m1, err1, m2, err2)
		}
		_, err = e.c.Exec(e.ctx(time.Minute), id, subjects.ExecRequest{Command: "true", StreamSubject: "firkin.events.x"})
		wantCode(t, "exec with a foreign stream subject", err, subjects.CodeInvalidRequest)
	})

	t.Run("output goes on across a snapshot", func(t *testing.T) {
		// The snapshot drops the agent session and starts another one: the
		// process runs on, and its output reaches the log stream whole.
		p, err := e.c.StartProcess(e.ctx(time.Minute), id, subjects.ProcStartRequest{
			Command: "i=0; while [ $i -lt 60 ]; do echo tick $i; i=$((i+1)); sleep 0.05; done",
		})
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		out := p.Output()
		readUntil(t, out, "tick 3\n", time.Minute)
		rec, err := e.c.Snapshot(e.ctx(3*time.Minute), id, subjects.SnapshotRequest{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = e.c.DeleteSnapshot(context.Background(), rec.SnapshotID) })
		rest, err := io.ReadAll(out)
		if err != nil {
			t.Fatal(err)
		}
		if exit, err := p.Wait(e.ctx(time.Minute)); err != nil || exit.ExitCode != 0 {
			t.Fatalf("exit = %+v, %v", exit, err)
		}
		if missing := missingTicks(t, "tick 0\ntick 1\ntick 2\ntick 3\n"+string(rest), 60); len(missing) > 0 {
			t.Fatalf("ticks lost across the snapshot: %v", missing)
		}
	})

	t.Run("latency of proc.start to first output", func(t *testing.T) {
		live, err := e.nc.SubscribeSync(subjects.Default.ProcAll())
		if err != nil {
			t.Fatal(err)
		}
		defer live.Unsubscribe()
		var viaLive, viaLog []time.Duration
		for range 10 {
			t0 := time.Now()
			p, err := e.c.StartProcess(e.ctx(time.Minute), id, subjects.ProcStartRequest{Command: "echo hi"})
			if err != nil {
				t.Fatal(err)
			}
			for {
				m, err := live.NextMsg(30 * time.Second)
				if err != nil {
					t.Fatal(err)
				}
				if m.Header.Get(subjects.ProcCommandHeader) == p.ID() && m.Header.Get(subjects.ProcStreamHeader) == subjects.ProcStreamStdout {
					viaLive = append(viaLive, time.Since(t0))
					break
				}
			}
			readUntil(t, p.Output(), "hi\n", time.Minute)
			viaLog = append(viaLog, time.Since(t0))
			_ = p.Close()
		}
		t.Logf("proc.start → first output: live subject p50 %s max %s; log stream (client Output) p50 %s max %s",
			p50(viaLive), slicesMax(viaLive), p50(viaLog), slicesMax(viaLog))
	})
}

func p50(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2].Round(100 * time.Microsecond)
}

func slicesMax(d []time.Duration) time.Duration {
	m := time.Duration(0)
	for _, x := range d {
		m = max(m, x)
	}
	return m.Round(100 * time.Microsecond)
}

// TestProcessSlowReaders: a process printing 40 MiB, read by a live
// subscriber that never reads and by a client that stalls and then reads
// slowly, loses nothing and does not grow the worker's heap by its output
// (NATS runs in a child process, so this heap is the worker's and the
// test's client).
func TestProcessSlowReaders(t *testing.T) {
	url := startNATSChild(t)
	e := startWorker(t, func(c *worker.Config) { c.NATSURL = url })
	id := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"}).SandboxID
	const total = 40 << 20
	// A live reader that never reads, with small pending limits.
	stalled, err := e.clientConn().SubscribeSync(subjects.Default.ProcAll())
	if err != nil {
		t.Fatal(err)
	}
	_ = stalled.SetPendingLimits(16, 256<<10)
	// A lower GC target makes the heap track what is live.
	defer debug.SetGCPercent(debug.SetGCPercent(25))
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base := ms.HeapInuse
	p, err := e.c.StartProcess(e.ctx(time.Minute), id, subjects.ProcStartRequest{
		Command: fmt.Sprintf("yes 0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ | head -c %d", total),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	out := p.Output()
	peak := uint64(0)
	sample := func() {
		runtime.ReadMemStats(&ms)
		peak = max(peak, ms.HeapInuse)
	}
	// The reader stalls for a while first, then reads slowly.
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		sample()
		time.Sleep(100 * time.Millisecond)
	}
	br := bufio.NewReaderSize(out, 64<<10)
	n, buf := 0, make([]byte, 32<<10)
	start := time.Now()
	for i := 0; ; i++ {
		k, err := br.Read(buf)
		n += k
		if i%32 == 0 {
			sample()
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	exit, err := p.Wait(e.ctx(time.Minute))
	if err != nil || exit.ExitCode != 0 || exit.LogsDroppedBytes != 0 {
		t.Fatalf("exit = %+v, %v", exit, err)
	}
	if n != total {
		t.Fatalf("read %d bytes, want %d: output lost", n, total)
	}
	growth := int64(peak) - int64(base)
	t.Logf("%d MiB through a stalled live reader and a slow log reader in %s; heap in use grew by at most %d MiB",
		total>>20, time.Since(start).Round(time.Millisecond), growth>>20)
	if growth > 24<<20 { // the output, kept, would be 40 MiB and more
		t.Fatalf("heap in use grew by %d MiB while %d MiB of output flowed", growth>>20, total>>20)
	}
	if dropped, _ := stalled.Dropped(); dropped == 0 {
		t.Logf("the stalled live reader dropped nothing (it kept up?)")
	}
}

// missingTicks checks that out is lines "tick <n>" in increasing order and
// returns the numbers below total that are not there.
func missingTicks(t *testing.T, out string, total int) []int {
	t.Helper()
	seen := map[int]bool{}
	last := -1
	for _, line := range strings.Split(strings.TrimSuffix(out, "\n"), "\n") {
		var n int
		if _, err := fmt.Sscanf(line, "tick %d", &n); err != nil {
			t.Fatalf("unexpected output line %q", line)
		}
		if n <= last {
			t.Fatalf("tick %d after tick %d: out of order", n, last)
		}
		seen[n], last = true, n
	}
	var missing []int
	for i := range total {
		if !seen[i] {
			missing = append(missing, i)
		}
	}
	return missing
}

// TestProcessAfterWorkerRestart kills the worker with SIGKILL while a
// background process runs: the restarted worker reattaches the sandbox,
// follows the process again, and a new client lists it and reads its
// output from the start, what it printed while no worker ran included.
func TestProcessAfterWorkerRestart(t *testing.T) {
	testenv.RequireQEMU(t, runtime.GOARCH)
	agentBin := testenv.AgentBinary(t, runtime.GOARCH)
	bin := workerBinary(t)
	state := t.TempDir()
	natsAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	args := []string{"--state-dir", state, "--nats-listen", natsAddr, "--proxy-listen", "127.0.0.1:0",
		"--agent", agentBin, "--accel", "tcg", "--pool", "tiny=0", "--keep-machines"}
	shareDebCache(t, state)
	t.Cleanup(func() { killMachines(state) })
	first := startBinary(t, bin, args...)
	connect := func() *client.Client {
		nc, err := nats.Connect("nats://"+natsAddr, client.NkeyFile(filepath.Join(state, "client.nk")))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		return client.New(nc)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c1 := connect()
	sb, err := c1.Create(ctx, subjects.CreateSandboxRequest{TemplateID: "tiny"})
	if err != nil {
		t.Fatal(err)
	}
	const total = 100
	p, err := c1.StartProcess(ctx, sb.SandboxID, subjects.ProcStartRequest{
		Command: fmt.Sprintf("i=0; while [ $i -lt %d ]; do echo tick $i; i=$((i+1)); sleep 0.1; done", total), Tag: "ticker", Background: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	readUntil(t, p.Output(), "tick 5\n", time.Minute)
	_ = p.Close()
	c1.Conn().Close()

	_ = first.cmd.Process.Kill() // crash, with the process running
	<-first.done
	time.Sleep(time.Second) // the process goes on printing with no worker
	startBinary(t, bin, args...)

	c2 := connect()
	list, err := c2.ListProcesses(ctx, sb.SandboxID)
	if err != nil || len(list) != 1 || list[0].CommandID != p.ID() || list[0].Tag != "ticker" || list[0].PID != p.PID() {
		t.Fatalf("list after the restart = %+v, %v", list, err)
	}
	q, err := c2.ConnectProcess(ctx, sb.SandboxID, p.ID())
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	all, err := io.ReadAll(q.Output())
	if err != nil {
		t.Fatal(err)
	}
	exit, err := q.Wait(ctx)
	if err != nil || exit.ExitCode != 0 {
		t.Fatalf("exit = %+v, %v", exit, err)
	}
	// What the crashed worker had taken from the guest but not yet stored
	// is lost (at most a chunk or two); the rest is there, in order.
	missing := missingTicks(t, string(all), total)
	t.Logf("ticks missing across the crash: %v", missing)
	if len(missing) > 2 {
		t.Fatalf("%d ticks lost across the worker's crash: %v", len(missing), missing)
	}
	if err := c2.Kill(ctx, sb.SandboxID); err != nil {
		t.Fatal(err)
	}
}
