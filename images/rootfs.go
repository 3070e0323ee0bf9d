package images

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// hostBusyboxPath is where Debian's busybox-static installs busybox.
const hostBusyboxPath = "/bin/busybox"

// busyboxSource is the busybox binary that goes onto the root disk.
type busyboxSource struct {
	path    string
	version string
	key     string // identifies the binary in the manifest
}

// busybox finds the static busybox for the build's arch: the host's own
// (busybox-static) for the host arch, else from the busybox-static package
// of that arch.
func (b *builder) busybox(ctx context.Context) (busyboxSource, error) {
	if b.hostBusybox() {
		out, err := run(ctx, "", "dpkg-query", "-W", "-f", "${Version}", "busybox-static")
		if err != nil {
			return busyboxSource{}, fmt.Errorf("busybox-static is not installed (scripts/deps.sh or apt-get install busybox-static): %w", err)
		}
		if err := checkELF(hostBusyboxPath, b.cfg.Arch, true); err != nil {
			return busyboxSource{}, fmt.Errorf("busybox: %w", err)
		}
		sum, err := sha256File(hostBusyboxPath)
		if err != nil {
			return busyboxSource{}, err
		}
		v := strings.TrimSpace(string(out))
		return busyboxSource{path: hostBusyboxPath, version: v, key: "installed:" + sum}, nil
	}
	// The package is downloaded and extracted only when the root disk is
	// rebuilt (busyboxPath); its file name identifies it until then.
	v := b.apt.BusyboxVersion
	return busyboxSource{version: v, key: "deb:" + debFileName("busybox-static", v, b.cfg.Arch)}, nil
}

// busyboxPath returns a path to the busybox binary, extracting the package
// when it comes from one.
func (b *builder) busyboxPath(ctx context.Context, src busyboxSource) (string, error) {
	if src.path != "" {
		return src.path, nil
	}
	deb, err := b.download(ctx, "busybox-static", src.version)
	if err != nil {
		return "", err
	}
	dir, err := b.extractDeb(ctx, deb)
	if err != nil {
		return "", err
	}
	p := filepath.Join(dir, "bin", "busybox")
	if err := checkELF(p, b.cfg.Arch, true); err != nil {
		return "", fmt.Errorf("busybox from %s: %w", filepath.Base(deb), err)
	}
	return p, nil
}

// applets lists busybox's applets as paths (bin/ls, usr/bin/awk, ...) from
// the host busybox, which is the same build as the guest's.
func applets(ctx context.Context) ([]string, error) {
	bb, err := exec.LookPath("busybox")
	if err != nil {
		bb = hostBusyboxPath
	}
	out, err := run(ctx, "", bb, "--list-full")
	if err != nil {
		return nil, fmt.Errorf("list busybox applets (install busybox-static: scripts/deps.sh): %w", err)
	}
	var list []string
	for _, l := range strings.Split(string(out), "\n") {
		l = strings.Trim(strings.TrimSpace(l), "/")
		if l == "" || strings.Contains(l, "..") || l == "bin/busybox" {
			continue
		}
		list = append(list, l)
	}
	if len(list) < 10 {
		return nil, fmt.Errorf("busybox --list-full listed only %d applets", len(list))
	}
	return list, nil
}

// rootfsFiles are the small files of the tiny template.
var rootfsFiles = map[string]string{
	"etc/passwd": "root:x:0:0:root:/root:/bin/sh\n" +
		"user:x:1000:1000:user:/home/user:/bin/sh\n" +
		"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
	"etc/group":    "root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n",
	"etc/shadow":   "root:*:1::::::\nuser:*:1::::::\nnobody:*:1::::::\n",
	"etc/hostname": "firkin\n",
	"etc/hosts":    "127.0.0.1\tlocalhost\n::1\tlocalhost\n",
	"etc/profile": "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n" +
		"export HOME=${HOME:-/root}\n" +
		"umask 022\n",
}

// rootfsDirs are the tiny template's directories and their modes.
var rootfsDirs = map[string]os.FileMode{
	"bin": 0o755, "sbin": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755,
	"usr/local/bin": 0o755, "etc": 0o755, "dev": 0o755, "proc": 0o555, "sys": 0o555,
	"run": 0o755, "mnt": 0o755, "opt": 0o755, "var/log": 0o755,
	"root": 0o700, "home/user": 0o755,
	"tmp": os.ModeSticky | 0o777, "var/tmp": os.ModeSticky | 0o777,
}

// buildRootDisk lays out busybox, its applet links and a minimal /etc in a
// staging directory and makes a sparse ext4 image of it.
func (b *builder) buildRootDisk(ctx context.Context, src busyboxSource, name string, in map[string]string) (Artifact, error) {
	bbPath, err := b.busyboxPath(ctx, src)
	if err != nil {
		return Artifact{}, err
	}
	list, err := applets(ctx)
	if err != nil {
		return Artifact{}, err
	}
	tmp, err := b.tempDir()
	if err != nil {
		return Artifact{}, err
	}
	stage := filepath.Join(tmp, "root")
	for d, mode := range rootfsDirs {
		p := filepath.Join(stage, d)
		if err := os.MkdirAll(p, 0o755); err != nil {
			return Artifact{}, err
		}
		if err := os.Chmod(p, mode); err != nil {
			return Artifact{}, err
		}
	}
	for name, content := range rootfsFiles {
		mode := os.FileMode(0o644)
		if name == "etc/shadow" {
			mode = 0o640
		}
		if err := os.WriteFile(filepath.Join(stage, name), []byte(content), mode); err != nil {
			return Artifact{}, err
		}
	}
	if err := copyFile(bbPath, filepath.Join(stage, "bin", "busybox"), 0o755); err != nil {
		return Artifact{}, err
	}
	for _, a := range list {
		p := filepath.Join(stage, a)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return Artifact{}, err
		}
		if err := os.Symlink("/bin/busybox", p); err != nil && !os.IsExist(err) {
			return Artifact{}, err
		}
	}
	if _, err := os.Lstat(filepath.Join(stage, "bin", "sh")); err != nil {
		if err := os.Symlink("/bin/busybox", filepath.Join(stage, "bin", "sh")); err != nil {
			return Artifact{}, err
		}
	}
	// mkfs.ext4 -d copies owners from the staging tree. As root, make them
	// right there; otherwise fix them in the image afterwards.
	asRoot := os.Geteuid() == 0
	if asRoot {
		if err := os.Lchown(filepath.Join(stage, "home", "user"), 1000, 1000); err != nil {
			return Artifact{}, err
		}
	}
	repro := reproducible(name)

	disk := filepath.Join(tmp, name)
	if err := b.step("mkfs.ext4", func() error {
		f, err := os.Create(disk)
		if err != nil {
			return err
		}
		if err := f.Truncate(b.cfg.DiskSize); err != nil {
			f.Close()
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
		// lazy_itable_init=0: initialise inode tables now, not in the guest
		// (which would write them into every sandbox's overlay).
		// lazy_journal_init=1: the file is new and sparse, so the journal
		// reads as zeros without writing 32 MiB of them (2.6 MB on disk
		// instead of 35 MB).
		_, err = runEnv(ctx, repro.env, "", "mkfs.ext4", "-q", "-F", "-L", "firkin-tiny", "-m", "0", "-U", repro.uuid,
			"-d", stage, "-E", "root_owner=0:0,lazy_itable_init=0,lazy_journal_init=1,hash_seed="+repro.uuid, disk)
		return err
	}); err != nil {
		return Artifact{}, err
	}
	if err := fixInodes(ctx, stage, disk, !asRoot, repro); err != nil {
		return Artifact{}, err
	}
	a, err := b.install(disk, name, in, false)
	if err != nil {
		return a, err
	}
	// The base disk is read-only from now on.
	return a, os.Chmod(filepath.Join(b.dir, name), 0o444)
}

// fixInodes rewrites, with debugfs, what mkfs.ext4 -d copied from the
// staging tree that is not the same on every host: each inode's times (the
// staging files' are when they were made and read), and, for builds that do
// not run as root (owners), every inode's owner to root and /home/user's to
// 1000.
func fixInodes(ctx context.Context, stage, disk string, owners bool, repro recipe) error {
	var script strings.Builder
	err := filepath.Walk(stage, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(stage, p)
		path := "/" + rel
		if rel == "." {
			path = "/"
		}
		for _, field := range []string{"atime", "mtime", "ctime", "crtime"} {
			fmt.Fprintf(&script, "sif %q %s @%d\nsif %q %s_extra 0\n", path, field, rootfsEpoch, path, field)
		}
		if owners {
			id := "0"
			if rel == filepath.Join("home", "user") {
				id = "1000"
			}
			fmt.Fprintf(&script, "sif %q uid %s\nsif %q gid %s\n", path, id, path, id)
		}
		return nil
	})
	if err != nil {
		return err
	}
	sf := disk + ".debugfs"
	if err := os.WriteFile(sf, []byte(script.String()), 0o644); err != nil {
		return err
	}
	defer os.Remove(sf)
	_, err = runEnv(ctx, repro.env, "", "debugfs", "-w", "-f", sf, disk)
	return err
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("copy %s: %w", src, err)
	}
	return out.Close()
}
