package images_test

import (
	"bytes"
	"context"
	"os/exec"
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
