// Package socketpair gives tests both ends of a host↔guest agent channel
// without a VM: a unix socket pair whose host end is a net.Conn (like QEMU's
// chardev socket) and whose guest end is a non-blocking *os.File (like the
// virtio port the agent reads).
package socketpair

import (
	"net"
	"os"
	"syscall"
	"testing"
)

// New returns the host and guest ends; both are closed when the test ends.
func New(t testing.TB) (host net.Conn, guest *os.File) {
	t.Helper()
	syscall.ForkLock.RLock()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err == nil {
		syscall.CloseOnExec(fds[0])
		syscall.CloseOnExec(fds[1])
	}
	syscall.ForkLock.RUnlock()
	if err != nil {
		t.Fatalf("socketpair: %v", err)
	}
	hf := os.NewFile(uintptr(fds[0]), "host")
	host, err = net.FileConn(hf)
	hf.Close()
	if err != nil {
		t.Fatalf("file conn: %v", err)
	}
	// Non-blocking, like the agent's virtio port: os.NewFile then uses the
	// poller, and the agent's batching reads.
	if err := syscall.SetNonblock(fds[1], true); err != nil {
		t.Fatalf("nonblock: %v", err)
	}
	guest = os.NewFile(uintptr(fds[1]), "guest")
	t.Cleanup(func() {
		host.Close()
		guest.Close()
	})
	return host, guest
}
