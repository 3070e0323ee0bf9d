//go:build !linux

package qemu

import "syscall"

// dieWithParent has no counterpart outside Linux: machines started there
// outlive their worker, and a restarted worker cannot reattach to them.
func dieWithParent(*syscall.SysProcAttr) {}
