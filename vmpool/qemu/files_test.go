package qemu

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

func TestCopySparse(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	const size = 64 << 20
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("firkin"), 1000)
	for _, off := range []int64{0, 5 << 20, size - int64(len(data))} {
		if _, err := f.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
	}
	// A written block of zeroes becomes a hole too.
	if _, err := f.WriteAt(make([]byte, 4<<20), 10<<20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	dst := filepath.Join(dir, "dst")
	if err := copySparse(src, dst); err != nil {
		t.Fatalf("copySparse: %v", err)
	}
	a, _ := os.ReadFile(src)
	b, _ := os.ReadFile(dst)
	if !bytes.Equal(a, b) {
		t.Fatal("copy differs")
	}
	var st syscall.Stat_t
	if err := syscall.Stat(dst, &st); err != nil {
		t.Fatal(err)
	}
	if used := st.Blocks * 512; used > 8<<20 {
		t.Errorf("copy uses %d bytes of disk for %d bytes of data", used, 3*len(data))
	}
	if err := copySparse(src, dst); err == nil {
		t.Error("copySparse over an existing file succeeded")
	}
}

func TestTail(t *testing.T) {
	p := filepath.Join(t.TempDir(), "log")
	if err := os.WriteFile(p, []byte("0123456789"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := tail(p, 4); got != "6789" {
		t.Errorf("tail: %q", got)
	}
	if got := tail(p, 100); got != "0123456789" {
		t.Errorf("tail of a short file: %q", got)
	}
	if got := tail(filepath.Join(t.TempDir(), "none"), 4); got != "" {
		t.Errorf("tail of a missing file: %q", got)
	}
}

func TestStepErrorClasses(t *testing.T) {
	err := stepError("boot", "x", "create overlay", errors.New("qemu-img create: exit status 1: No space left on device"), "", "")
	if !errors.Is(err, errdefs.ErrDiskPressure) || !strings.Contains(err.Error(), "qemu: boot x: create overlay:") {
		t.Errorf("disk full: %v", err)
	}
	err = stepError("boot", "x", "connect agent", errdefs.Wrap(errdefs.ErrTimeout, errors.New("slow")), "", "")
	if !errors.Is(err, errdefs.ErrTimeout) || errors.Is(err, errdefs.ErrDiskPressure) {
		t.Errorf("timeout: %v", err)
	}
}
