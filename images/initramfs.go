package images

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path"
	"slices"
	"strings"

	"github.com/cavaliergopher/cpio"
)

// initramfsDirs are the directories the agent expects at boot.
var initramfsDirs = []string{"dev", "proc", "sys", "tmp", "mnt/root", "run", "etc/firkin"}

// cpioEntry is one file of an archive being written.
type cpioEntry struct {
	mode cpio.FileMode // type and permission bits
	data []byte        // regular files from memory
	file string        // regular files from disk
	link string        // symlinks
}

// cpioTree collects entries by path (no leading slash) and writes them
// sorted, with every parent directory present and reproducible metadata.
type cpioTree map[string]cpioEntry

func (t cpioTree) addParents(p string) {
	for d := path.Dir(p); d != "." && d != "/"; d = path.Dir(d) {
		if _, ok := t[d]; !ok {
			t[d] = cpioEntry{mode: cpio.TypeDir | 0o755}
		}
	}
}

func (t cpioTree) dir(p string, perm cpio.FileMode) {
	t[p] = cpioEntry{mode: cpio.TypeDir | perm}
	t.addParents(p)
}

func (t cpioTree) bytes(p string, perm cpio.FileMode, data []byte) {
	t[p] = cpioEntry{mode: cpio.TypeReg | perm, data: data}
	t.addParents(p)
}

func (t cpioTree) file(p string, perm cpio.FileMode, src string) {
	t[p] = cpioEntry{mode: cpio.TypeReg | perm, file: src}
	t.addParents(p)
}

// write writes the archive: entries sorted by name (a parent sorts before
// its children), mtime 0, uid and gid 0.
func (t cpioTree) write(w io.Writer) error {
	names := make([]string, 0, len(t))
	for n := range t {
		names = append(names, n)
	}
	slices.Sort(names)
	cw := cpio.NewWriter(w)
	for _, n := range names {
		e := t[n]
		hdr := &cpio.Header{Name: n, Mode: e.mode, Links: 1}
		var src io.Reader
		switch {
		case e.mode&cpio.ModeType == cpio.TypeDir:
			hdr.Links = 2
		case e.mode&cpio.ModeType == cpio.TypeSymlink:
			hdr.Linkname = e.link
			hdr.Size = int64(len(e.link))
			src = strings.NewReader(e.link)
		case e.file != "":
			f, err := os.Open(e.file)
			if err != nil {
				return err
			}
			err = writeCPIOFile(cw, hdr, f)
			f.Close()
			if err != nil {
				return fmt.Errorf("cpio %s: %w", n, err)
			}
			continue
		default:
			hdr.Size = int64(len(e.data))
			src = bytes.NewReader(e.data)
		}
		if err := cw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("cpio %s: %w", n, err)
		}
		if src != nil {
			if n, err := io.Copy(cw, src); err != nil {
				return fmt.Errorf("cpio %s: %w", hdr.Name, err)
			} else if n != hdr.Size {
				return fmt.Errorf("cpio %s: wrote %d of %d bytes", hdr.Name, n, hdr.Size)
			}
		}
	}
	if err := cw.Close(); err != nil {
		return fmt.Errorf("cpio: %w", err)
	}
	return nil
}

// buildInitramfs writes the agent as /init, the directories it needs, the
// modules and the list of modules in load order.
func (b *builder) buildInitramfs(ctx context.Context, in map[string]string) (Artifact, error) {
	root, config, keep, err := b.modulesRoot(ctx)
	if err != nil {
		return Artifact{}, err
	}
	mods, err := resolveModules(root, config, b.wantModules())
	if err != nil {
		return Artifact{}, err
	}
	if keep != nil {
		keep(mods)
	}
	kver := path.Base(root)
	t := cpioTree{}
	for _, d := range initramfsDirs {
		t.dir(d, 0o755)
	}
	t.dir("tmp", 0o1777)
	t.file("init", 0o755, b.cfg.AgentBinary)
	var list strings.Builder
	var names []string
	for _, m := range mods {
		p := path.Join("lib/modules", kver, m.Rel)
		t.bytes(p, 0o644, m.Data)
		list.WriteString("/" + p + "\n")
		names = append(names, m.Name)
	}
	t.bytes(ModulesListPath, 0o644, []byte(list.String()))

	tmp, err := os.CreateTemp(b.dir, tmpPrefix+InitramfsFile+"-")
	if err != nil {
		return Artifact{}, err
	}
	defer os.Remove(tmp.Name())
	if err := t.write(tmp); err != nil {
		tmp.Close()
		return Artifact{}, err
	}
	if err := tmp.Close(); err != nil {
		return Artifact{}, err
	}
	a, err := b.install(tmp.Name(), InitramfsFile, in, true)
	a.Modules = names
	b.log.Info("initramfs modules", "kernel", kver, "modules", strings.Join(names, " "))
	return a, err
}

// writeCPIOFile writes a regular file from disk, its size taken from the open
// file so a concurrent rename cannot make header and data disagree.
func writeCPIOFile(cw *cpio.Writer, hdr *cpio.Header, f *os.File) error {
	st, err := f.Stat()
	if err != nil {
		return err
	}
	hdr.Size = st.Size()
	if err := cw.WriteHeader(hdr); err != nil {
		return err
	}
	if n, err := io.Copy(cw, f); err != nil {
		return fmt.Errorf("copy: %w", err)
	} else if n != hdr.Size {
		return fmt.Errorf("wrote %d of %d bytes", n, hdr.Size)
	}
	return nil
}
