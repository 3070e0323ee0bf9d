package artifacts

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/klauspost/compress/s2"
	"github.com/nats-io/nats.go"
	js "github.com/nats-io/nats.go/jetstream"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/subjects"
)

func openStore(t *testing.T, cfg Config) (*Store, js.ObjectStore) {
	t.Helper()
	nc := testenv.NATS(t)
	j, err := js.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := Open(ctx, j, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	if _, err := Open(ctx, j, cfg); err != nil { // idempotent
		t.Fatalf("second Open: %v", err)
	}
	obs, err := j.ObjectStore(ctx, Bucket)
	if err != nil {
		t.Fatal(err)
	}
	return s, obs
}

// snapshotDir writes a snapshot's files (a 3 MiB one, mostly zero like guest
// memory, with a few random pages) and returns its set.
func snapshotDir(t *testing.T, sid string) (string, Set) {
	t.Helper()
	dir := t.TempDir()
	mem := make([]byte, 3<<20)
	_, _ = rand.Read(mem[1<<20 : 1<<20+8192])
	files := map[string][]byte{"snapshot.json": []byte(`{"format":"stream"}`), "mem": mem, "empty": nil}
	set := Set{SnapshotID: sid, Generation: "g1"}
	for _, name := range []string{"snapshot.json", "mem", "empty"} {
		if err := os.WriteFile(filepath.Join(dir, name), files[name], 0o600); err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(files[name])
		set.Artifacts = append(set.Artifacts, subjects.Artifact{Name: name, SizeBytes: int64(len(files[name])), SHA256: hex.EncodeToString(sum[:])})
	}
	return dir, set
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func sameFiles(t *testing.T, a, b string, names ...string) {
	t.Helper()
	for _, n := range names {
		x, err1 := os.ReadFile(filepath.Join(a, n))
		y, err2 := os.ReadFile(filepath.Join(b, n))
		if err1 != nil || err2 != nil || !bytes.Equal(x, y) {
			t.Errorf("artifact %s differs after the round trip (%v, %v)", n, err1, err2)
		}
	}
}

func TestUploadFetch(t *testing.T) {
	s, obs := openStore(t, Config{})
	src, set := snapshotDir(t, "work.1")
	ctx := ctxT(t, time.Minute)
	if err := s.Upload(ctx, set, src); err != nil {
		t.Fatal(err)
	}
	info, err := obs.GetInfo(ctx, "work.1/g1/mem")
	// Stored compressed (mostly zero pages), with the file's size in its
	// headers.
	if err != nil || info.Size >= 1<<20 || info.Headers.Get("Firkin-Size") != "3145728" || info.Headers.Get("Firkin-Encoding") != "s2" {
		t.Fatalf("object work.1/g1/mem: %+v, %v", info, err)
	}
	if err := s.Upload(ctx, set, src); err != nil { // present: left alone
		t.Fatalf("second upload: %v", err)
	}
	if info2, _ := obs.GetInfo(ctx, "work.1/g1/mem"); info2 == nil || info2.NUID != info.NUID {
		t.Errorf("second upload replaced an object that was already there")
	}
	state := t.TempDir()
	dst := filepath.Join(state, "work.1.g1")
	if err := s.Fetch(ctx, set, dst); err != nil {
		t.Fatal(err)
	}
	sameFiles(t, src, dst, "snapshot.json", "mem", "empty")
	st, err := os.Stat(filepath.Join(dst, "mem"))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("fetched file mode: %v %v", st, err)
	}
	if ents, _ := os.ReadDir(state); len(ents) != 1 {
		t.Errorf("state dir holds %d entries after the fetch, want only the snapshot dir", len(ents))
	}
	// Delete removes the objects: a later fetch finds nothing.
	if err := s.Delete(ctx, set); err != nil {
		t.Fatal(err)
	}
	if _, err := obs.GetInfo(ctx, "work.1/g1/mem"); !errors.Is(err, js.ErrObjectNotFound) {
		t.Errorf("object after delete: %v", err)
	}
}

func TestUploadRefusesChangedFile(t *testing.T) {
	s, obs := openStore(t, Config{})
	src, set := snapshotDir(t, "s1")
	if err := os.WriteFile(filepath.Join(src, "snapshot.json"), []byte(`{"format":"evil!"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t, time.Minute)
	err := s.Upload(ctx, set, src)
	if !errors.Is(err, errdefs.ErrIntegrity) {
		t.Fatalf("upload of a changed file: %v, want integrity", err)
	}
	if _, err := obs.GetInfo(ctx, "s1/g1/snapshot.json"); !errors.Is(err, js.ErrObjectNotFound) {
		t.Errorf("a file that does not match its record was left in the bucket: %v", err)
	}
}

func TestFetchRefusesTamperedObjects(t *testing.T) {
	s, obs := openStore(t, Config{})
	src, set := snapshotDir(t, "s2")
	ctx := ctxT(t, time.Minute)
	if err := s.Upload(ctx, set, src); err != nil {
		t.Fatal(err)
	}
	mem, _ := os.ReadFile(filepath.Join(src, "mem"))
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"same size, other content", append(append([]byte(nil), mem[:len(mem)-1]...), mem[len(mem)-1]^1)},
		{"shorter", mem[:len(mem)-4096]},
		{"longer", append(append([]byte(nil), mem...), 1)},
		{"compressed, claiming the record's digest, other content", s2Stream(t, append(append([]byte(nil), mem[:len(mem)-1]...), mem[len(mem)-1]^1))},
		{"compressed, decompressing to far more than the record says", s2Stream(t, make([]byte, 64<<20))},
		{"compressed, not an s2 stream", s2.Encode(nil, mem)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// A writer of the bucket replaces the object: the object store's
			// own digest matches the new content, the record's does not.
			meta := js.ObjectMeta{Name: "s2/g1/mem"}
			if strings.HasPrefix(tc.name, "compressed") {
				meta.Headers = nats.Header{"Firkin-Encoding": {"s2"}, "Firkin-Size": {strconv.Itoa(len(mem))}, "Firkin-Sha256": {set.Artifacts[1].SHA256}}
			}
			if _, err := obs.Put(ctx, meta, bytes.NewReader(tc.data)); err != nil {
				t.Fatal(err)
			}
			state := t.TempDir()
			dst := filepath.Join(state, "s2.g1")
			err := s.Fetch(ctx, set, dst)
			if !errors.Is(err, errdefs.ErrIntegrity) {
				t.Fatalf("fetch: %v, want an integrity error", err)
			}
			if _, err := os.Stat(dst); !os.IsNotExist(err) {
				t.Errorf("destination exists after a refused fetch: %v", err)
			}
			if ents, _ := os.ReadDir(state); len(ents) != 0 {
				t.Errorf("refused fetch left %d entries behind", len(ents))
			}
		})
	}
}

// s2Stream compresses data in the s2 stream format.
func s2Stream(t *testing.T, data []byte) []byte {
	var buf bytes.Buffer
	w := s2.NewWriter(&buf)
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestFetchSharesOneDownload(t *testing.T) {
	s, _ := openStore(t, Config{})
	var downloads atomic.Int32
	s.downloaded = func(name string) {
		if name == "mem" {
			downloads.Add(1)
		}
	}
	src, set := snapshotDir(t, "s3")
	ctx := ctxT(t, time.Minute)
	if err := s.Upload(ctx, set, src); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "s3.g1")
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = s.Fetch(ctx, set, dst)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("fetch %d: %v", i, err)
		}
	}
	if n := downloads.Load(); n != 1 {
		t.Errorf("8 concurrent fetches downloaded mem %d times, want 1", n)
	}
	sameFiles(t, src, dst, "mem")
	// A later fetch of a fetched snapshot downloads nothing.
	if err := s.Fetch(ctx, set, dst); err != nil || downloads.Load() != 1 {
		t.Errorf("fetch of a present snapshot: %v, downloads %d", err, downloads.Load())
	}
}

func TestFetchWaitsForUpload(t *testing.T) {
	s, _ := openStore(t, Config{WaitMax: 3 * time.Second})
	src, set := snapshotDir(t, "s4")
	ctx := ctxT(t, time.Minute)
	// Never uploaded: waited for, then a clear timeout.
	t0 := time.Now()
	err := s.Fetch(ctx, set, filepath.Join(t.TempDir(), "s4.g1"))
	if !errors.Is(err, errdefs.ErrTimeout) || subjects.CodeOf(err) != subjects.CodeTimeout {
		t.Fatalf("fetch of a missing object: %v (code %s), want timeout", err, subjects.CodeOf(err))
	}
	if d := time.Since(t0); d < 1500*time.Millisecond || d > 10*time.Second {
		t.Errorf("gave up after %s, want about the 3s wait", d)
	}
	// Uploaded while the fetch waits: the fetch gets it.
	dst := filepath.Join(t.TempDir(), "s4.g1")
	done := make(chan error, 1)
	go func() { done <- s.Fetch(ctx, set, dst) }()
	time.Sleep(300 * time.Millisecond) // let the fetch find nothing first
	s.UploadLater(set, src)
	if err := <-done; err != nil {
		t.Fatalf("fetch while the upload runs: %v", err)
	}
	sameFiles(t, src, dst, "snapshot.json", "mem", "empty")
}

func TestObjectNames(t *testing.T) {
	for _, tc := range []struct {
		sid, gen, name string
		ok             bool
	}{
		{"a.b", "g1", "mem", true},
		{"../x", "g1", "mem", false},
		{"a", "G1", "mem", false},
		{"a", "g1", "../mem", false},
		{"a", "g1", "x/y", false},
		{"a", "g1", "..", false},
		{"a", "", "mem", false},
	} {
		n, err := ObjectName(tc.sid, tc.gen, tc.name)
		if (err == nil) != tc.ok {
			t.Errorf("ObjectName(%q, %q, %q) = %q, %v; want ok=%v", tc.sid, tc.gen, tc.name, n, err, tc.ok)
		}
	}
	bad := Set{SnapshotID: "a", Generation: "g", Artifacts: []subjects.Artifact{{Name: "m", SHA256: "zz"}}}
	if _, err := bad.validate(); err == nil {
		t.Error("a set with a bad digest validated")
	}
}

func TestFetchGivesUpWhenNoUploadRuns(t *testing.T) {
	s, _ := openStore(t, Config{WaitMax: time.Minute, StallAfter: time.Second})
	_, set := snapshotDir(t, "s5")
	ctx := ctxT(t, time.Minute)
	t0 := time.Now()
	err := s.Fetch(ctx, set, filepath.Join(t.TempDir(), "s5.g1"))
	if !errors.Is(err, errdefs.ErrTimeout) || !strings.Contains(err.Error(), "no upload is running") {
		t.Fatalf("fetch with nothing uploading: %v, want a timeout saying no upload runs", err)
	}
	if d := time.Since(t0); d > 15*time.Second {
		t.Errorf("gave up after %s: the idle bucket should end the wait after about 1s, not the 1 min WaitMax", d)
	}
}
