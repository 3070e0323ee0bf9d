package backend

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/subjects"
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

// TestImageChanged: a template snapshot saved from another initramfs (a
// new agent) or kernel is told apart from one of the current image;
// artifacts the record does not name are not compared.
func TestImageChanged(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	sumOf := func(b string) string { s := sha256.Sum256([]byte(b)); return hex.EncodeToString(s[:]) }
	img := vmpool.Image{Kernel: write("vmlinuz", "kernel v1"), Initramfs: write("initramfs", "agent v2")}
	rec := func(arts ...subjects.Artifact) subjects.SnapshotRecord {
		return subjects.SnapshotRecord{Artifacts: arts}
	}
	for _, tt := range []struct {
		name string
		rec  subjects.SnapshotRecord
		want bool
	}{
		{"same image", rec(subjects.Artifact{Name: "kernel", SHA256: sumOf("kernel v1")}, subjects.Artifact{Name: "initramfs", SHA256: sumOf("agent v2")}), false},
		{"older agent", rec(subjects.Artifact{Name: "kernel", SHA256: sumOf("kernel v1")}, subjects.Artifact{Name: "initramfs", SHA256: sumOf("agent v1")}), true},
		{"other kernel", rec(subjects.Artifact{Name: "kernel", SHA256: sumOf("kernel v0")}), true},
		{"no image artifacts", rec(subjects.Artifact{Name: "mem", SHA256: sumOf("x")}), false},
	} {
		got, err := imageChanged(tt.rec, img)
		if err != nil || got != tt.want {
			t.Errorf("%s: imageChanged = %v, %v; want %v", tt.name, got, err, tt.want)
		}
	}
	if _, err := imageChanged(rec(subjects.Artifact{Name: "kernel", SHA256: "x"}), vmpool.Image{Kernel: filepath.Join(dir, "missing")}); err == nil {
		t.Error("a missing kernel file is not an error")
	}
}
