package qemu

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestHashGrowing: a file written in pieces while it is hashed hashes to
// the sha256 of all its bytes, including those written after the hasher
// last found the end.
func TestHashGrowing(t *testing.T) {
	w, r := growingFile(t)
	written := make(chan struct{})
	got := make(chan hashResult, 1)
	go func() { got <- hashGrowing(r, written) }()
	all := sha256.New()
	chunk := make([]byte, 3<<20+17)
	for i := range 6 {
		_, _ = rand.Read(chunk)
		if _, err := w.Write(chunk); err != nil {
			t.Fatal(err)
		}
		all.Write(chunk)
		if i%2 == 0 {
			time.Sleep(5 * time.Millisecond) // the hasher catches up and waits
		}
	}
	close(written)
	select {
	case res := <-got:
		if res.err != nil {
			t.Fatal(res.err)
		}
		if want := hex.EncodeToString(all.Sum(nil)); res.sum != want {
			t.Fatalf("sum %s, want %s", res.sum, want)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("hashGrowing did not end after the writer was done")
	}
}

// TestHashGrowingEndsWhileWriterGoesOn: a writer that goes on appending
// after it said it was done is not followed: the hash ends.
func TestHashGrowingEndsWhileWriterGoesOn(t *testing.T) {
	w, r := growingFile(t)
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		chunk := make([]byte, 1<<20)
		for i := 0; i < 300; i++ { // bounded: at most 300 MB
			select {
			case <-stop:
				return
			default:
			}
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	}()
	written := make(chan struct{})
	got := make(chan hashResult, 1)
	go func() { got <- hashGrowing(r, written) }()
	time.Sleep(50 * time.Millisecond)
	close(written)
	select {
	case res := <-got:
		if res.err != nil {
			t.Fatal(res.err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("hashGrowing follows a writer that never stops")
	}
}

// growingFile returns a new file's writer and a reader of it, closed when
// the test ends.
func growingFile(t *testing.T) (w, r *os.File) {
	path := filepath.Join(t.TempDir(), "state")
	w, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	r, err = os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return w, r
}
