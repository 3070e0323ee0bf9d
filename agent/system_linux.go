package agent

import (
	"encoding/binary"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// maxEntropy bounds how many bytes Init mixes into the pool at once.
const maxEntropy = 4096

func setHostname(name string) error {
	return unix.Sethostname([]byte(name))
}

func setClock(unixNano int64) error {
	tv := unix.NsecToTimeval(unixNano)
	return unix.Settimeofday(&tv)
}

// addEntropy mixes b into the kernel's pool and credits it, with the
// RNDADDENTROPY ioctl (struct rand_pool_info: entropy_count in bits,
// buf_size in bytes, then the bytes).
func addEntropy(b []byte) error {
	if len(b) > maxEntropy {
		b = b[:maxEntropy]
	}
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, 8+len(b)+3) // the kernel reads buf as __u32 words
	binary.NativeEndian.PutUint32(buf[0:], uint32(len(b)*8))
	binary.NativeEndian.PutUint32(buf[4:], uint32(len(b)))
	copy(buf[8:], b)
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ioErr error
	if err := rc.Control(func(fd uintptr) {
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&buf[0])))
		if errno != 0 {
			ioErr = errno
		}
	}); err != nil {
		return err
	}
	if ioErr != nil {
		return fmt.Errorf("RNDADDENTROPY: %w", ioErr)
	}
	return nil
}
