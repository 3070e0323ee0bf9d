package qemu

import "syscall"

// dieWithParent makes QEMU get SIGKILL when the process that started it
// exits (tests and --keep-machines=false never leak machines).
func dieWithParent(attr *syscall.SysProcAttr) { attr.Pdeathsig = syscall.SIGKILL }
