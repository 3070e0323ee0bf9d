package backend

import "golang.org/x/sys/unix"

// hostMemoryMB is the host's total memory in MiB (0 when unknown).
func hostMemoryMB() int {
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil {
		return 0
	}
	return int(uint64(si.Totalram) * uint64(si.Unit) >> 20)
}
