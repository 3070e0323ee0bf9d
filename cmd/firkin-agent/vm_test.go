//go:build linux

package main

import (
	"bytes"
	"context"
	"crypto/rand"
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

// bootVM boots the real image with the current agent under TCG and returns
// the host end of the agent channel.
func bootVM(t *testing.T) (net.Conn, *consoleBuffer) {
	t.Helper()
	qemu := testenv.RequireQEMU(t, "amd64")
	img := testenv.Image(t, "amd64")
	dir, err := os.MkdirTemp("", "fa-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "agent.sock")
	args := []string{"-M", "q35", "-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1",
		"-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot", "-nodefaults",
		"-kernel", img.Kernel, "-initrd", img.Initramfs,
		"-append", "console=ttyS0 panic=-1 loglevel=4 firkin.ip=10.0.2.15/24 firkin.gw=10.0.2.2 firkin.dns=10.0.2.3",
		"-drive", "if=none,id=root,format=raw,snapshot=on,file=" + img.RootDisk,
		"-device", "virtio-blk-pci,drive=root",
		"-device", "virtio-serial-pci",
		"-chardev", "socket,id=agent,path=" + sock + ",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name=firkin.agent",
		"-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0",
	}
	var out consoleBuffer
	cmd := exec.Command(qemu, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("guest console tail:\n%s", out.tail())
		}
	})
	var conn net.Conn
	deadline := time.Now().Add(10 * time.Second)
	for conn == nil {
		c, err := net.Dial("unix", sock)
		if err == nil {
			conn = c
			break
		}
		select {
		case <-exited:
			t.Fatalf("qemu exited; console:\n%s", out.tail())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no agent socket: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Cleanup(func() { conn.Close() })
	return conn, &out
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
	conn, console := bootVM(t)
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
	t0 := time.Now()
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
	c2.Close()
}
