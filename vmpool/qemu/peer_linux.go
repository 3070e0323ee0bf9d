package qemu

import (
	"fmt"
	"net"

	"golang.org/x/sys/unix"
)

// checkPeer checks that the process at the other end of the unix socket c
// is pid (SO_PEERCRED: for a dialled socket the credentials the listener
// had when it called listen, for an accepted one those of the process that
// connected).
func checkPeer(c net.Conn, pid int) error {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return nil
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil {
		return err
	}
	if cerr != nil {
		return cerr
	}
	if int(cred.Pid) != pid {
		return fmt.Errorf("the peer is pid %d, not the machine's QEMU (pid %d)", cred.Pid, pid)
	}
	return nil
}
