//go:build linux

package agent

import (
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// asUser runs do on a thread whose file system identity (fsuid, fsgid,
// supplementary groups) is u's, so that the kernel checks permissions as
// it would for u (a root agent loses CAP_DAC_OVERRIDE and the like while
// its fsuid is not 0). Only this thread changes: the goroutine is locked
// to it, and the identity is restored before it is unlocked; a thread
// that cannot be restored is never unlocked, so it ends with the
// goroutine.
func asUser(u userInfo, do func() error) error {
	if u.uid == 0 && u.gid == 0 {
		return do()
	}
	runtime.LockOSThread()
	groups := append([]uint32{}, u.groups...)
	if len(groups) == 0 {
		groups = []uint32{u.gid}
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETGROUPS, uintptr(len(groups)), uintptr(unsafe.Pointer(&groups[0])), 0); e != 0 {
		runtime.UnlockOSThread()
		return fmt.Errorf("setgroups: %w", e)
	}
	unix.RawSyscall(unix.SYS_SETFSGID, uintptr(u.gid), 0, 0)
	unix.RawSyscall(unix.SYS_SETFSUID, uintptr(u.uid), 0, 0)
	defer func() {
		unix.RawSyscall(unix.SYS_SETFSUID, 0, 0, 0)
		unix.RawSyscall(unix.SYS_SETFSGID, 0, 0, 0)
		_, _, e := unix.RawSyscall(unix.SYS_SETGROUPS, 0, 0, 0)
		// setfsuid(-1) changes nothing and returns the current fsuid.
		cur, _, _ := unix.RawSyscall(unix.SYS_SETFSUID, ^uintptr(0), 0, 0)
		gcur, _, _ := unix.RawSyscall(unix.SYS_SETFSGID, ^uintptr(0), 0, 0)
		if e == 0 && cur == 0 && gcur == 0 {
			runtime.UnlockOSThread()
		}
	}()
	return do()
}
