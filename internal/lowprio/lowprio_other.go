//go:build !linux

package lowprio

// Thread does nothing where a thread's priority cannot be set on its own.
func Thread() (done func()) { return func() {} }
