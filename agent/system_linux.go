package agent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
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
	// Reseed the CRNG from the pool now (a restored or forked guest must
	// not go on with the stream its snapshot had); best effort on kernels
	// without the ioctl.
	_ = rc.Control(func(fd uintptr) {
		_, _, _ = unix.Syscall(unix.SYS_IOCTL, fd, unix.RNDRESEEDCRNG, 0)
	})
	return nil
}

// setMAC gives the guest's first ethernet interface the hardware address
// mac (a fork's own), with SIOCSIFHWADDR on the live link.
func setMAC(mac string) error {
	hw, err := net.ParseMAC(mac)
	if err != nil || len(hw) != 6 {
		return fmt.Errorf("mac %q: want 6 bytes", mac)
	}
	ifs, err := net.Interfaces()
	if err != nil {
		return err
	}
	name := ""
	for _, i := range ifs {
		if i.Flags&net.FlagLoopback == 0 && len(i.HardwareAddr) == 6 {
			name = i.Name
			break
		}
	}
	if name == "" || len(name) >= unix.IFNAMSIZ {
		return errors.New("no ethernet interface")
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	// struct ifreq: the name, then struct sockaddr (family ARPHRD_ETHER, data).
	var ifr [unix.IFNAMSIZ + 24]byte
	copy(ifr[:], name)
	binary.NativeEndian.PutUint16(ifr[unix.IFNAMSIZ:], unix.ARPHRD_ETHER)
	copy(ifr[unix.IFNAMSIZ+2:], hw)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCSIFHWADDR, uintptr(unsafe.Pointer(&ifr[0]))); errno != 0 {
		return fmt.Errorf("SIOCSIFHWADDR %s: %w", name, errno)
	}
	return nil
}
