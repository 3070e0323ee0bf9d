//go:build linux

package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/agent"
	"github.com/firkin-dev/firkin-worker/internal/testenv"
)

// consoleBuffer collects the guest console.
type consoleBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *consoleBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *consoleBuffer) tail() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.buf.String()
	if len(s) > 3000 {
		s = s[len(s)-3000:]
	}
	return s
}

// vm is one QEMU process running the real image with the current agent.
type vm struct {
	cmd     *exec.Cmd
	exited  chan struct{}
	console *consoleBuffer
	sock    string // agent channel
	qmp     string // QMP socket
}

// staticNet is the kernel command line for QEMU's user network.
const staticNet = "firkin.ip=10.0.2.15/24 firkin.gw=10.0.2.2 firkin.dns=10.0.2.3"

// vmArgs are the QEMU arguments for a machine whose files live in dir, with
// network (firkin.* keys) on the kernel command line; a restore uses the
// same ones plus -incoming.
func vmArgs(t *testing.T, arch, dir, network string) []string {
	t.Helper()
	img := testenv.Image(t, arch)
	overlay := filepath.Join(dir, "root.qcow2")
	if _, err := os.Stat(overlay); err != nil {
		b, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", img.RootDisk, overlay).CombinedOutput()
		if err != nil {
			t.Fatalf("qemu-img: %v %s", err, b)
		}
	}
	machine, console := "q35", "ttyS0"
	if arch == "arm64" {
		machine, console = "virt", "ttyAMA0"
	}
	return []string{"-M", machine, "-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1",
		"-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot", "-nodefaults",
		"-kernel", img.Kernel, "-initrd", img.Initramfs,
		"-append", "console=" + console + " panic=-1 loglevel=4 " + network,
		"-drive", "if=none,id=root,format=qcow2,file=" + overlay,
		"-device", "virtio-blk-pci,drive=root",
		"-device", "virtio-serial-pci",
		"-chardev", "socket,id=agent,path=" + filepath.Join(dir, "agent.sock") + ",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name=firkin.agent",
		"-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0",
		"-qmp", "unix:" + filepath.Join(dir, "qmp.sock") + ",server=on,wait=off",
	}
}

// startVM starts QEMU with args and kills it when the test ends.
func startVM(t *testing.T, arch, dir string, args []string) *vm {
	t.Helper()
	qemu := testenv.RequireQEMU(t, arch)
	v := &vm{exited: make(chan struct{}), console: &consoleBuffer{},
		sock: filepath.Join(dir, "agent.sock"), qmp: filepath.Join(dir, "qmp.sock")}
	os.Remove(v.sock)
	os.Remove(v.qmp)
	v.cmd = exec.Command(qemu, args...)
	v.cmd.Stdout, v.cmd.Stderr = v.console, v.console
	v.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := v.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = v.cmd.Wait(); close(v.exited) }()
	t.Cleanup(func() {
		v.kill()
		if t.Failed() {
			t.Logf("guest console tail:\n%s", v.console.tail())
		}
	})
	return v
}

func (v *vm) kill() {
	_ = v.cmd.Process.Kill()
	<-v.exited
}

// dial connects to a unix socket of the VM, waiting for QEMU to make it.
func (v *vm) dial(t *testing.T, path string) net.Conn {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("unix", path)
		if err == nil {
			t.Cleanup(func() { c.Close() })
			return c
		}
		select {
		case <-v.exited:
			t.Fatalf("qemu exited; console:\n%s", v.console.tail())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no socket %s: %v", path, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// tempDir returns a short private directory (unix socket paths are limited).
func tempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "fa-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// bootVM boots the real image with the current agent under TCG and returns
// the host end of the agent channel.
func bootVM(t *testing.T, arch, network string) (*vm, net.Conn) {
	t.Helper()
	dir := tempDir(t)
	v := startVM(t, arch, dir, vmArgs(t, arch, dir, network))
	return v, v.dial(t, v.sock)
}

// qmp runs QMP commands on the VM.
type qmp struct {
	conn net.Conn
	dec  *json.Decoder
}

func (v *vm) qmpConnect(t *testing.T) *qmp {
	t.Helper()
	c := v.dial(t, v.qmp)
	q := &qmp{conn: c, dec: json.NewDecoder(c)}
	var greeting map[string]any
	if err := q.dec.Decode(&greeting); err != nil {
		t.Fatalf("qmp greeting: %v", err)
	}
	q.run(t, "qmp_capabilities", nil)
	return q
}

// run executes one command and returns its "return" value, skipping events.
func (q *qmp) run(t *testing.T, cmd string, args any) json.RawMessage {
	t.Helper()
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	if err := json.NewEncoder(q.conn).Encode(req); err != nil {
		t.Fatalf("qmp %s: %v", cmd, err)
	}
	_ = q.conn.SetReadDeadline(time.Now().Add(60 * time.Second))
	for {
		var msg struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Desc string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := q.dec.Decode(&msg); err != nil {
			t.Fatalf("qmp %s: %v", cmd, err)
		}
		if msg.Event != "" {
			continue
		}
		if msg.Error != nil {
			t.Fatalf("qmp %s: %s", cmd, msg.Error.Desc)
		}
		return msg.Return
	}
}

func execOut(t *testing.T, c *agent.Client, req agent.ExecRequest) (string, agent.ExecResult) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var mu sync.Mutex
	var b strings.Builder
	res, err := c.Exec(ctx, req, func(_ agent.Stream, p []byte) {
		mu.Lock()
		b.Write(p)
		mu.Unlock()
	})
	if err != nil {
		t.Fatalf("Exec(%q): %v", req.Command, err)
	}
	mu.Lock()
	defer mu.Unlock()
	return b.String(), res
}

func TestAgentInVM(t *testing.T) {
	v, conn := bootVM(t, "amd64", "firkin.ip=dhcp")
	console := v.console
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	c, err := agent.Connect(ctx, conn)
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	t.Logf("agent answered %v after QEMU start", time.Since(start).Round(time.Millisecond))
	if !strings.Contains(console.tail(), "firkin-agent: ready") {
		t.Errorf("no ready line on the console")
	}

	entropy := make([]byte, 64)
	_, _ = rand.Read(entropy)
	when := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	if err := c.Init(ctx, agent.InitRequest{SandboxID: "vmtest", Hostname: "vmtest", Env: map[string]string{"GREETING": "hi"},
		UnixNano: when.UnixNano(), Entropy: entropy}); err != nil {
		t.Fatalf("Init: %v", err)
	}
	out, res := execOut(t, c, agent.ExecRequest{Command: `echo $GREETING; hostname; date -u +%Y; id -u nobody >/dev/null 2>&1 && echo hasnobody; cat /proc/mounts | cut -d' ' -f2 | sort | tr '\n' ' '`})
	t.Logf("exec: %q %+v", out, res)
	if !strings.HasPrefix(out, "hi\nvmtest\n2030\n") {
		t.Errorf("exec output %q", out)
	}

	// The network came up by DHCP: the guest reaches a listener on the
	// host through QEMU's user network (10.0.2.2 is the host).
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make(chan string, 1)
	go func() {
		s, err := l.Accept()
		if err != nil {
			return
		}
		defer s.Close()
		_ = s.SetReadDeadline(time.Now().Add(20 * time.Second))
		b, _ := io.ReadAll(s)
		got <- string(b)
	}()
	out, _ = execOut(t, c, agent.ExecRequest{Command: fmt.Sprintf("cat /etc/resolv.conf; echo from-guest | nc 10.0.2.2 %d", l.Addr().(*net.TCPAddr).Port)})
	if !strings.Contains(out, "nameserver 10.0.2.3") {
		t.Errorf("resolv.conf from DHCP: %q", out)
	}
	select {
	case b := <-got:
		if b != "from-guest\n" {
			t.Errorf("host got %q from the guest", b)
		}
	case <-time.After(20 * time.Second):
		t.Errorf("no connection from the guest (network down?): %q", out)
	}

	// Round trips: a trivial command, and a ping.
	const n = 20
	t0 := time.Now()
	for range n {
		execOut(t, c, agent.ExecRequest{Command: "true"})
	}
	perExec := time.Since(t0) / n
	t0 = time.Now()
	for range n {
		if err := c.Ping(ctx); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("exec of true: %v; ping: %v (mean of %d, TCG)", perExec.Round(time.Microsecond), (time.Since(t0) / n).Round(time.Microsecond), n)

	// Orphans are reaped by PID 1.
	out, _ = execOut(t, c, agent.ExecRequest{Command: `(sleep 0.2 &) ; sleep 1; grep -l '^State:.*Z' /proc/[0-9]*/status 2>/dev/null | wc -l`})
	if strings.TrimSpace(out) != "0" {
		t.Errorf("zombies in the guest: %q", out)
	}

	// Timeout and exit codes in the guest.
	_, res = execOut(t, c, agent.ExecRequest{Command: "sleep 100", Timeout: 500 * time.Millisecond})
	if !res.TimedOut {
		t.Errorf("timeout: %+v", res)
	}

	// DialGuest reaches a server inside the guest through loopback.
	_, _ = execOut(t, c, agent.ExecRequest{Command: "busybox nc -ll -p 7000 -e /bin/cat", Detach: true})
	var gc net.Conn
	deadline := time.Now().Add(10 * time.Second)
	for {
		gc, err = c.DialGuest(ctx, 7000)
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("DialGuest: %v", err)
	}
	fmt.Fprintf(gc, "through the guest\n")
	_ = gc.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, len("through the guest\n"))
	if _, err := io.ReadFull(gc, buf); err != nil || string(buf) != "through the guest\n" {
		t.Errorf("echo through the guest: %q %v", buf, err)
	}
	gc.Close()

	// Quiesce, then a new session on the same conn.
	if err := c.Quiesce(ctx); err != nil {
		t.Fatalf("Quiesce: %v", err)
	}
	t0 = time.Now()
	c2, err := agent.Connect(ctx, conn)
	if err != nil {
		t.Fatalf("Connect after Quiesce: %v", err)
	}
	t.Logf("new session in %v", time.Since(t0))
	out, _ = execOut(t, c2, agent.ExecRequest{Command: "echo again"})
	if out != "again\n" {
		t.Errorf("after reconnect: %q", out)
	}
	// Files.
	if err := c2.WriteFile(ctx, "/root/x/y.txt", []byte("data"), 0); err != nil {
		t.Fatalf("WriteFile: %v", err)
	}
	if b, err := c2.ReadFile(ctx, "/root/x/y.txt"); err != nil || string(b) != "data" {
		t.Errorf("ReadFile: %q %v", b, err)
	}

	// A polite stop: QEMU exits by itself.
	t0 = time.Now()
	if err := c2.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	select {
	case <-v.exited:
		t.Logf("guest powered off in %v", time.Since(t0).Round(time.Millisecond))
	case <-time.After(30 * time.Second):
		t.Fatal("QEMU still running 30 s after Shutdown")
	}
}

// TestAgentSurvivesRestore saves a guest with QMP migrate, restores it in a
// new QEMU and starts a new session on the new channel: after a Quiesce (the
// normal way), and without one (the host lost the session: the guest must
// notice the old channel's end and wait for a hello).
func TestAgentSurvivesRestore(t *testing.T) {
	for _, quiesce := range []bool{true, false} {
		t.Run(fmt.Sprintf("quiesce=%v", quiesce), func(t *testing.T) { testRestore(t, quiesce) })
	}
}

func testRestore(t *testing.T, quiesce bool) {
	dir := tempDir(t)
	args := vmArgs(t, "amd64", dir, staticNet)
	v := startVM(t, "amd64", dir, args)
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	c, err := agent.Connect(ctx, v.dial(t, v.sock))
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	// State that must survive: a file in tmpfs and a detached process.
	execOut(t, c, agent.ExecRequest{Command: "echo before > /tmp/state; sleep 1000 >/dev/null 2>&1 &"})
	if quiesce {
		if err := c.Quiesce(ctx); err != nil {
			t.Fatalf("Quiesce: %v", err)
		}
	}
	q := v.qmpConnect(t)
	q.run(t, "stop", nil)
	state := filepath.Join(dir, "state")
	t0 := time.Now()
	q.run(t, "migrate", map[string]any{"uri": "exec:cat > " + state})
	for {
		var st struct {
			Status string `json:"status"`
		}
		_ = json.Unmarshal(q.run(t, "query-migrate", nil), &st)
		if st.Status == "completed" {
			break
		}
		if st.Status == "failed" || time.Now().After(t0.Add(60*time.Second)) {
			t.Fatalf("migrate: %s", st.Status)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("saved in %v", time.Since(t0).Round(time.Millisecond))
	v.kill()

	t0 = time.Now()
	r := startVM(t, "amd64", dir, append(args, "-incoming", "exec:cat "+state))
	conn := r.dial(t, r.sock)
	// The source was stopped, so the restored machine stays paused until
	// cont, which is only accepted once the incoming migration is done.
	rq := r.qmpConnect(t)
	for {
		var st struct {
			Status string `json:"status"`
		}
		_ = json.Unmarshal(rq.run(t, "query-status", nil), &st)
		if st.Status != "inmigrate" {
			break
		}
		if time.Since(t0) > 60*time.Second {
			t.Fatalf("restore still %s", st.Status)
		}
		time.Sleep(10 * time.Millisecond)
	}
	rq.run(t, "cont", nil)
	c2, err := agent.Connect(ctx, conn)
	if err != nil {
		t.Fatalf("Connect to the restored guest: %v", err)
	}
	t.Logf("restored guest answered in %v", time.Since(t0).Round(time.Millisecond))
	when := time.Now()
	if err := c2.Init(ctx, agent.InitRequest{SandboxID: "restored", Hostname: "restored", UnixNano: when.UnixNano()}); err != nil {
		t.Fatalf("Init: %v", err)
	}
	out, _ := execOut(t, c2, agent.ExecRequest{Command: "cat /tmp/state; hostname; pgrep -c sleep || ps | grep -c 'sleep 1000'"})
	if !strings.HasPrefix(out, "before\nrestored\n") {
		t.Errorf("after restore: %q", out)
	}
	c2.Close()
}

// TestAgentInVMARM64 runs the arm64 agent in an emulated arm64 guest: the
// handshake, an exec as another user, a quiesce and a new session.
func TestAgentInVMARM64(t *testing.T) {
	_, conn := bootVM(t, "arm64", staticNet)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	start := time.Now()
	c, err := agent.Connect(ctx, conn)
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	t.Logf("arm64 agent answered %v after QEMU start", time.Since(start).Round(time.Millisecond))
	out, _ := execOut(t, c, agent.ExecRequest{Command: "uname -m; id -u", User: "nobody"})
	if out != "aarch64\n65534\n" {
		t.Errorf("exec: %q", out)
	}
	if err := c.Quiesce(ctx); err != nil {
		t.Fatalf("Quiesce: %v", err)
	}
	c2, err := agent.Connect(ctx, conn)
	if err != nil {
		t.Fatalf("Connect after Quiesce: %v", err)
	}
	if err := c2.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	c2.Close()
}
