//go:build linux

package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// newRootClient serves a server confined to a temporary root and connects.
func newRootClient(t *testing.T) (Files, string) {
	t.Helper()
	host, guest := socketPair(t)
	root := t.TempDir()
	serve(t, &Server{Root: root}, guest)
	return connect(t, host).Files(""), root
}

func remoteCode(err error) string {
	var re *RemoteError
	if errors.As(err, &re) {
		return re.Code
	}
	return ""
}

func TestFSWriteReadBinary(t *testing.T) {
	c, root := newRootClient(t)
	ctx := bctx(t)
	all := make([]byte, 256*1024+17) // every byte value, over several frames
	for i := range all {
		all[i] = byte(i)
	}
	sum := sha256.Sum256(all)
	res, err := c.WriteFileFrom(ctx, "/a/b/bin", bytes.NewReader(all), WriteOptions{Mode: 0o640, Parents: true, SHA256: hex.EncodeToString(sum[:])})
	if err != nil {
		t.Fatalf("WriteFileFrom: %v", err)
	}
	if res.Size != int64(len(all)) || res.SHA256 != hex.EncodeToString(sum[:]) {
		t.Fatalf("result %+v", res)
	}
	var got bytes.Buffer
	n, err := c.ReadFileTo(ctx, "/a/b/bin", &got)
	if err != nil || n != int64(len(all)) || !bytes.Equal(got.Bytes(), all) {
		t.Fatalf("ReadFileTo: n=%d err=%v equal=%v", n, err, bytes.Equal(got.Bytes(), all))
	}
	fi, err := c.Stat(ctx, "a/b/../b/bin")
	if err != nil {
		t.Fatalf("Stat: %v", err)
	}
	if fi.Path != "/a/b/bin" || fi.Type != TypeFile || fi.Size != int64(len(all)) || fi.Mode != 0o640 || time.Since(fi.MTime) > time.Minute {
		t.Fatalf("stat %+v", fi)
	}
	// No temporary file is left next to it.
	ents, _ := os.ReadDir(filepath.Join(root, "a/b"))
	if len(ents) != 1 {
		t.Fatalf("entries after write: %v", ents)
	}
}

func TestFSWriteAtomicDigestMismatch(t *testing.T) {
	c, root := newRootClient(t)
	ctx := bctx(t)
	if err := os.WriteFile(filepath.Join(root, "f"), []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := c.WriteFileFrom(ctx, "/f", strings.NewReader("new content"), WriteOptions{SHA256: strings.Repeat("0", 64)})
	if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "sha256") {
		t.Fatalf("mismatch: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "f")); string(b) != "old" {
		t.Fatalf("file changed to %q", b)
	}
	// A source that fails leaves the file too.
	_, err = c.WriteFileFrom(ctx, "/f", &failingReader{}, WriteOptions{})
	if err == nil {
		t.Fatal("failing source: no error")
	}
	if b, _ := os.ReadFile(filepath.Join(root, "f")); string(b) != "old" {
		t.Fatalf("file changed to %q", b)
	}
	// A good write keeps the old mode.
	if _, err := c.WriteFileFrom(ctx, "/f", strings.NewReader("new"), WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(filepath.Join(root, "f"))
	if b, _ := os.ReadFile(filepath.Join(root, "f")); string(b) != "new" || fi.Mode().Perm() != 0o600 {
		t.Fatalf("file %q mode %v", b, fi.Mode())
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		ents, _ := os.ReadDir(root)
		if len(ents) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("temporary files left: %v", ents)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

type failingReader struct{ n int }

func (r *failingReader) Read(p []byte) (int, error) {
	if r.n > 0 {
		return 0, errors.New("source broke")
	}
	r.n++
	return copy(p, "partial"), nil
}

func TestFSErrors(t *testing.T) {
	c, root := newRootClient(t)
	ctx := bctx(t)
	if err := os.MkdirAll(filepath.Join(root, "d/e"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "d/file"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	var sink bytes.Buffer
	_, err := c.ReadFileTo(ctx, "/missing", &sink)
	if !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("read missing: %v", err)
	}
	_, err = c.ReadFileTo(ctx, "/d", &sink)
	if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "is a directory") {
		t.Errorf("read dir: %v", err)
	}
	if _, err := c.Stat(ctx, "/missing"); remoteCode(err) != CodeNotFound {
		t.Errorf("stat missing: %v", err)
	}
	if _, err := c.WriteFileFrom(ctx, "/d", strings.NewReader("x"), WriteOptions{}); remoteCode(err) != CodeIsDirectory {
		t.Errorf("write over dir: %v", err)
	}
	if _, err := c.WriteFileFrom(ctx, "/nodir/x", strings.NewReader("x"), WriteOptions{}); remoteCode(err) != CodeNotFound {
		t.Errorf("write without parents: %v", err)
	}
	if _, _, err := c.List(ctx, "/d/file", 1); remoteCode(err) != CodeNotDirectory {
		t.Errorf("list a file: %v", err)
	}
	if err := c.Mkdir(ctx, "/d", 0, false); remoteCode(err) != CodeExists || !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("mkdir existing: %v", err)
	}
	if err := c.Remove(ctx, "/d", false); remoteCode(err) != CodeExists {
		t.Errorf("remove non-empty: %v", err)
	}
	if err := c.Remove(ctx, "/", true); err == nil {
		t.Errorf("remove / recursive: no error")
	}
	// A symlink out of the root is not followed.
	if err := os.Symlink("/etc", filepath.Join(root, "out")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ReadFileTo(ctx, "/out/hostname", &sink); err == nil {
		t.Errorf("read through a symlink out of the root: no error")
	}
	if sink.Len() != 0 {
		t.Errorf("read %d bytes from failed reads", sink.Len())
	}
	// ".." cannot climb out either: it is clean from "/".
	if err := os.WriteFile(filepath.Join(filepath.Dir(root), "beside"), []byte("x"), 0o644); err == nil {
		t.Cleanup(func() { os.Remove(filepath.Join(filepath.Dir(root), "beside")) })
		if _, err := c.Stat(ctx, "../beside"); remoteCode(err) != CodeNotFound {
			t.Errorf("stat ../beside: %v", err)
		}
	}
}

func TestFSMkdirListRemoveRename(t *testing.T) {
	c, root := newRootClient(t)
	ctx := bctx(t)
	if err := c.Mkdir(ctx, "/x/y/z", 0o700, true); err != nil {
		t.Fatal(err)
	}
	if err := c.Mkdir(ctx, "/x/y/z", 0, true); err != nil {
		t.Fatalf("mkdir -p existing: %v", err)
	}
	if fi, err := os.Stat(filepath.Join(root, "x/y/z")); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("made %v %v", fi, err)
	}
	if _, err := c.WriteFileFrom(ctx, "/x/y/f", strings.NewReader("hi"), WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("f", filepath.Join(root, "x/y/l")); err != nil {
		t.Fatal(err)
	}
	ents, trunc, err := c.List(ctx, "/x", 1)
	if err != nil || trunc || len(ents) != 1 || ents[0].Path != "/x/y" || ents[0].Type != TypeDir {
		t.Fatalf("list depth 1: %+v %v %v", ents, trunc, err)
	}
	ents, _, err = c.List(ctx, "/x", 3)
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, e := range ents {
		paths = append(paths, e.Path+":"+e.Type+":"+e.Link)
	}
	slices.Sort(paths)
	want := []string{"/x/y:dir:", "/x/y/f:file:", "/x/y/l:symlink:f", "/x/y/z:dir:"}
	slices.Sort(want)
	if !slices.Equal(paths, want) {
		t.Fatalf("list depth 3: %v, want %v", paths, want)
	}
	if err := c.Rename(ctx, "/x/y/f", "/x/g"); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(root, "x/g")); err != nil || string(b) != "hi" {
		t.Fatalf("renamed: %q %v", b, err)
	}
	if err := c.Remove(ctx, "/x", true); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "x")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("after remove -r: %v", err)
	}
	if err := c.Remove(ctx, "/x", false); remoteCode(err) != CodeNotFound {
		t.Fatalf("remove missing: %v", err)
	}
}

func TestFSListTruncated(t *testing.T) {
	c, root := newRootClient(t)
	dir := filepath.Join(root, "many")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for i := range MaxListEntries + 5 {
		f, err := os.Create(filepath.Join(dir, strings.Repeat("n", 20)+string(rune('a'+i%26))+hex.EncodeToString([]byte{byte(i >> 8), byte(i)})))
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	ents, trunc, err := c.List(bctx(t), "/many", 1)
	if err != nil || !trunc || len(ents) != MaxListEntries {
		t.Fatalf("list: %d entries, truncated %v, %v", len(ents), trunc, err)
	}
}

func TestFSWatch(t *testing.T) {
	c, root := newRootClient(t)
	if err := os.Mkdir(filepath.Join(root, "w"), 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(bctx(t))
	var mu sync.Mutex
	var got []WatchEvent
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- c.Watch(ctx, "/w", ready, func(evs []WatchEvent) {
			mu.Lock()
			got = append(got, evs...)
			mu.Unlock()
		})
	}()
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("watch: %v", err)
	}
	p := filepath.Join(root, "w", "f")
	if err := os.WriteFile(p, []byte("1"), 0o644); err != nil {
		t.Fatal(err)
	}
	for range 20 { // many writes: merged
		f, _ := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
		f.Write([]byte("x"))
		f.Close()
	}
	if err := os.Rename(p, p+"2"); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(p + "2"); err != nil {
		t.Fatal(err)
	}
	has := func(op, name, to string) bool {
		mu.Lock()
		defer mu.Unlock()
		for _, e := range got {
			if e.Op == op && e.Name == name && e.To == to {
				return true
			}
		}
		return false
	}
	deadline := time.Now().Add(5 * time.Second)
	for !(has(WatchCreate, "f", "") && has(WatchWrite, "f", "") && has(WatchRename, "f", "f2") && has(WatchRemove, "f2", "")) {
		if time.Now().After(deadline) {
			mu.Lock()
			t.Fatalf("events: %+v", got)
		}
		time.Sleep(20 * time.Millisecond)
	}
	mu.Lock()
	if len(got) > 8 {
		t.Errorf("writes not merged: %d events %+v", len(got), got)
	}
	mu.Unlock()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("watch after cancel: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("watch did not end on cancel")
	}
	// The directory going ends a watch.
	ctx2 := bctx(t)
	ready2 := make(chan struct{})
	done2 := make(chan error, 1)
	var gone bool
	go func() {
		done2 <- c.Watch(ctx2, "/w", ready2, func(evs []WatchEvent) { gone = gone || hasGone(evs) })
	}()
	<-ready2
	if err := os.Remove(filepath.Join(root, "w")); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done2:
		if err != nil || !gone {
			t.Fatalf("watch of a removed dir: %v, gone %v", err, gone)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("watch did not end when its directory went")
	}
}

func TestMergeEventsBound(t *testing.T) {
	var pending []WatchEvent
	for i := range 10 * MaxWatchBatch {
		pending = mergeEvents(pending, []WatchEvent{{Op: WatchCreate, Name: strings.Repeat("a", 3) + hex.EncodeToString([]byte{byte(i >> 8), byte(i)})}})
	}
	if len(pending) > 4*MaxWatchBatch {
		t.Fatalf("pending grew to %d", len(pending))
	}
	last := pending[len(pending)-1]
	total := 0
	for _, e := range pending {
		total += e.Count
	}
	if last.Op != WatchOverflow || total != 10*MaxWatchBatch {
		t.Fatalf("last %+v, total %d", last, total)
	}
}

func TestFSBounds(t *testing.T) {
	// A guest that lists more than MaxListEntries, or lies about a file.
	c := hostileGuest(t, func(st *yamux.Stream, req request) {
		if req.Op == opFSRead {
			return
		}
		switch req.Op {
		case opList:
			batch := make([]FileInfo, 1000)
			for i := range batch {
				batch[i] = FileInfo{Path: "/x", Type: TypeFile}
			}
			for range MaxListEntries/1000 + 1 {
				if writeJSONFrame(st, frameData, batch) != nil {
					return
				}
			}
			_ = writeFrame(st, frameOK, nil)
		case opStat:
			_ = writeJSONFrame(st, frameOK, FileInfo{Path: "/x", Type: "device", Size: -1})
		case opWatch:
			_ = writeFrame(st, frameOK, nil)
			_ = writeJSONFrame(st, frameData, make([]WatchEvent, MaxWatchBatch+1))
		case opStats:
			_ = writeJSONFrame(st, frameOK, GuestStats{CPUBusy: ^uint64(0), CPUTotal: 5, MemTotal: 10, MemAvailable: 1 << 63, DiskUsed: 7})
		}
	})
	ctx := bctx(t)
	f := c.Files("")
	_, _, err := f.List(ctx, "/", 1)
	wantProtocol(t, "list", err)
	_, err = f.Stat(ctx, "/x")
	wantProtocol(t, "stat", err)
	err = f.Watch(ctx, "/", nil, func([]WatchEvent) {})
	wantProtocol(t, "watch", err)
	st, err := c.Stats(ctx)
	if err != nil || st.CPUBusy > st.CPUTotal || st.MemAvailable > st.MemTotal || st.DiskUsed > st.DiskTotal {
		t.Errorf("stats of a lying guest: %+v %v", st, err)
	}
}

func TestFSAsUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (to change the file system uid)") // the e2e test covers it in the guest
	}
	host, guest := socketPair(t)
	root := t.TempDir()
	serve(t, &Server{Root: root}, guest)
	c := connect(t, host)
	for _, d := range []string{root, filepath.Dir(root)} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "etc/passwd"), []byte("root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(root, "private"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "private/secret"), []byte("s"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(root, "home/user"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(filepath.Join(root, "home/user"), 1000, 1000); err != nil {
		t.Fatal(err)
	}
	ctx := bctx(t)
	u := c.Files("user")
	var sink bytes.Buffer
	if _, err := u.ReadFileTo(ctx, "/private/secret", &sink); remoteCode(err) != CodePermissionDenied {
		t.Errorf("read as user: %v", err)
	}
	if _, err := u.WriteFileFrom(ctx, "/private/new", strings.NewReader("x"), WriteOptions{}); remoteCode(err) != CodePermissionDenied {
		t.Errorf("write as user: %v", err)
	}
	if _, err := u.WriteFileFrom(ctx, "/home/user/mine", strings.NewReader("x"), WriteOptions{}); err != nil {
		t.Fatalf("write as user in its home: %v", err)
	}
	fi, err := os.Stat(filepath.Join(root, "home/user/mine"))
	if err != nil || fi.Sys().(*syscall.Stat_t).Uid != 1000 {
		t.Fatalf("file written as user: %v %v", fi, err)
	}
	// Root again on the same session: the identity did not stick.
	if _, err := c.Files("").ReadFileTo(ctx, "/private/secret", &sink); err != nil || sink.String() != "s" {
		t.Fatalf("read as root after: %q %v", sink.String(), err)
	}
	if _, err := c.Files("nosuchuser").Stat(ctx, "/"); err == nil {
		t.Errorf("unknown user: no error")
	}
}

func TestStats(t *testing.T) {
	c, _, _ := newTestClient(t)
	st, err := c.Stats(bctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if st.CPUTotal == 0 || st.CPUBusy > st.CPUTotal || st.MemTotal == 0 || st.MemAvailable > st.MemTotal || st.DiskTotal == 0 {
		t.Fatalf("stats %+v", st)
	}
	busy, total := parseProcStat([]byte("cpu  10 1 5 100 4 0 2 0 7 0\ncpu0 1 2 3 4\n"))
	if busy != 18 || total != 122 {
		t.Fatalf("parseProcStat: %d %d", busy, total)
	}
	rx, tx := parseNetDev([]byte("Inter-|\n face |bytes\n    lo: 5 1 0 0 0 0 0 0 5 1 0 0 0 0 0 0\n  eth0: 100 2 0 0 0 0 0 0 200 3 0 0 0 0 0 0\n"))
	if rx != 100 || tx != 200 {
		t.Fatalf("parseNetDev: %d %d", rx, tx)
	}
}

// TestFSWatchRecursive watches a tree: events below the watched directory
// name paths relative to it, new directories are watched as they appear
// (with what was made in them before), renamed ones keep being watched
// under their new names, ones moved out are not, and a tree of more than
// MaxWatchDirs directories is watched up to the bound with a limit event
// for each directory left out.
func TestFSWatchRecursive(t *testing.T) {
	c, root := newRootClient(t)
	w := filepath.Join(root, "w")
	if err := os.MkdirAll(filepath.Join(w, "a", "b"), 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(bctx(t))
	defer cancel()
	var mu sync.Mutex
	var got []WatchEvent
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- c.WatchWith(ctx, "/w", WatchOptions{Recursive: true}, ready, func(evs []WatchEvent) {
			mu.Lock()
			got = append(got, evs...)
			mu.Unlock()
		})
	}()
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("watch: %v", err)
	}
	has := func(op, name, to string) bool {
		mu.Lock()
		defer mu.Unlock()
		for _, e := range got {
			if e.Op == op && e.Name == name && e.To == to {
				return true
			}
		}
		return false
	}
	wait := func(what string, cond func() bool) {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				mu.Lock()
				defer mu.Unlock()
				t.Fatalf("%s: events %+v", what, got)
			}
		}
	}
	write := func(rel string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(w, rel), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("a/b/f")
	wait("a file two levels down", func() bool { return has(WatchCreate, "a/b/f", "") && has(WatchWrite, "a/b/f", "") })

	// A new tree: its directories are watched, what appeared in them
	// before is reported as created.
	if err := os.MkdirAll(filepath.Join(w, "n", "deep"), 0o755); err != nil {
		t.Fatal(err)
	}
	write("n/deep/early")
	wait("a new directory", func() bool { return has(WatchCreate, "n", "") && has(WatchCreate, "n/deep/early", "") })
	write("n/deep/late")
	wait("a file in a new directory", func() bool { return has(WatchCreate, "n/deep/late", "") })

	// Renamed inside the tree: watched under its new name.
	if err := os.Rename(filepath.Join(w, "a"), filepath.Join(w, "c")); err != nil {
		t.Fatal(err)
	}
	wait("a renamed directory", func() bool { return has(WatchRename, "a", "c") })
	write("c/b/g")
	wait("a file in a renamed directory", func() bool { return has(WatchCreate, "c/b/g", "") })

	// Moved out: no longer watched.
	if err := os.Rename(filepath.Join(w, "c"), filepath.Join(root, "out")); err != nil {
		t.Fatal(err)
	}
	wait("a directory moved out", func() bool { return has(WatchRemove, "c", "") })
	if err := os.WriteFile(filepath.Join(root, "out", "b", "h"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	write("marker")
	wait("the marker", func() bool { return has(WatchCreate, "marker", "") })
	mu.Lock()
	for _, e := range got {
		if strings.HasSuffix(e.Name, "/h") || e.Name == "h" || e.Op == WatchGone || e.Op == WatchLimit {
			t.Errorf("event after the move out: %+v", e)
		}
	}
	mu.Unlock()
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("watch after cancel: %v", err)
	}

	// More directories than a watch takes.
	big := filepath.Join(root, "big")
	extra := 7
	for i := range MaxWatchDirs - 1 + extra {
		if err := os.MkdirAll(filepath.Join(big, "d"+strings.Repeat("x", i%3), "s"+strconv.Itoa(i)), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// 3 middle directories hold the rest: MaxWatchDirs-1+extra+3 below big.
	extra += 3
	var limits []string
	ctx2, cancel2 := context.WithCancel(bctx(t))
	defer cancel2()
	ready2 := make(chan struct{})
	done2 := make(chan error, 1)
	go func() {
		done2 <- c.WatchWith(ctx2, "/big", WatchOptions{Recursive: true}, ready2, func(evs []WatchEvent) {
			mu.Lock()
			for _, e := range evs {
				if e.Op == WatchLimit {
					limits = append(limits, e.Name)
				}
			}
			mu.Unlock()
		})
	}()
	select {
	case <-ready2:
	case err := <-done2:
		t.Fatalf("watch big: %v", err)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		mu.Lock()
		n := len(limits)
		mu.Unlock()
		if n >= extra {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("limit events: %d, want %d (%v)", n, extra, limits)
		}
	}
	time.Sleep(100 * time.Millisecond)
	mu.Lock()
	if len(limits) != extra {
		t.Errorf("limit events: %d, want %d", len(limits), extra)
	}
	mu.Unlock()
	cancel2()
	if err := <-done2; err != nil {
		t.Fatalf("watch big after cancel: %v", err)
	}
}

func TestIsWriteTemp(t *testing.T) {
	for _, p := range []string{"/a/b.txt", "x", "/dir/.hidden"} {
		if tmp := writeTempName(p); !IsWriteTemp(tmp) || path.Dir(tmp) != path.Dir(p) {
			t.Errorf("writeTempName(%q) = %q: not a write temp in the same directory", p, tmp)
		}
	}
	for _, name := range []string{"b.txt", ".b.firkin-12345", ".b.firkin-0123456789ag", "b.firkin-0123456789ab", ".firkin-0123456789ab"} {
		if IsWriteTemp(name) {
			t.Errorf("IsWriteTemp(%q) = true", name)
		}
	}
}
