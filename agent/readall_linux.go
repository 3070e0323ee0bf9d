package agent

import (
	"errors"
	"io"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// batchReader returns a read function for dev that, when dev is a
// non-blocking *os.File, keeps reading until the buffer is full or no more
// data is ready. A virtio-serial port hands out at most one 4 KiB buffer per
// read(2); batching them makes each chunk that goes through the dispatcher
// larger, which matters when every goroutine switch is emulated.
func batchReader(dev io.Reader) func([]byte) (int, error) {
	f, ok := dev.(*os.File)
	if !ok {
		return dev.Read
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return dev.Read
	}
	nonblocking := false
	_ = rc.Control(func(fd uintptr) {
		flags, err := unix.FcntlInt(fd, unix.F_GETFL, 0)
		nonblocking = err == nil && flags&syscall.O_NONBLOCK != 0
	})
	if !nonblocking {
		return dev.Read
	}
	return func(p []byte) (int, error) {
		n := 0
		var rerr error
		err := rc.Read(func(fd uintptr) bool {
			for n < len(p) {
				m, err := syscall.Read(int(fd), p[n:])
				switch {
				case errors.Is(err, syscall.EINTR):
					continue
				case errors.Is(err, syscall.EAGAIN):
					return n > 0 // nothing yet: wait for readiness
				case err != nil:
					rerr = err
					return true
				case m == 0:
					if n == 0 {
						rerr = io.EOF
					}
					return true
				}
				n += m
			}
			return true
		})
		if err != nil {
			return n, err
		}
		return n, rerr
	}
}

// growPipe enlarges a pipe's buffer (best effort), so that a command
// writing a lot is switched away from less often.
func growPipe(f *os.File) {
	if rc, err := f.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) { _, _ = unix.FcntlInt(fd, unix.F_SETPIPE_SZ, 1<<20) })
	}
}
