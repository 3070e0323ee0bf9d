package backend

import "runtime"

// Host-derived admission defaults. Idle agent sandboxes use little CPU, so
// vCPUs are overcommitted; guest memory is not: the default hands out at
// most what the host has, less a reserve for the host, the worker and QEMU's
// own overhead.
const (
	// vcpuOvercommit is how many vCPUs are handed out per host core.
	vcpuOvercommit = 32
	// hostReserveMB is the memory kept back for the host, and the least
	// reserve is the larger of this and hostReservePercent of it.
	hostReserveMB      = 1024
	hostReservePercent = 10
)

// DefaultLimits derives admission limits from the host: 32 vCPUs per core
// and the host's memory less max(1 GiB, 10 %) (read where the platform
// tells; else a conservative 4 GiB), and 64 sandboxes.
func DefaultLimits() Limits {
	return defaultLimits(runtime.NumCPU(), hostMemoryMB())
}

func defaultLimits(cores, memMB int) Limits {
	if cores < 1 {
		cores = 1
	}
	if memMB <= 0 {
		memMB = 4 << 10
	}
	reserve := max(hostReserveMB, memMB*hostReservePercent/100)
	mem := max(memMB-reserve, MinMemoryMB)
	return Limits{MaxSessions: 64, MaxVCPUs: cores * vcpuOvercommit, MaxMemoryMB: mem}
}
