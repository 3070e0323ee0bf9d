package backend

import "golang.org/x/sys/unix"

// hostMemoryMB is the host's total memory in MiB (0 when unknown).
func hostMemoryMB() int {
	n, err := unix.SysctlUint64("hw.memsize")
	if err != nil {
		return 0
	}
	return int(n >> 20)
}
