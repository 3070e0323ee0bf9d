package images

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// arm64Magic is the magic of an arm64 kernel Image header, at offset 56.
var arm64Magic = []byte("ARM\x64")

// IsARM64Image reports whether data starts with an uncompressed arm64 kernel
// Image header.
func IsARM64Image(head []byte) bool {
	return len(head) >= 60 && bytes.Equal(head[56:60], arm64Magic)
}

// buildKernel copies the kernel out of the package: the bzImage as it is on
// amd64, the gzip-compressed arm64 vmlinuz decompressed to a raw Image.
func (b *builder) buildKernel(ctx context.Context, name string, in map[string]string) (Artifact, error) {
	tree, err := b.kernelTree(ctx)
	if err != nil {
		return Artifact{}, err
	}
	found, err := filepath.Glob(filepath.Join(tree, "boot", "vmlinuz-*"))
	if err != nil || len(found) != 1 {
		return Artifact{}, fmt.Errorf("kernel package: want one boot/vmlinuz-*, found %v", found)
	}
	src, err := os.Open(found[0])
	if err != nil {
		return Artifact{}, err
	}
	defer src.Close()
	tmp, err := os.CreateTemp(b.dir, tmpPrefix+name+"-")
	if err != nil {
		return Artifact{}, err
	}
	defer os.Remove(tmp.Name())
	var r io.Reader = src
	if b.cfg.Arch == "arm64" {
		br := bufio.NewReader(src)
		if head, _ := br.Peek(2); bytes.Equal(head, []byte{0x1f, 0x8b}) {
			zr, err := gzip.NewReader(br)
			if err != nil {
				return Artifact{}, fmt.Errorf("decompress %s: %w", found[0], err)
			}
			r = zr
		} else {
			r = br
		}
	}
	if _, err := io.Copy(tmp, r); err != nil {
		tmp.Close()
		return Artifact{}, fmt.Errorf("copy kernel: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return Artifact{}, err
	}
	if b.cfg.Arch == "arm64" {
		head := make([]byte, 64)
		f, err := os.Open(tmp.Name())
		if err != nil {
			return Artifact{}, err
		}
		_, err = io.ReadFull(f, head)
		f.Close()
		if err != nil || !IsARM64Image(head) {
			return Artifact{}, fmt.Errorf("%s is not an arm64 Image (no ARM\\x64 magic at offset 56)", found[0])
		}
	}
	return b.install(tmp.Name(), name, in, true)
}

// checkELF checks that path is an ELF executable for arch, and static when
// static is set (no program interpreter).
func checkELF(path, arch string, static bool) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	defer f.Close()
	want := map[string]elf.Machine{"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64}[arch]
	if f.Machine != want {
		return fmt.Errorf("%s is built for %v, want %v (%s)", path, f.Machine, want, arch)
	}
	if static {
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				return fmt.Errorf("%s is dynamically linked; it must be static (CGO_ENABLED=0)", path)
			}
		}
	}
	return nil
}

// readKernelConfig parses a kernel config file into CONFIG_X -> value ("y",
// "m", ...); unset options are absent.
func readKernelConfig(path string) (map[string]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	cfg := map[string]string{}
	for _, line := range strings.Split(string(data), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && strings.HasPrefix(k, "CONFIG_") {
			cfg[k] = v
		}
	}
	return cfg, nil
}
