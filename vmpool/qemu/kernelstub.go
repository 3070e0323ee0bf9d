package qemu

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// kernelStubFile is the restore kernel in a machine's directory (see
// writeKernelStub).
const kernelStubFile = "kernel-stub"

// writeKernelStub writes, in dir, the kernel a restored amd64 machine starts
// QEMU with: the real bzImage's real-mode setup (boot sector and setup
// header, as QEMU's Linux loader reads them) followed by one empty page in
// place of the compressed kernel. QEMU reads the whole -kernel file into
// its own memory and keeps it for the firmware's boot path (fw_cfg), ~14
// MiB of private memory per machine for the Debian kernel; a restored
// machine never boots (its guest runs from the migrated RAM, and -no-reboot
// ends it rather than boot again), so it needs the machine's devices — the
// same option ROM, fw_cfg, setup — but not the kernel's bytes. It returns ""
// when kernel is not a bzImage it can cut (the machine then starts with the
// real kernel, as before).
func writeKernelStub(kernel, dir string) (string, error) {
	f, err := os.Open(kernel)
	if err != nil {
		return "", err
	}
	defer f.Close()
	// Boot protocol: setup_sects at 0x1f1 (0 means 4), "HdrS" at 0x202;
	// the setup is setup_sects+1 sectors of 512 bytes.
	var hdr [0x210]byte
	if _, err := io.ReadFull(f, hdr[:]); err != nil {
		return "", nil // too short for a bzImage: no stub
	}
	if !bytes.Equal(hdr[0x202:0x206], []byte("HdrS")) || hdr[0x1fe] != 0x55 || hdr[0x1ff] != 0xaa {
		return "", nil
	}
	sects := int(hdr[0x1f1])
	if sects == 0 {
		sects = 4
	}
	setup := int64(sects+1) * 512
	st, err := f.Stat()
	if err != nil {
		return "", err
	}
	if st.Size() <= setup+4096 {
		return "", nil // nothing to save
	}
	buf := make([]byte, setup+4096)
	if _, err := f.ReadAt(buf[:setup], 0); err != nil {
		return "", fmt.Errorf("kernel setup: %w", err)
	}
	stub := filepath.Join(dir, kernelStubFile)
	if err := os.WriteFile(stub, buf, 0o644); err != nil {
		return "", err
	}
	return stub, nil
}
