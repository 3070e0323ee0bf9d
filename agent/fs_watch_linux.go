//go:build linux

package agent

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// watchMask is what a watch asks inotify for.
const watchMask = unix.IN_CREATE | unix.IN_MODIFY | unix.IN_CLOSE_WRITE | unix.IN_DELETE |
	unix.IN_MOVED_FROM | unix.IN_MOVED_TO | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_ONLYDIR

// watchLinger is how long a watch gathers events before sending a batch,
// so that a burst of writes to one file becomes one event.
const watchLinger = 20 * time.Millisecond

// watch reports the changes in one directory (and, when recursive, in
// the directories below it, at most MaxWatchDirs of them, new ones added
// as they appear) until the host closes the stream, the session ends or
// the directory goes.
func (s *Server) watch(ctx context.Context, st io.ReadWriteCloser, p string, recursive bool) {
	root, rel, err := s.fsRoot(p)
	if err != nil {
		sendError(st, fsError("watch", p, err))
		return
	}
	defer root.Close()
	dir, err := root.Open(rel)
	if err != nil {
		sendError(st, fsError("watch", p, err))
		return
	}
	defer dir.Close() // closed early below; Close twice is harmless
	if fi, err := dir.Stat(); err != nil || !fi.IsDir() {
		if err == nil {
			err = syscall.ENOTDIR
		}
		sendError(st, fsError("watch", p, err))
		return
	}
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		sendError(st, fsError("watch", p, err))
		return
	}
	ino := os.NewFile(uintptr(fd), "inotify") // non-blocking: reads park in the poller
	defer ino.Close()
	// Watch the directory opened inside the root, through its descriptor,
	// so that no symlink can point the watch outside the root.
	wd, err := unix.InotifyAddWatch(fd, "/proc/self/fd/"+strconv.Itoa(int(dir.Fd())), watchMask)
	if err != nil {
		sendError(st, fsError("watch", p, err))
		return
	}
	// An open descriptor would keep a removed directory's inode alive, and
	// with it the IN_DELETE_SELF that ends the watch.
	_ = dir.Close()
	tree := &watchTree{root: root, rel: rel, fd: fd, recursive: recursive, rootWD: int32(wd),
		paths: map[int32]string{int32(wd): ""}, wds: map[string]int32{"": int32(wd)}}
	var pending []WatchEvent
	if recursive {
		pending = tree.addTree("", false, nil)
	}
	if err := writeFrame(st, frameOK, nil); err != nil {
		return
	}
	// The host ends the watch by closing its side; the session's end does
	// too. Either closes the inotify file, which ends the read below.
	stop := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, st)
		close(stop)
	}()
	go func() {
		select {
		case <-stop:
		case <-ctx.Done():
		}
		_ = ino.Close()
		_ = st.Close()
	}()
	events := make(chan []WatchEvent, 1)
	go func() {
		defer close(events)
		readInotify(ino, tree, events)
	}()
	var linger <-chan time.Time
	if len(pending) > 0 {
		linger = time.After(0)
	}
	for {
		select {
		case evs, ok := <-events:
			if !ok {
				if len(pending) > 0 {
					_ = writeJSONFrame(st, frameData, pending)
				}
				return
			}
			pending = mergeEvents(pending, evs)
			if linger == nil {
				linger = time.After(watchLinger)
			}
			if len(pending) < MaxWatchBatch && !hasGone(pending) {
				continue
			}
		case <-linger:
		}
		linger = nil
		for len(pending) > 0 {
			n := min(len(pending), MaxWatchBatch)
			// Blocks while the host does not read: inotify keeps queueing,
			// and says IN_Q_OVERFLOW when its queue is full.
			if err := writeJSONFrame(st, frameData, pending[:n]); err != nil {
				return
			}
			pending = pending[n:]
		}
		pending = nil
	}
}

// maxWatchScan bounds the directory entries one addTree reads (a new
// directory tree moved into a recursive watch is scanned for the
// directories to watch and the entries to report).
const maxWatchScan = 64 << 10

// watchTree is the directories of one watch: the watched one (path "")
// and, for a recursive watch, those below it, by watch descriptor and by
// path relative to the watched one. Only the goroutine reading inotify
// uses it (after set-up).
type watchTree struct {
	root      *os.Root // the guest's file system
	rel       string   // the watched directory, relative to root
	fd        int      // inotify
	recursive bool
	rootWD    int32
	paths     map[int32]string
	wds       map[string]int32
}

// add watches directory d (relative to the watched one), opened inside the
// root without following a final symlink; added is false when it was
// watched already (under another name: a bind mount) or could not be.
func (t *watchTree) add(d string) (added bool) {
	f, err := t.root.OpenFile(path.Join(t.rel, d), os.O_RDONLY|syscall.O_DIRECTORY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return false // gone already, or not a directory any more
	}
	wd, err := unix.InotifyAddWatch(t.fd, "/proc/self/fd/"+strconv.Itoa(int(f.Fd())), watchMask)
	_ = f.Close()
	if err != nil {
		return false
	}
	if _, ok := t.paths[int32(wd)]; ok {
		return false
	}
	t.paths[int32(wd)], t.wds[d] = d, int32(wd)
	return true
}

// addTree watches the directories below d (d itself too unless it is
// watched), breadth first, and returns evs with, when report is set, a
// create event for each entry found (they appeared before their directory
// was watched), a limit event for each directory left unwatched because
// the watch has MaxWatchDirs, and an overflow event when the scan stopped
// at maxWatchScan entries.
func (t *watchTree) addTree(d string, report bool, evs []WatchEvent) []WatchEvent {
	queue := []string{d}
	scanned := 0
	for len(queue) > 0 {
		cur := queue[0]
		queue = queue[1:]
		if _, ok := t.wds[cur]; !ok {
			if len(t.paths) >= MaxWatchDirs {
				evs = append(evs, WatchEvent{Op: WatchLimit, Name: cur, Dir: true})
				continue
			}
			if !t.add(cur) {
				continue
			}
		} else if cur != d {
			continue
		}
		f, err := t.root.OpenFile(path.Join(t.rel, cur), os.O_RDONLY|syscall.O_DIRECTORY|syscall.O_NOFOLLOW, 0)
		if err != nil {
			continue
		}
		for {
			ents, err := f.ReadDir(256)
			for _, e := range ents {
				name := path.Join(cur, e.Name())
				if report {
					evs = append(evs, WatchEvent{Op: WatchCreate, Name: name, Dir: e.IsDir()})
				}
				if e.IsDir() {
					queue = append(queue, name)
				}
			}
			if scanned += len(ents); scanned >= maxWatchScan {
				_ = f.Close()
				return append(evs, WatchEvent{Op: WatchOverflow})
			}
			if err != nil || len(ents) == 0 {
				break
			}
		}
		_ = f.Close()
	}
	return evs
}

// under reports whether p is d or below it.
func under(p, d string) bool {
	return p == d || strings.HasPrefix(p, d+"/")
}

// drop stops watching d and the directories below it (moved out of the
// watched tree).
func (t *watchTree) drop(d string) {
	for wd, p := range t.paths {
		if wd != t.rootWD && under(p, d) {
			_, _ = unix.InotifyRmWatch(t.fd, uint32(wd))
			delete(t.paths, wd)
			delete(t.wds, p)
		}
	}
}

// move renames directory from and those below it to to (moved inside the
// watched tree: their watches stay, their names change).
func (t *watchTree) move(from, to string) {
	for wd, p := range t.paths {
		if wd != t.rootWD && under(p, from) {
			np := to + p[len(from):]
			delete(t.wds, p)
			t.paths[wd] = np
		}
	}
	for wd, p := range t.paths {
		t.wds[p] = wd
	}
}

// events turns inotify events into watch events named by their path
// relative to the watched directory, following the tree: a directory
// created or moved into a recursive watch is watched, one removed or moved
// out is not. gone is set when the watched directory itself went. A move
// whose two halves are in raws becomes one rename; a lone half is a
// create (moved in) or a remove (moved out).
func (t *watchTree) events(raws []inotifyEvent) (evs []WatchEvent, gone bool) {
	type half struct {
		i    int
		name string
		dir  bool
	}
	from := map[uint32]half{} // cookie → its moved-from event
	for _, r := range raws {
		if r.mask&unix.IN_Q_OVERFLOW != 0 {
			evs = append(evs, WatchEvent{Op: WatchOverflow})
			continue
		}
		d, ok := t.paths[r.wd]
		if !ok {
			continue // a directory no longer watched
		}
		if r.mask&(unix.IN_DELETE_SELF|unix.IN_MOVE_SELF|unix.IN_IGNORED) != 0 {
			if r.wd != t.rootWD {
				// Its parent reports it; a watch that ended is forgotten.
				if r.mask&unix.IN_IGNORED != 0 {
					delete(t.paths, r.wd)
					if t.wds[d] == r.wd {
						delete(t.wds, d)
					}
				}
				continue
			}
			if !gone {
				evs = append(evs, WatchEvent{Op: WatchGone})
			}
			gone = true
			continue
		}
		name := path.Join(d, r.name)
		isDir := r.mask&unix.IN_ISDIR != 0
		switch {
		case r.mask&unix.IN_CREATE != 0:
			evs = append(evs, WatchEvent{Op: WatchCreate, Name: name, Dir: isDir})
			if isDir && t.recursive {
				evs = t.addTree(name, true, evs)
			}
		case r.mask&(unix.IN_MODIFY|unix.IN_CLOSE_WRITE) != 0:
			evs = append(evs, WatchEvent{Op: WatchWrite, Name: name})
		case r.mask&unix.IN_DELETE != 0:
			evs = append(evs, WatchEvent{Op: WatchRemove, Name: name, Dir: isDir})
		case r.mask&unix.IN_MOVED_FROM != 0:
			from[r.cookie] = half{i: len(evs), name: name, dir: isDir}
			evs = append(evs, WatchEvent{Op: WatchRemove, Name: name, Dir: isDir})
		case r.mask&unix.IN_MOVED_TO != 0:
			if h, ok := from[r.cookie]; ok {
				evs[h.i].Op, evs[h.i].To = WatchRename, name
				delete(from, r.cookie)
				if isDir && t.recursive {
					t.move(h.name, name)
				}
				continue
			}
			evs = append(evs, WatchEvent{Op: WatchCreate, Name: name, Dir: isDir})
			if isDir && t.recursive {
				evs = t.addTree(name, true, evs)
			}
		}
	}
	for _, h := range from {
		if h.dir && t.recursive {
			t.drop(h.name) // moved out of the tree
		}
	}
	return evs, gone
}

func hasGone(evs []WatchEvent) bool {
	for _, e := range evs {
		if e.Op == WatchGone {
			return true
		}
	}
	return false
}

// mergeEvents appends evs to pending, merging an event into an earlier one
// of the same op and name (writes to one file become one event with a
// count); pending stays at most 4*MaxWatchBatch events, beyond which one
// overflow event counts the rest.
func mergeEvents(pending, evs []WatchEvent) []WatchEvent {
next:
	for _, e := range evs {
		if e.Op != WatchRename {
			for i := len(pending) - 1; i >= 0 && i >= len(pending)-MaxWatchBatch; i-- {
				if pending[i].Op == e.Op && pending[i].Name == e.Name {
					pending[i].Count += max(e.Count, 1)
					continue next
				}
			}
		}
		if len(pending) >= 4*MaxWatchBatch-1 {
			last := &pending[len(pending)-1]
			if last.Op != WatchOverflow {
				pending = append(pending, WatchEvent{Op: WatchOverflow})
				last = &pending[len(pending)-1]
			}
			last.Count += max(e.Count, 1)
			continue
		}
		if e.Count == 0 {
			e.Count = 1
		}
		pending = append(pending, e)
	}
	return pending
}

// readInotify reads inotify events until the file is closed or the watch
// is gone, and sends them in batches, named through tree. A read that ends
// with the first half of a move waits a moment for the second half, so
// that a rename inside the watch is one event.
func readInotify(ino *os.File, tree *watchTree, out chan<- []WatchEvent) {
	buf := make([]byte, 64<<10)
	n := 0
	waited := false
	for {
		m, err := ino.Read(buf[n:])
		n += m
		if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			return
		}
		raws := decodeInotify(buf[:n])
		if halfMove(raws) && !waited && err == nil && n < len(buf)-(4<<10) {
			waited = true
			_ = ino.SetReadDeadline(time.Now().Add(watchLinger))
			continue
		}
		_ = ino.SetReadDeadline(time.Time{})
		n, waited = 0, false
		evs, gone := tree.events(raws)
		if len(evs) > 0 {
			out <- evs
		}
		if gone {
			return
		}
	}
}

// inotifyEvent is one decoded inotify event.
type inotifyEvent struct {
	wd     int32
	mask   uint32
	cookie uint32
	name   string
}

// decodeInotify decodes a read of inotify events (a cut-off last event is
// left out).
func decodeInotify(b []byte) []inotifyEvent {
	var out []inotifyEvent
	for len(b) >= unix.SizeofInotifyEvent {
		nameLen := int(binary.NativeEndian.Uint32(b[12:16]))
		if unix.SizeofInotifyEvent+nameLen > len(b) {
			break
		}
		name := string(b[unix.SizeofInotifyEvent : unix.SizeofInotifyEvent+nameLen])
		for len(name) > 0 && name[len(name)-1] == 0 {
			name = name[:len(name)-1]
		}
		out = append(out, inotifyEvent{
			wd:     int32(binary.NativeEndian.Uint32(b[0:4])),
			mask:   binary.NativeEndian.Uint32(b[4:8]),
			cookie: binary.NativeEndian.Uint32(b[8:12]),
			name:   name,
		})
		b = b[unix.SizeofInotifyEvent+nameLen:]
	}
	return out
}

// halfMove reports whether raws hold the first half of a move without its
// second.
func halfMove(raws []inotifyEvent) bool {
	from := map[uint32]bool{}
	for _, r := range raws {
		switch {
		case r.mask&unix.IN_MOVED_FROM != 0:
			from[r.cookie] = true
		case r.mask&unix.IN_MOVED_TO != 0:
			delete(from, r.cookie)
		}
	}
	return len(from) > 0
}
