package lowprio

import (
	"runtime"

	"golang.org/x/sys/unix"
)

// Thread locks the calling goroutine to its OS thread and gives that thread
// the lowest CPU priority; the returned func gives the thread its priority
// back and unlocks it: defer it. The thread must not end with the
// goroutine: children started from a thread that ends get their
// parent-death signal (the worker's QEMUs, Pdeathsig), and other goroutines
// must not inherit the priority. So only a process that may raise the
// priority again (root) lowers it; elsewhere Thread does nothing.
func Thread() (done func()) {
	if unix.Geteuid() != 0 {
		return func() {}
	}
	runtime.LockOSThread()
	tid := unix.Gettid()
	prev, err := unix.Getpriority(unix.PRIO_PROCESS, tid)
	if err != nil {
		runtime.UnlockOSThread()
		return func() {}
	}
	// The raw syscall returns 20 - nice.
	prev = 20 - prev
	if unix.Setpriority(unix.PRIO_PROCESS, tid, Nice) != nil {
		runtime.UnlockOSThread()
		return func() {}
	}
	return func() {
		if unix.Setpriority(unix.PRIO_PROCESS, tid, prev) != nil {
			// Keep the thread to this goroutine's end rather than hand
			// a low priority to others; Go then ends the thread, which
			// only a child started from it would notice, and none is.
			return
		}
		runtime.UnlockOSThread()
	}
}
