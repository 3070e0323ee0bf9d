package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// qemuImg runs qemu-img with args.
func (d *Driver) qemuImg(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, d.cfg.QEMUImg, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("qemu-img %s: %w: %s", args[0], err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// virtualSize returns the virtual size of the disk image at path (opened
// without taking locks: a running QEMU may hold it).
func (d *Driver) virtualSize(ctx context.Context, path string) (int64, error) {
	out, err := d.qemuImg(ctx, "info", "-U", "--output=json", path)
	if err != nil {
		if _, serr := os.Stat(path); serr != nil {
			return 0, errdefs.Wrap(errdefs.ErrNotFound, serr)
		}
		return 0, err
	}
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal(out, &info); err != nil || info.VirtualSize <= 0 {
		return 0, fmt.Errorf("qemu-img info %s: no virtual size (%v)", path, err)
	}
	return info.VirtualSize, nil
}

// createOverlay makes a qcow2 overlay at path on top of backing (format
// backingFmt, virtual size size). The backing file is not opened (-u), so a
// running QEMU's lock on it does not matter and it need not exist yet.
func (d *Driver) createOverlay(ctx context.Context, path, backing, backingFmt string, size int64) error {
	if _, err := d.qemuImg(ctx, "create", "-q", "-f", "qcow2", "-u", "-F", backingFmt, "-b", backing, path, fmt.Sprint(size)); err != nil {
		return err
	}
	return nil
}

// moveFile renames src to dst, or copies it and removes src when they are
// on different file systems.
func moveFile(src, dst string) error {
	err := os.Rename(src, dst)
	if err == nil || !errors.Is(err, syscall.EXDEV) {
		return err
	}
	if err := copySparse(src, dst); err != nil {
		return err
	}
	return os.Remove(src)
}

// linkOrCopy hard-links src to dst, or copies it (sparse) when they are on
// different file systems.
func linkOrCopy(src, dst string) error {
	err := os.Link(src, dst)
	if err == nil {
		return nil
	}
	if !errors.Is(err, syscall.EXDEV) && !errors.Is(err, syscall.EPERM) && !errors.Is(err, syscall.EMLINK) {
		return err
	}
	return copySparse(src, dst)
}

// copySparse copies src to dst, leaving holes where src has holes or
// zeroes: a RAM file is mostly untouched pages.
func copySparse(src, dst string) (err error) {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(dst)
		}
	}()
	// A reflink is instant where the file system has them (btrfs, xfs).
	if ferr := ioctlFiclone(out, in); ferr == nil {
		return nil
	}
	const chunk = 1 << 20
	buf := make([]byte, chunk)
	size := st.Size()
	var off int64
	for off < size {
		// Skip holes.
		data, serr := in.Seek(off, 3 /* SEEK_DATA */)
		if serr != nil {
			break // no more data (ENXIO) or not supported: the rest is a hole
		}
		off = data
		hole, serr := in.Seek(off, 4 /* SEEK_HOLE */)
		if serr != nil {
			hole = size
		}
		for off < hole {
			n := int64(chunk)
			if hole-off < n {
				n = hole - off
			}
			if _, err := in.ReadAt(buf[:n], off); err != nil && err != io.EOF {
				return err
			}
			if !allZero(buf[:n]) {
				if _, err := out.WriteAt(buf[:n], off); err != nil {
					return err
				}
			}
			off += n
		}
	}
	return out.Truncate(size)
}

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func ioctlFiclone(dst, src *os.File) error {
	const ficlone = 0x40049409
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, dst.Fd(), ficlone, src.Fd())
	if errno != 0 {
		return errno
	}
	return nil
}

// tail returns the last n bytes of the file at path ("" when unreadable).
func tail(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return ""
	}
	off := st.Size() - n
	if off < 0 {
		off = 0
	}
	b := make([]byte, st.Size()-off)
	k, _ := f.ReadAt(b, off)
	return string(b[:k])
}

// writeJSON writes v to path atomically.
func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// readJSON reads path into v; a missing file is errdefs.ErrNotFound.
func readJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return errdefs.Wrap(errdefs.ErrNotFound, err)
		}
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("%s: %w", filepath.Base(path), err))
	}
	return nil
}

// shellQuote quotes s for /bin/sh (migration exec: URIs run through it).
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
