package backend

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/vmpool"
)

// TestDigestOfCachesByInode: a hard link of a hashed file gets its digest
// from the cache, a known digest is taken as given, and a rewrite (new
// size or modification time) is hashed again.
func TestDigestOfCachesByInode(t *testing.T) {
	dir := t.TempDir()
	a := filepath.Join(dir, "a")
	if err := os.WriteFile(a, []byte("first contents"), 0o600); err != nil {
		t.Fatal(err)
	}
	sumOf := func(b string) string { s := sha256.Sum256([]byte(b)); return hex.EncodeToString(s[:]) }
	_, got, err := digestOf(a, vmpool.Digest{})
	if err != nil || got != sumOf("first contents") {
		t.Fatalf("digestOf = %s, %v", got, err)
	}
	link := filepath.Join(dir, "link")
	if err := os.Link(a, link); err != nil {
		t.Fatal(err)
	}
	if _, got, _ := digestOf(link, vmpool.Digest{}); got != sumOf("first contents") {
		t.Fatalf("hard link: %s", got)
	}
	b := filepath.Join(dir, "b")
	if err := os.WriteFile(b, []byte("streamed"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, got, _ := digestOf(b, vmpool.Digest{SHA256: "given", Size: 3}); got != sumOf("streamed") {
		t.Fatalf("a known digest of another size was taken: %s", got)
	}
	digestCache.Clear()
	if _, got, _ := digestOf(b, vmpool.Digest{SHA256: "given", Size: int64(len("streamed"))}); got != "given" {
		t.Fatalf("known digest not taken: %s", got)
	}
	if _, got, _ := digestOf(b, vmpool.Digest{}); got != "given" {
		t.Fatalf("known digest not cached for the inode: %s", got)
	}
	// A rewrite in place changes the size or the time: hashed again.
	if err := os.WriteFile(a, []byte("second, longer contents"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, got, _ := digestOf(link, vmpool.Digest{}); got != sumOf("second, longer contents") {
		t.Fatalf("after a rewrite: %s", got)
	}
	later := time.Now().Add(time.Hour)
	if err := os.WriteFile(a, []byte("third, longer contents!"), 0o600); err != nil { // same size as before
		t.Fatal(err)
	}
	if err := os.Chtimes(a, later, later); err != nil {
		t.Fatal(err)
	}
	if _, got, _ := digestOf(a, vmpool.Digest{}); got != sumOf("third, longer contents!") {
		t.Fatalf("same size, new time: %s", got)
	}
}
