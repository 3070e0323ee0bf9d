//go:build linux

package agent

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"strconv"
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

// watch reports the changes in one directory until the host closes the
// stream, the session ends or the directory goes.
func (s *Server) watch(ctx context.Context, st io.ReadWriteCloser, p string) {
	root, rel, err := s.fsRoot(p)
	if err != nil {
		sendError(st, fsError("watch", p, err))
		return
	}
	dir, err := root.Open(rel)
	root.Close()
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
	if _, err := unix.InotifyAddWatch(fd, "/proc/self/fd/"+strconv.Itoa(int(dir.Fd())), watchMask); err != nil {
		sendError(st, fsError("watch", p, err))
		return
	}
	// An open descriptor would keep a removed directory's inode alive, and
	// with it the IN_DELETE_SELF that ends the watch.
	_ = dir.Close()
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
		readInotify(ino, events)
	}()
	var pending []WatchEvent
	var linger <-chan time.Time
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
// is gone, and sends them in batches. A read that ends with the first half
// of a move waits a moment for the second half, so that a rename inside the
// directory is one event.
func readInotify(ino *os.File, out chan<- []WatchEvent) {
	buf := make([]byte, 64<<10)
	n := 0
	waited := false
	for {
		m, err := ino.Read(buf[n:])
		n += m
		if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			return
		}
		evs, gone, halfMove := parseInotify(buf[:n])
		if halfMove && !waited && err == nil && n < len(buf)-(4<<10) {
			waited = true
			_ = ino.SetReadDeadline(time.Now().Add(watchLinger))
			continue
		}
		_ = ino.SetReadDeadline(time.Time{})
		n, waited = 0, false
		if len(evs) > 0 {
			out <- evs
		}
		if gone {
			return
		}
	}
}

// parseInotify decodes a read of inotify events. A move within the
// directory whose two halves are in the same read becomes one rename; a
// lone half is a create (moved in) or a remove (moved out).
func parseInotify(b []byte) (evs []WatchEvent, gone, halfMove bool) {
	from := map[uint32]int{} // cookie → index of its moved-from event
	for len(b) >= unix.SizeofInotifyEvent {
		mask := binary.NativeEndian.Uint32(b[4:8])
		cookie := binary.NativeEndian.Uint32(b[8:12])
		nameLen := int(binary.NativeEndian.Uint32(b[12:16]))
		if unix.SizeofInotifyEvent+nameLen > len(b) {
			break
		}
		name := string(b[unix.SizeofInotifyEvent : unix.SizeofInotifyEvent+nameLen])
		for len(name) > 0 && name[len(name)-1] == 0 {
			name = name[:len(name)-1]
		}
		b = b[unix.SizeofInotifyEvent+nameLen:]
		isDir := mask&unix.IN_ISDIR != 0
		switch {
		case mask&unix.IN_Q_OVERFLOW != 0:
			evs = append(evs, WatchEvent{Op: WatchOverflow})
		case mask&(unix.IN_DELETE_SELF|unix.IN_MOVE_SELF|unix.IN_IGNORED) != 0:
			if !gone {
				evs = append(evs, WatchEvent{Op: WatchGone})
			}
			gone = true
		case mask&unix.IN_CREATE != 0:
			evs = append(evs, WatchEvent{Op: WatchCreate, Name: name, Dir: isDir})
		case mask&(unix.IN_MODIFY|unix.IN_CLOSE_WRITE) != 0:
			evs = append(evs, WatchEvent{Op: WatchWrite, Name: name})
		case mask&unix.IN_DELETE != 0:
			evs = append(evs, WatchEvent{Op: WatchRemove, Name: name, Dir: isDir})
		case mask&unix.IN_MOVED_FROM != 0:
			from[cookie] = len(evs)
			evs = append(evs, WatchEvent{Op: WatchRemove, Name: name, Dir: isDir})
		case mask&unix.IN_MOVED_TO != 0:
			if i, ok := from[cookie]; ok {
				evs[i].Op, evs[i].To = WatchRename, name
				delete(from, cookie)
				continue
			}
			evs = append(evs, WatchEvent{Op: WatchCreate, Name: name, Dir: isDir})
		}
	}
	return evs, gone, len(from) > 0
}
