package qemu

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
)

// FuzzConsoleLog writes guest console output (data, in writes whose sizes
// come from sizes) through the capped console log of a cap of capBytes.
// Whatever the guest prints, the log and its older half each stay within
// half the cap, every write reports all its bytes taken (a guest is never
// blocked), and what consoleTail returns is the end of what the guest
// printed: the last min(n, kept) bytes.
func FuzzConsoleLog(f *testing.F) {
	f.Add([]byte("Linux version 6.1\nfirkin-agent ready\n"), []byte{5, 0, 200}, uint16(16), uint16(10))
	f.Add(bytes.Repeat([]byte("y\n"), 3000), []byte{255, 255, 1}, uint16(1000), uint16(999))
	f.Add([]byte("x"), []byte{}, uint16(0), uint16(0))
	f.Add([]byte("\x1b[2J\x00\xff"), []byte{1}, uint16(1), uint16(65535))
	dir := f.TempDir()
	log := slog.New(slog.DiscardHandler)
	f.Fuzz(func(t *testing.T, data, sizes []byte, capBytes, n uint16) {
		path := filepath.Join(dir, "console.log")
		for _, p := range []string{path, path + consoleOld} {
			if err := os.Remove(p); err != nil && !os.IsNotExist(err) {
				t.Fatal(err)
			}
		}
		w, err := openCapped(path, int64(capBytes), log)
		if err != nil {
			t.Fatal(err)
		}
		defer w.close()
		half := max(int64(capBytes)/2, 1)
		// Each rotation is a rename and an open: bound them per input.
		data = data[:min(int64(len(data)), 64*half)]
		rest := data
		for i := 0; len(rest) > 0; i++ {
			k := len(rest)
			if i < len(sizes) {
				k = min(k, int(sizes[i])+1)
			}
			m, err := w.Write(rest[:k])
			if m != k || err != nil {
				t.Fatalf("write of %d bytes: %d, %v", k, m, err)
			}
			rest = rest[k:]
		}
		var kept int64
		for _, p := range []string{path, path + consoleOld} {
			st, err := os.Stat(p)
			if os.IsNotExist(err) {
				continue
			}
			if err != nil {
				t.Fatal(err)
			}
			if st.Size() > half {
				t.Fatalf("%s holds %d bytes, over half the cap of %d", filepath.Base(p), st.Size(), capBytes)
			}
			kept += st.Size()
		}
		got := consoleTail(path, int64(n))
		want := min(int64(n), kept, int64(len(data)))
		if int64(len(got)) != want || !bytes.HasSuffix(data, []byte(got)) {
			t.Fatalf("consoleTail(%d) = %q (kept %d), not the last %d bytes printed", n, got, kept, want)
		}
	})
}
