//go:build !linux && !darwin

package backend

// hostMemoryMB is 0 (unknown) where the platform is not asked.
func hostMemoryMB() int { return 0 }
