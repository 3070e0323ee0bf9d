//go:build linux

package vz_test

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/agent"
	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/vmpool"
	"github.com/firkin-dev/firkin-worker/vmpool/qemu"
)

// TestARM64GuestUnderQEMU proves the guest side a Mac runs: the arm64 image
// (Debian's arm64 cloud kernel as an uncompressed Image, the cross-compiled
// agent, arm64 busybox) boots under qemu-system-aarch64 (TCG, -M virt) with
// the qemu driver, and its agent answers an exec. The VZ driver boots the
// same image; only the channel differs (vsock there, virtio-serial here).
func TestARM64GuestUnderQEMU(t *testing.T) {
	testenv.RequireQEMU(t, "arm64")
	img := testenv.Image(t, "arm64")
	if img.Arch != "arm64" {
		t.Fatalf("image arch %q, want arm64", img.Arch)
	}
	head := make([]byte, 64)
	if f, err := os.Open(img.Kernel); err != nil {
		t.Fatal(err)
	} else {
		_, err = f.Read(head)
		f.Close()
		if err != nil || string(head[56:60]) != "ARM\x64" {
			t.Fatalf("kernel %s is not an uncompressed arm64 Image (the VZ Linux boot loader needs one): %v", img.Kernel, err)
		}
	}

	d, err := qemu.New(qemu.WithAccel(qemu.AccelTCG), qemu.WithStateDir(t.TempDir()),
		qemu.WithLogger(slog.New(slog.NewTextHandler(t.Output(), nil))))
	if err != nil {
		t.Fatalf("qemu.New: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	dir, err := os.MkdirTemp("", "vz-arm64-") // short: QEMU's unix sockets live here
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })

	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	start := time.Now()
	m, err := d.Boot(ctx, vmpool.BootSpec{
		ID:        "arm64proof",
		Dir:       filepath.Join(dir, "m"),
		Image:     img,
		Resources: vmpool.Resources{VCPUs: 1, MemoryMB: 256},
	})
	if err != nil {
		t.Fatalf("boot the arm64 guest under qemu-system-aarch64: %v", err)
	}
	t.Logf("arm64 guest: boot to an answering agent in %v", time.Since(start).Round(time.Millisecond))
	t.Cleanup(func() {
		if qm, ok := m.(*qemu.Machine); ok && t.Failed() {
			t.Logf("guest console tail:\n%s", qm.ConsoleTail(3000))
		}
		sctx, scancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer scancel()
		if err := m.Stop(sctx); err != nil {
			t.Errorf("stop: %v", err)
		}
	})

	if out := execOut(ctx, t, m, "uname -m; uname -s"); out != "aarch64\nLinux\n" {
		t.Fatalf("exec uname: stdout %q, want aarch64 and Linux", out)
	}
	// The agent channel a Mac uses: the guest kernel has the virtio vsock
	// transport loaded (from the image's module list), though QEMU here has
	// no vsock device.
	if out := execOut(ctx, t, m, "grep -o '^vmw_vsock_virtio_transport ' /proc/modules"); out != "vmw_vsock_virtio_transport \n" {
		t.Fatalf("vsock transport module: %q", out)
	}
}

// execOut runs command in m and returns its stdout; it fails the test on an
// error or a non-zero exit.
func execOut(ctx context.Context, t *testing.T, m vmpool.Machine, command string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	res, err := m.Exec(ctx, agent.ExecRequest{Command: command}, func(s agent.Stream, b []byte) {
		if s == agent.Stdout {
			stdout.Write(b)
		} else {
			stderr.Write(b)
		}
	})
	if err != nil {
		t.Fatalf("exec %q: %v", command, err)
	}
	if res.ExitCode != 0 {
		t.Fatalf("exec %q: exit %d, stdout %q, stderr %q", command, res.ExitCode, stdout.String(), strings.TrimSpace(stderr.String()))
	}
	return stdout.String()
}
