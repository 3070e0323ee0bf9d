package worker_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"hash"
	"io"
	"math/rand/v2"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// TestFilesE2E drives the file verbs through NATS into a real guest:
// binary safety, metadata, list/mkdir/rename/remove, the error codes, and
// a watch.
func TestFilesE2E(t *testing.T) {
	e := startWorker(t)
	sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
	id := sb.SandboxID
	ctx := e.ctx(5 * time.Minute)

	// Every byte value, one request each way.
	all := make([]byte, 256*4)
	for i := range all {
		all[i] = byte(i)
	}
	wr, err := e.c.WriteFileBytes(ctx, id, "/work/bin/all", all, client.WriteFileOptions{Mode: 0o600, Parents: true})
	if err != nil {
		t.Fatalf("write all bytes: %v", err)
	}
	sum := sha256.Sum256(all)
	if wr.SHA256 != hex.EncodeToString(sum[:]) || wr.Size != int64(len(all)) || wr.File.Mode != 0o600 || wr.File.Type != subjects.FileTypeFile {
		t.Fatalf("write reply %+v", wr)
	}
	got, err := e.c.ReadFileBytes(ctx, id, "/work/bin/all")
	if err != nil || !bytes.Equal(got, all) {
		t.Fatalf("read all bytes back: equal %v, %v", bytes.Equal(got, all), err)
	}
	if out := e.exec(id, "sha256sum /work/bin/all | cut -d' ' -f1").Stdout; strings.TrimSpace(out) != hex.EncodeToString(sum[:]) {
		t.Fatalf("sha256sum in the guest: %q", out)
	}
	var streamed bytes.Buffer
	if r, err := e.c.ReadFile(ctx, id, "/work/bin/all", &streamed); err != nil || !bytes.Equal(streamed.Bytes(), all) || r.SHA256 != wr.SHA256 {
		t.Fatalf("streamed read: %v, %+v", err, r)
	}

	// Metadata: owner, mode, mtime.
	e.exec(id, "mkdir -p /home/user && echo hi > /home/user/note && chown 1000:1000 /home/user/note && chmod 640 /home/user/note")
	fi, err := e.c.Stat(ctx, id, "/home/user/note")
	if err != nil {
		t.Fatal(err)
	}
	if fi.UID != 1000 || fi.GID != 1000 || fi.Mode != 0o640 || fi.Size != 3 || time.Since(fi.MTime) > 10*time.Minute {
		t.Fatalf("stat %+v", fi)
	}

	// mkdir -p, list with a depth, rename, remove -r.
	if err := e.c.Mkdir(ctx, id, "/work/tree/a/b", 0, true); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.WriteFileBytes(ctx, id, "/work/tree/a/b/f", []byte("x"), client.WriteFileOptions{}); err != nil {
		t.Fatal(err)
	}
	e.exec(id, "ln -s b/f /work/tree/a/link")
	ls, err := e.c.ListFiles(ctx, id, "/work/tree", 3)
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, f := range ls.Entries {
		paths = append(paths, f.Path+" "+f.Type+" "+f.Link)
	}
	sort.Strings(paths)
	want := []string{"/work/tree/a dir ", "/work/tree/a/b dir ", "/work/tree/a/b/f file ", "/work/tree/a/link symlink b/f"}
	sort.Strings(want)
	if !slices.Equal(paths, want) {
		t.Fatalf("list: %q, want %q", paths, want)
	}
	if ls1, err := e.c.ListFiles(ctx, id, "/work/tree", 0); err != nil || len(ls1.Entries) != 1 {
		t.Fatalf("list depth 1: %+v %v", ls1, err)
	}
	if err := e.c.Rename(ctx, id, "/work/tree/a/b/f", "/work/tree/g"); err != nil {
		t.Fatal(err)
	}
	if out := e.exec(id, "cat /work/tree/g").Stdout; out != "x" {
		t.Fatalf("renamed file holds %q", out)
	}
	wantCode(t, "remove a non-empty directory", e.c.Remove(ctx, id, "/work/tree", false), subjects.CodeConflict)
	if err := e.c.Remove(ctx, id, "/work/tree", true); err != nil {
		t.Fatal(err)
	}
	_, err = e.c.Stat(ctx, id, "/work/tree")
	wantCode(t, "stat after remove -r", err, subjects.CodeFileNotFound)

	// Errors carry the guest's reason with a code of their own.
	_, err = e.c.Stat(ctx, id, "/no/such/file")
	wantCode(t, "stat a missing file", err, subjects.CodeFileNotFound)
	_, err = e.c.ReadFile(ctx, id, "/no/such/file", io.Discard)
	wantCode(t, "read a missing file", err, subjects.CodeFileNotFound)
	_, err = e.c.ReadFileBytes(ctx, id, "/etc")
	wantCode(t, "read a directory", err, subjects.CodeInvalidRequest)
	if err == nil || !strings.Contains(err.Error(), "is a directory") {
		t.Errorf("read a directory: %v, want the guest's reason", err)
	}
	// As the image's non-root user, the guest's permissions apply.
	e.exec(id, "echo secret > /work/secret && chmod 600 /work/secret")
	asUser := e.c.AsUser("user")
	_, err = asUser.ReadFileBytes(ctx, id, "/work/secret")
	wantCode(t, "read a 0600 root file as user", err, subjects.CodePermissionDenied)
	_, err = asUser.ReadFile(ctx, id, "/work/secret", io.Discard)
	wantCode(t, "streamed read of a 0600 root file as user", err, subjects.CodePermissionDenied)
	_, err = asUser.WriteFileBytes(ctx, id, "/etc/by-user", []byte("x"), client.WriteFileOptions{})
	wantCode(t, "write into /etc as user", err, subjects.CodePermissionDenied)
	err = asUser.Mkdir(ctx, id, "/etc/by-user", 0, false)
	wantCode(t, "mkdir in /etc as user", err, subjects.CodePermissionDenied)
	if err := e.c.Mkdir(ctx, id, "/home/user", 0, true); err != nil {
		t.Fatal(err)
	}
	e.exec(id, "chown user:user /home/user")
	if wr, err := asUser.WriteFileBytes(ctx, id, "/home/user/mine", []byte("x"), client.WriteFileOptions{}); err != nil || wr.File.UID != 1000 {
		t.Fatalf("write as user in its home: %+v %v", wr, err)
	}
	_, err = e.c.Stat(ctx, "no-such-sandbox", "/etc")
	wantCode(t, "stat in a missing sandbox", err, subjects.CodeSandboxNotFound)
	_, err = e.c.ListFiles(ctx, id, "/etc", 99)
	wantCode(t, "list depth 99", err, subjects.CodeInvalidRequest)

	// A watch sees create, write, rename and remove, and ends on Close.
	if err := e.c.Mkdir(ctx, id, "/work/watched", 0, true); err != nil {
		t.Fatal(err)
	}
	w, err := e.c.Watch(ctx, id, "/work/watched")
	if err != nil {
		t.Fatal(err)
	}
	e.exec(id, "cd /work/watched && echo one > f && echo two >> f && mv f g && rm g && mkdir d")
	seen := map[string]bool{}
	deadline := time.After(30 * time.Second)
	for !(seen["create f"] && seen["write f"] && seen["rename f g"] && seen["remove g"] && seen["create d"]) {
		select {
		case ev, ok := <-w.Events():
			if !ok {
				t.Fatalf("watch ended early: %v (seen %v)", w.Err(), seen)
			}
			seen[strings.TrimSpace(ev.Op+" "+ev.Name+" "+ev.To)] = true
		case <-deadline:
			t.Fatalf("watch events so far: %v", seen)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatalf("close watch: %v", err)
	}
	for range w.Events() {
	}
	// A recursive watch names paths below the watched directory and follows
	// directories made after it started.
	rw, err := e.c.WatchRecursive(ctx, id, "/work")
	if err != nil {
		t.Fatal(err)
	}
	e.exec(id, "mkdir -p /work/watched/new/deep && echo x > /work/watched/new/deep/early && sleep 0.3 && echo y > /work/watched/new/deep/late")
	seen = map[string]bool{}
	deadline = time.After(30 * time.Second)
	for !(seen["create watched/new"] && seen["create watched/new/deep/early"] && seen["create watched/new/deep/late"] && seen["write watched/new/deep/late"]) {
		select {
		case ev, ok := <-rw.Events():
			if !ok {
				t.Fatalf("recursive watch ended early: %v (seen %v)", rw.Err(), seen)
			}
			seen[strings.TrimSpace(ev.Op+" "+ev.Name+" "+ev.To)] = true
		case <-deadline:
			t.Fatalf("recursive watch events so far: %v", seen)
		}
	}
	if err := rw.Close(); err != nil {
		t.Fatalf("close recursive watch: %v", err)
	}
	// A watch subject outside the client inboxes is refused.
	err = e.c.Request(ctx, subjects.Default.Sandbox(id, subjects.VerbFSWatch), subjects.FSWatchRequest{Path: "/work", Subject: "firkin.events.x"}, nil)
	wantCode(t, "watch to a non-inbox subject", err, subjects.CodeInvalidRequest)
}

// TestFilesLargeE2E moves 100 MiB up and down through NATS with digests
// checked at both ends, while another sandbox keeps answering execs; it
// reports the throughput and the other sandbox's exec latency.
func TestFilesLargeE2E(t *testing.T) {
	const size = 100 << 20
	e := startWorker(t)
	a := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"}).SandboxID
	b := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"}).SandboxID
	ctx := e.ctx(20 * time.Minute)

	// The other sandbox's exec latency, before and during the transfers.
	probe := func(stop <-chan struct{}) (lat []time.Duration, errs []error) {
		for {
			start := time.Now()
			_, err := e.c.Exec(ctx, b, subjects.ExecRequest{Command: "true"})
			if err != nil {
				errs = append(errs, err)
			} else {
				lat = append(lat, time.Since(start))
			}
			select {
			case <-stop:
				return lat, errs
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
	baseStop := make(chan struct{})
	time.AfterFunc(5*time.Second, func() { close(baseStop) })
	base, baseErrs := probe(baseStop)
	if len(baseErrs) > 0 || len(base) == 0 {
		t.Fatalf("baseline execs: %d ok, errors %v", len(base), baseErrs)
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var during []time.Duration
	var duringErrs []error
	wg.Add(1)
	go func() {
		defer wg.Done()
		during, duringErrs = probe(stop)
	}()

	src := &randReader{r: rand.NewChaCha8([32]byte{1, 2, 3}), left: size, h: sha256.New()}
	start := time.Now()
	wr, err := e.c.WriteFile(ctx, a, "/root/big.bin", src, client.WriteFileOptions{})
	up := time.Since(start)
	if err != nil {
		close(stop)
		wg.Wait()
		t.Fatalf("upload: %v", err)
	}
	upSum := hex.EncodeToString(src.h.Sum(nil))
	if wr.Size != size || wr.SHA256 != upSum {
		t.Fatalf("upload reply %+v, sent sha256 %s", wr, upSum)
	}
	down := &countingHash{h: sha256.New()}
	start = time.Now()
	rr, err := e.c.ReadFile(ctx, a, "/root/big.bin", down)
	dn := time.Since(start)
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatalf("download: %v", err)
	}
	if downSum := hex.EncodeToString(down.h.Sum(nil)); downSum != upSum || down.n != size || rr.SHA256 != upSum {
		t.Fatalf("download: %d bytes, sha256 %s (reply %s), uploaded %s", down.n, downSum, rr.SHA256, upSum)
	}
	if out := e.exec(a, "sha256sum /root/big.bin | cut -d' ' -f1").Stdout; strings.TrimSpace(out) != upSum {
		t.Fatalf("sha256sum in the guest: %q, want %s", out, upSum)
	}
	if len(duringErrs) > 0 || len(during) < 3 {
		t.Fatalf("other sandbox during the transfers: %d execs ok, errors %v", len(during), duringErrs)
	}
	mb := float64(size) / 1e6
	t.Logf("upload %d MiB: %s (%.1f MB/s); download: %s (%.1f MB/s)", size>>20, up.Round(time.Millisecond), mb/up.Seconds(), dn.Round(time.Millisecond), mb/dn.Seconds())
	t.Logf("other sandbox exec: baseline p50 %s p95 %s (n=%d); during transfers p50 %s p95 %s max %s (n=%d)",
		pct(base, 50), pct(base, 95), len(base), pct(during, 50), pct(during, 95), pct(during, 100), len(during))
	if p95 := pct(during, 95); p95 > 5*time.Second {
		t.Errorf("other sandbox's exec p95 %s during the transfers: not responsive", p95)
	}

	// A digest that does not match leaves the old file.
	if _, err := e.c.WriteFileBytes(ctx, a, "/root/small", []byte("old"), client.WriteFileOptions{}); err != nil {
		t.Fatal(err)
	}
	err = e.c.Request(ctx, subjects.Default.Sandbox(a, subjects.VerbFSWrite),
		subjects.FSWriteRequest{Path: "/root/small", Data: []byte("new"), SHA256: strings.Repeat("0", 64)}, nil)
	wantCode(t, "write with a wrong digest", err, subjects.CodeInvalidRequest)
	if got, err := e.c.ReadFileBytes(ctx, a, "/root/small"); err != nil || string(got) != "old" {
		t.Fatalf("after a refused write: %q %v", got, err)
	}
}

// randReader yields left pseudo-random bytes, hashing them.
type randReader struct {
	r    *rand.ChaCha8
	left int
	h    hash.Hash
}

func (r *randReader) Read(p []byte) (int, error) {
	if r.left == 0 {
		return 0, io.EOF
	}
	p = p[:min(len(p), r.left)]
	_, _ = r.r.Read(p)
	r.h.Write(p)
	r.left -= len(p)
	return len(p), nil
}

type countingHash struct {
	h hash.Hash
	n int
}

func (c *countingHash) Write(p []byte) (int, error) {
	c.n += len(p)
	return c.h.Write(p)
}

// pct is the p-th percentile of ds.
func pct(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := (len(s)*p + 99) / 100
	return s[max(0, min(len(s)-1, i-1))].Round(time.Millisecond)
}
