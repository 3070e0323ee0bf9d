package images_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// lockedBuffer collects QEMU's console output.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// bootSmoke boots img under TCG with the root disk on virtio-blk; the test
// init loads the listed modules in order, checks that the disk appeared and
// powers off.
func bootSmoke(t *testing.T, img vmpool.Image, timeout time.Duration) {
	qemu := testenv.RequireQEMU(t, img.Arch)
	args := []string{"-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1",
		"-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot", "-nodefaults",
		"-kernel", img.Kernel, "-initrd", img.Initramfs,
		"-drive", "if=none,id=root,format=raw,readonly=on,file=" + img.RootDisk,
		"-device", "virtio-blk-pci,drive=root",
	}
	if img.Arch == "arm64" {
		args = append([]string{"-M", "virt"}, args...)
		args = append(args, "-append", "console=ttyAMA0 panic=-1 loglevel=4")
	} else {
		args = append([]string{"-M", "q35"}, args...)
		args = append(args, "-append", "console=ttyS0 panic=-1 loglevel=4")
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var out lockedBuffer
	cmd := exec.CommandContext(ctx, qemu, args...)
	cmd.Stdout = &out
	cmd.Stderr = &out
	start := time.Now()
	err := cmd.Run()
	elapsed := time.Since(start)
	console := out.String()
	tail := console
	if len(tail) > 4000 {
		tail = tail[len(tail)-4000:]
	}
	if err != nil {
		t.Fatalf("qemu: %v after %v; console tail:\n%s", err, elapsed, tail)
	}
	if !strings.Contains(console, "FIRKIN-SMOKE-OK") {
		t.Fatalf("no success marker after %v; console tail:\n%s", elapsed, tail)
	}
	t.Logf("%s boot to init, modules loaded, disk seen, power off: %v", img.Arch, elapsed)
}

func TestSmokeBootAMD64(t *testing.T) {
	testenv.RequireQEMU(t, "amd64")
	img := testenv.ImageWithAgent(t, "amd64", smokeInit(t, "amd64"), "smoke")
	bootSmoke(t, img, 2*time.Minute)
}

func TestSmokeBootARM64(t *testing.T) {
	testenv.RequireQEMU(t, "arm64")
	img := testenv.ImageWithAgent(t, "arm64", smokeInit(t, "arm64"), "smoke")
	bootSmoke(t, img, 4*time.Minute)
}

// TestAgentBootAMD64 boots the image with the real agent (testenv.Image) and
// the channel the qemu driver uses (a virtio-serial port named firkin.agent
// on a unix socket) and waits for the agent's ready line on the console.
func TestAgentBootAMD64(t *testing.T) { agentBoot(t, "amd64", 2*time.Minute) }

// TestAgentBootARM64 does the same for arm64 on QEMU's virt machine.
func TestAgentBootARM64(t *testing.T) { agentBoot(t, "arm64", 4*time.Minute) }

func agentBoot(t *testing.T, arch string, timeout time.Duration) {
	qemu := testenv.RequireQEMU(t, arch)
	img := testenv.Image(t, arch)
	// Short socket path: sun_path holds 108 bytes.
	dir, err := os.MkdirTemp("", "fk")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "a.sock")
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	machine, console := "q35", "ttyS0"
	if arch == "arm64" {
		machine, console = "virt", "ttyAMA0"
	}
	var out lockedBuffer
	cmd := exec.CommandContext(ctx, qemu, "-M", machine, "-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1",
		"-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot", "-nodefaults",
		"-kernel", img.Kernel, "-initrd", img.Initramfs,
		"-append", "console="+console+" panic=-1 loglevel=4",
		// The agent mounts the root disk read-write: give it a throw-away
		// overlay, as the driver's qcow2 overlays do.
		"-drive", "if=none,id=root,format=raw,snapshot=on,file="+img.RootDisk,
		"-device", "virtio-blk-pci,drive=root",
		"-device", "virtio-serial-pci",
		"-chardev", "socket,id=agent,path="+sock+",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name=firkin.agent",
	)
	cmd.Stdout = &out
	cmd.Stderr = &out
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cancel()
		<-exited
	})
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for !strings.Contains(out.String(), "firkin-agent: ready") {
		select {
		case err := <-exited:
			exited <- err
			t.Fatalf("qemu exited before the agent was ready (%v); console:\n%s", err, out.String())
		case <-ctx.Done():
			t.Fatalf("agent not ready after %v; console:\n%s", time.Since(start), out.String())
		case <-tick.C:
		}
	}
	t.Logf("%s boot to a ready agent: %v", arch, time.Since(start))
}
