package vz

import (
	"errors"
	"fmt"
	"io"
	"os"
)

// copyFile copies src to a new file dst with src's permission bits. It is
// the fallback of CloneFile where the file system cannot clone (and what
// the fake hypervisor uses). A partial dst is removed.
func copyFile(src, dst string) (err error) {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, st.Mode().Perm())
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
	if _, err := io.Copy(out, in); err != nil {
		return fmt.Errorf("copy %s to %s: %w", src, dst, err)
	}
	return nil
}

// stageDisk makes dst a writable clone of the disk src (a template's base
// disk or a snapshot's frozen disk, both read-only).
func stageDisk(hv hypervisor, src, dst string) error {
	if _, err := os.Stat(dst); err == nil {
		return fmt.Errorf("disk %s already exists", dst)
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := hv.CloneFile(src, dst); err != nil {
		return fmt.Errorf("clone %s: %w", src, err)
	}
	if err := os.Chmod(dst, 0o600); err != nil {
		return err
	}
	return nil
}

// freezeDisk makes dst a clone of the machine's disk src, read-only from now
// on: the disk as it was when the machine was paused. The framework writes
// the disk through the host's page cache, so src is synced first: the clone
// must see every write the paused guest made.
func freezeDisk(hv hypervisor, src, dst string) error {
	if err := syncFile(src); err != nil {
		return err
	}
	if err := hv.CloneFile(src, dst); err != nil {
		return fmt.Errorf("clone %s: %w", src, err)
	}
	return os.Chmod(dst, 0o444)
}

// syncFile flushes the cached writes of the file at path (whoever made
// them) to the file system.
func syncFile(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	serr := f.Sync()
	cerr := f.Close()
	if err := errors.Join(serr, cerr); err != nil {
		return fmt.Errorf("sync %s: %w", path, err)
	}
	return nil
}
