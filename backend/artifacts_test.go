package backend

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// sparseDisk writes a 64 MiB sparse file with data at two offsets.
func sparseDisk(t *testing.T, path string, mark byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(64 << 20); err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{4096, 40 << 20} {
		if _, err := f.WriteAt([]byte{mark, 1, 2, 3}, off); err != nil {
			t.Fatal(err)
		}
	}
}

// TestBaseDisk: a snapshot of another worker restores only on a base disk
// with the same contents at one of this worker's image paths.
func TestBaseDisk(t *testing.T) {
	dir := t.TempDir()
	base, other, copyOf := filepath.Join(dir, "base.ext4"), filepath.Join(dir, "other.ext4"), filepath.Join(dir, "copy.ext4")
	sparseDisk(t, base, 7)
	sparseDisk(t, other, 8) // another build: same size, other bytes
	sparseDisk(t, copyOf, 7)
	dBase, err := baseDigest(base)
	if err != nil {
		t.Fatal(err)
	}
	dOther, _ := baseDigest(other)
	dCopy, _ := baseDigest(copyOf)
	if dBase == dOther || dBase != dCopy {
		t.Fatalf("digests: base %s, another build %s, a copy %s", dBase, dOther, dCopy)
	}

	// Another worker's state directory holds a disk of the same name.
	elsewhere := filepath.Join(t.TempDir(), "base.ext4")
	b := testBackend("secret")
	b.cfg.Images = map[string]vmpool.Image{"tiny": {RootDisk: base, Arch: "amd64"}}
	mine := subjects.SnapshotRecord{SnapshotID: "s", WorkerID: "w1"}
	theirs := subjects.SnapshotRecord{SnapshotID: "s", WorkerID: "w2"}
	on := func(path, digest string) snapshotMeta {
		return snapshotMeta{Snapshot: vmpool.Snapshot{Image: vmpool.Image{RootDisk: path, Arch: "amd64"}}, BaseDisk: digest}
	}
	for _, tc := range []struct {
		name string
		rec  subjects.SnapshotRecord
		meta snapshotMeta
		want string // the root disk used; "" for unsupported
	}{
		{"own snapshot", mine, on("/elsewhere", "v1:x"), "/elsewhere"},
		{"same base", theirs, on(base, dBase), base},
		{"same base in another worker's state dir", theirs, on(elsewhere, dBase), base},
		{"same name, another build", theirs, on(elsewhere, dOther), ""},
		{"a base this worker does not have", theirs, on(other, dOther), ""},
		{"saved before bases were identified", theirs, on(base, ""), base},
		{"saved before bases were identified, elsewhere", theirs, on(elsewhere, ""), ""},
	} {
		img, err := b.baseImage(tc.rec, tc.meta)
		switch {
		case tc.want == "" && !errors.Is(err, errdefs.ErrUnsupported):
			t.Errorf("%s: %v, want unsupported", tc.name, err)
		case tc.want != "" && (err != nil || img.RootDisk != tc.want):
			t.Errorf("%s: %q %v, want %q", tc.name, img.RootDisk, err, tc.want)
		}
	}
}

func TestPoolKeys(t *testing.T) {
	for _, tc := range []struct {
		key, tid, wid string
		ok            bool
	}{
		{"pool.tiny", "tiny", "", true},
		{"pool.tiny.wabc123", "tiny", "wabc123", true},
		{"pool.Tiny", "", "", false},
		{"pool.tiny.w.x", "", "", false},
		{"other.tiny", "", "", false},
		{"pool.", "", "", false},
	} {
		tid, wid, ok := parsePoolKey(tc.key)
		if ok != tc.ok || (ok && (tid != tc.tid || wid != tc.wid)) {
			t.Errorf("parsePoolKey(%q) = %q, %q, %v", tc.key, tid, wid, ok)
		}
		if ok && poolKey(tid, wid) != tc.key {
			t.Errorf("poolKey(%q, %q) = %q, want %q", tid, wid, poolKey(tid, wid), tc.key)
		}
	}
	for _, tc := range []struct {
		data string
		n    int
		ok   bool
	}{
		{`{"target":2}`, 2, true},
		{`{"target":999}`, 64, true}, // bounded by the worker's limit
		{`{"target":-1}`, 0, false},
		{`nope`, 0, false},
		{`{"target":1}` + strings.Repeat(" ", 2000), 0, false},
	} {
		n, ok := decodePoolValue([]byte(tc.data), 64)
		if n != tc.n || ok != tc.ok {
			t.Errorf("decodePoolValue(%.20q) = %d, %v; want %d, %v", tc.data, n, ok, tc.n, tc.ok)
		}
	}
}
