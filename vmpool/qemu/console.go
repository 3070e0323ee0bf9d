package qemu

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"
)

// The guest's serial console reaches the host through a unix socket the
// worker listens on and QEMU connects to (-chardev socket,server=off,
// reconnect=1): the worker listens before QEMU starts, so no early output is
// lost, and after a worker restart QEMU reconnects to the socket Reattach
// listens on again. What arrives goes to console.log, capped: when it
// reaches half the cap it becomes console.log.1 (replacing the older one)
// and a new console.log begins, so the two together never pass the cap
// however much the guest writes. Only QEMU's own connection is taken: the
// peer of every accepted connection must be the machine's QEMU process
// (SO_PEERCRED), others are dropped.

// consoleSock is the name of the console socket in the socket directory.
const consoleSock = "console.sock"

// consoleOld is the suffix of the older half of a console log.
const consoleOld = ".1"

// consoleDrain is how long the reader keeps reading after QEMU exited
// before it gives up on the connection (the kernel hands over what is
// buffered at once; this only bounds a stuck peer).
const consoleDrain = 2 * time.Second

// consoleConnect bounds how long a start waits for QEMU to connect its
// console before it lets the guest run anyway.
const consoleConnect = 5 * time.Second

// consoleLog copies the console stream into a capped log file. It ends when
// the machine's process has exited (after draining what QEMU wrote) or when
// closed.
type consoleLog struct {
	ln   *net.UnixListener
	w    *cappedFile
	log  *slog.Logger
	done chan struct{} // closed when the reader has ended and the file is closed

	connected     chan struct{} // closed at QEMU's first connection
	connectedOnce sync.Once

	pid   int           // the machine's QEMU, the only peer taken
	ready chan struct{} // closed by expect once pid is known

	mu     sync.Mutex
	conn   net.Conn
	closed bool
	stop   chan struct{} // closed by close
}

// listenConsole listens on sock (replacing a stale socket left by an
// earlier worker) and copies every connection of QEMU (see expect) into
// path, capped at capBytes, until exited is closed and the stream is
// drained, or close is called. With gid non-zero QEMU runs confined, as
// another user of group gid: the socket becomes the worker's and that
// group's, 0660. Its directory must then be root's (the confined socket
// directory, see ownFiles), so that the path names the socket just made.
func listenConsole(sock, path string, capBytes int64, gid uint32, exited <-chan struct{}, log *slog.Logger) (*consoleLog, error) {
	if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		return nil, err
	}
	// Unconfined, QEMU is the worker's user and the socket's mode (from
	// the umask) lets it connect; its directory is the worker's, 0700.
	if gid != 0 {
		if err := errors.Join(os.Lchown(sock, -1, int(gid)), os.Chmod(sock, 0o660)); err != nil {
			ln.Close()
			return nil, err
		}
	}
	w, err := openCapped(path, capBytes, log)
	if err != nil {
		ln.Close()
		return nil, err
	}
	c := &consoleLog{ln: ln, w: w, log: log, done: make(chan struct{}), stop: make(chan struct{}),
		connected: make(chan struct{}), ready: make(chan struct{})}
	go c.watch(exited)
	go c.run()
	return c, nil
}

// watch stops accepting once the process exited, and cuts the connection
// after consoleDrain if QEMU's end has not closed by then.
func (c *consoleLog) watch(exited <-chan struct{}) {
	select {
	case <-exited:
	case <-c.stop:
		return
	case <-c.done:
		return
	}
	c.ln.Close()
	t := time.NewTimer(consoleDrain)
	defer t.Stop()
	select {
	case <-t.C:
		c.close()
	case <-c.stop:
	case <-c.done:
	}
}

func (c *consoleLog) run() {
	defer close(c.done)
	defer c.w.close()
	for {
		conn, err := c.ln.Accept()
		if err != nil {
			return
		}
		select { // the pid to check against, once QEMU has started
		case <-c.ready:
		case <-c.stop:
			conn.Close()
			return
		}
		if err := checkPeer(conn, c.pid); err != nil {
			c.log.Warn("console: dropped a connection that is not QEMU's", "err", err)
			conn.Close()
			continue
		}
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			conn.Close()
			return
		}
		c.conn = conn
		c.mu.Unlock()
		c.connectedOnce.Do(func() { close(c.connected) })
		c.log.Debug("console connected")
		_, _ = io.Copy(c.w, conn) // the writer never fails; ends at EOF or close
		conn.Close()
		c.mu.Lock()
		c.conn = nil
		c.mu.Unlock()
	}
}

// expect tells the reader the pid of the machine's QEMU, the only peer
// whose connections it takes; until then a connection waits. It is safe on
// nil and called once.
func (c *consoleLog) expect(pid int) {
	if c == nil {
		return
	}
	c.pid = pid
	close(c.ready)
}

// close stops the reader at once (what QEMU has not yet sent is not read)
// and waits for it. It is safe on nil and more than once.
func (c *consoleLog) close() {
	if c == nil {
		return
	}
	c.mu.Lock()
	if !c.closed {
		c.closed = true
		close(c.stop)
		c.ln.Close()
		if c.conn != nil {
			c.conn.Close()
		}
	}
	c.mu.Unlock()
	<-c.done
}

// waitConnected waits up to d for QEMU's first connection (QEMU connects
// from a thread of its own as it starts), or until ctx ends or the process
// exited. A console that does not connect is logged, not an error: the
// machine runs without its log.
func (c *consoleLog) waitConnected(ctx context.Context, d time.Duration, exited <-chan struct{}) {
	if c == nil {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-c.connected:
	case <-t.C:
		c.log.Warn("QEMU did not connect its console in time; early console output may be lost", "waited", d)
	case <-ctx.Done():
	case <-exited:
	}
}

// wait waits up to d for the reader to end (it ends by itself once the
// process exited and its output is in the file).
func (c *consoleLog) wait(d time.Duration) {
	if c == nil {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-c.done:
	case <-t.C:
	}
}

// cappedFile appends to path and rotates it to path+".1" whenever it
// reaches half the cap. Write never fails: a console that cannot be logged
// (a full disk) is dropped, logged once.
type cappedFile struct {
	path   string
	half   int64
	log    *slog.Logger
	f      *os.File
	size   int64
	failed bool
}

func openCapped(path string, capBytes int64, log *slog.Logger) (*cappedFile, error) {
	w := &cappedFile{path: path, half: capBytes / 2, log: log}
	if w.half < 1 {
		w.half = 1
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	w.f, w.size = f, st.Size()
	return w, nil
}

func (w *cappedFile) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		if w.size >= w.half {
			if err := w.rotate(); err != nil {
				w.fail(err)
				return n, nil
			}
		}
		k := int64(len(p))
		if room := w.half - w.size; k > room {
			k = room
		}
		m, err := w.f.Write(p[:k])
		w.size += int64(m)
		if err != nil {
			w.fail(err)
			return n, nil
		}
		p = p[k:]
	}
	return n, nil
}

// rotate makes the current file the older half and starts a new one.
func (w *cappedFile) rotate() error {
	if w.f != nil {
		w.f.Close()
		w.f = nil
	}
	if err := os.Rename(w.path, w.path+consoleOld); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	f, err := os.OpenFile(w.path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	w.f, w.size = f, 0
	return nil
}

func (w *cappedFile) fail(err error) {
	if !w.failed {
		w.failed = true
		w.log.Warn("console log: dropping guest console output", "path", w.path, "err", err)
	}
}

func (w *cappedFile) close() {
	if w.f != nil {
		w.f.Close()
		w.f = nil
	}
}

// consoleTail returns the last n bytes of the console log at path, reading
// into the older half when the current one is shorter.
func consoleTail(path string, n int64) string {
	cur := tail(path, n)
	if rest := n - int64(len(cur)); rest > 0 {
		return tail(path+consoleOld, rest) + cur
	}
	return cur
}
