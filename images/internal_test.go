package images

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/cavaliergopher/cpio"
)

func TestModName(t *testing.T) {
	for in, want := range map[string]string{
		"virtio-pci":                          "virtio_pci",
		"kernel/drivers/virtio/virtio_pci.ko": "virtio_pci",
		"x/vsock.ko.xz":                       "vsock",
		"ext4.ko.zst":                         "ext4",
		"net_failover":                        "net_failover",
	} {
		if got := modName(in); got != want {
			t.Errorf("modName(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestDebFileName(t *testing.T) {
	got := debFileName("busybox-static", "1:1.35.0-4+deb12u1+b1", "arm64")
	if want := "busybox-static_1%3a1.35.0-4+deb12u1+b1_arm64.deb"; got != want {
		t.Errorf("debFileName = %q, want %q", got, want)
	}
}

func TestParseStanzas(t *testing.T) {
	out := []byte(`Package: linux-image-cloud-amd64
Version: 6.1.192-2
Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)
Description: Linux for x86-64 cloud
 continuation line: ignored

Package: busybox-static
Version: 1:1.35.0-4+deb12u1+b1
`)
	st := parseStanzas(out)
	if len(st) != 2 || st[0]["Depends"] != "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)" || st[1]["Version"] != "1:1.35.0-4+deb12u1+b1" {
		t.Errorf("parseStanzas: %v", st)
	}
}

func TestInputsKeyStable(t *testing.T) {
	a := inputsKey(map[string]string{"a": "1", "b": "2"})
	b := inputsKey(map[string]string{"b": "2", "a": "1"})
	c := inputsKey(map[string]string{"a": "1", "b": "3"})
	if a != b || a == c || len(a) != 12 {
		t.Errorf("inputsKey: %s %s %s", a, b, c)
	}
}

// TestCPIOTree checks ordering, parents and metadata of the cpio writer.
func TestCPIOTree(t *testing.T) {
	tr := cpioTree{}
	tr.bytes("lib/modules/v/kernel/a.ko", 0o644, []byte("module"))
	tr.dir("tmp", 0o1777)
	tr.bytes("init", 0o755, []byte("#!agent"))
	var buf bytes.Buffer
	if err := tr.write(&buf); err != nil {
		t.Fatal(err)
	}
	var again bytes.Buffer
	if err := tr.write(&again); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf.Bytes(), again.Bytes()) {
		t.Error("two writes of one tree differ")
	}
	r := cpio.NewReader(&buf)
	var names []string
	modes := map[string]cpio.FileMode{}
	for {
		h, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Uid != 0 || h.Guid != 0 || (!h.ModTime.IsZero() && h.ModTime.Unix() != 0) {
			t.Errorf("%s: uid %d gid %d mtime %v", h.Name, h.Uid, h.Guid, h.ModTime)
		}
		names = append(names, h.Name)
		modes[h.Name] = h.Mode
	}
	want := []string{"init", "lib", "lib/modules", "lib/modules/v", "lib/modules/v/kernel", "lib/modules/v/kernel/a.ko", "tmp"}
	if !slices.Equal(names, want) {
		t.Errorf("entries %v, want %v", names, want)
	}
	if modes["tmp"] != cpio.TypeDir|0o1777 || modes["init"] != cpio.TypeReg|0o755 || modes["lib"] != cpio.TypeDir|0o755 {
		t.Errorf("modes: %v", modes)
	}
}

// TestRootDiskReproducible builds the root disk twice, in two directories
// at different times, and expects the same bytes: a snapshot saved on one
// worker sits on a root disk another worker built on its own.
func TestRootDiskReproducible(t *testing.T) {
	bb, err := exec.LookPath("busybox")
	if err != nil {
		bb = hostBusyboxPath
	}
	if _, err := os.Stat(bb); err != nil {
		t.Skip("no host busybox (scripts/deps.sh installs busybox-static)")
	}
	for _, tool := range []string{"mkfs.ext4", "debugfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not found", tool)
		}
	}
	var sums []string
	for i := 0; i < 2; i++ {
		if i == 1 {
			time.Sleep(1100 * time.Millisecond) // other times on the staging files
		}
		dir := t.TempDir()
		b := &builder{cfg: Config{DiskSize: 64 << 20}, dir: dir, log: slog.New(slog.DiscardHandler)}
		a, err := b.buildRootDisk(context.Background(), busyboxSource{path: bb, version: "test", key: "test"}, "tiny-test.ext4", map[string]string{"k": "v"})
		b.cleanup()
		if err != nil {
			t.Fatal(err)
		}
		data, err := os.ReadFile(filepath.Join(dir, a.File))
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(data)
		sums = append(sums, hex.EncodeToString(sum[:]))
	}
	if sums[0] != sums[1] {
		t.Fatalf("two builds of one root disk differ: %s and %s", sums[0], sums[1])
	}
	if r1, r2 := reproducible("a.ext4"), reproducible("b.ext4"); r1.uuid == r2.uuid || len(r1.uuid) != 36 {
		t.Errorf("disk UUIDs %q and %q: want distinct per disk name", r1.uuid, r2.uuid)
	}
}
