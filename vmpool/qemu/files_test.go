package qemu

import (
	"bytes"
	"os"
	"path/filepath"
	"syscall"
	"testing"
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
