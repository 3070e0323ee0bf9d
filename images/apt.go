package images

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
)

const aptListsDir = "/var/lib/apt/lists"

// kernelMeta is the Debian metapackage that always depends on the current
// cloud kernel of an architecture.
func kernelMeta(arch string) string { return "linux-image-cloud-" + arch }

// needKernelPackage reports whether the build needs the Debian kernel
// package (for the kernel, the modules or both).
func (b *builder) needKernelPackage() bool {
	return b.cfg.Kernel == "" || b.cfg.ModulesDir == ""
}

// hostBusybox reports whether the root disk takes the host's installed
// busybox (same arch) rather than one from a downloaded package.
func (b *builder) hostBusybox() bool { return b.cfg.Arch == runtime.GOARCH }

// resolve finds the concrete kernel package and the busybox version. The
// answer is cached in the manifest while the apt lists stay unchanged.
func (b *builder) resolve(ctx context.Context) error {
	if !b.needKernelPackage() && b.hostBusybox() {
		return nil
	}
	stamp := listsStamp()
	valid := func(r AptResolution) bool { return r.valid(stamp) }
	if valid(b.old.Apt) {
		b.apt = b.old.Apt
		return nil
	}
	// Another image directory sharing the cache may have asked already.
	shared := filepath.Join(b.cfg.CacheDir, "apt-"+b.cfg.Arch+".json")
	if data, err := os.ReadFile(shared); err == nil {
		var r AptResolution
		if json.Unmarshal(data, &r) == nil && valid(r) {
			b.apt = r
			return nil
		}
	}
	if err := ensureForeignArch(ctx, b.cfg.Arch, b.log); err != nil {
		return err
	}
	var res AptResolution
	err := b.step("resolve packages", func() error {
		var err error
		res, err = aptResolve(ctx, b.cfg.Arch)
		if errors.Is(err, errNoPackage) {
			// Lists missing or stale: update once and ask again.
			if uerr := aptUpdate(ctx, b.log); uerr != nil {
				return errors.Join(err, uerr)
			}
			res, err = aptResolve(ctx, b.cfg.Arch)
		}
		return err
	})
	if err != nil {
		return err
	}
	res.ListsStamp = listsStamp()
	b.apt = res
	if data, err := json.Marshal(res); err == nil {
		if err := writeFileAtomic(shared, data); err != nil {
			b.log.Warn("caching the package resolution", "err", err)
		}
	}
	return nil
}

// Debian package names and versions (Debian Policy 5.6.1 and 5.6.12).
var (
	debPackagePattern = regexp.MustCompile(`^[a-z0-9][a-z0-9+.-]+$`)
	debVersionPattern = regexp.MustCompile(`^[A-Za-z0-9.+~:-]*$`)
)

// valid reports whether r, cached in a manifest or the cache directory,
// can be used with apt lists of stamp. The names and versions must be
// Debian's: they make package file names in the cache and apt-get
// arguments, so a tampered file must not name a path or an option.
func (r AptResolution) valid(stamp string) bool {
	return r.ListsStamp != "" && r.ListsStamp == stamp && r.BusyboxVersion != "" &&
		debPackagePattern.MatchString(r.KernelPackage) && debVersionPattern.MatchString(r.KernelVersion) &&
		debVersionPattern.MatchString(r.BusyboxVersion)
}

// listsStamp changes whenever apt-get update replaces a list.
func listsStamp() string {
	st, err := os.Stat(aptListsDir)
	if err != nil {
		return ""
	}
	return fmt.Sprint(st.ModTime().UnixNano())
}

var errNoPackage = errors.New("package not found in the apt lists")

// aptResolve asks apt-cache (one call: each costs about a second) which
// kernel package the metapackage depends on and the busybox-static version.
func aptResolve(ctx context.Context, arch string) (AptResolution, error) {
	var res AptResolution
	meta := kernelMeta(arch)
	out, err := run(ctx, "", "apt-cache", "show", "--no-all-versions", meta+":"+arch, "busybox-static:"+arch)
	if err != nil {
		if bytes.Contains(out, []byte("No packages found")) || bytes.Contains(out, []byte("Unable to locate")) {
			return res, fmt.Errorf("%s, busybox-static:%s: %w", meta, arch, errNoPackage)
		}
		return res, err
	}
	for _, st := range parseStanzas(out) {
		switch st["Package"] {
		case meta:
			for _, dep := range strings.Split(st["Depends"], ",") {
				f := strings.Fields(dep)
				if len(f) > 0 && strings.HasPrefix(f[0], "linux-image-") && strings.HasSuffix(f[0], "-"+arch) {
					res.KernelPackage = f[0]
					if len(f) >= 3 && f[1] == "(=" {
						res.KernelVersion = strings.TrimSuffix(f[2], ")")
					}
				}
			}
		case "busybox-static":
			res.BusyboxVersion = st["Version"]
		}
	}
	if res.KernelPackage == "" || res.BusyboxVersion == "" {
		return res, fmt.Errorf("%s -> %q, busybox-static %q: %w", meta, res.KernelPackage, res.BusyboxVersion, errNoPackage)
	}
	if res.KernelVersion == "" {
		out, err := run(ctx, "", "apt-cache", "show", "--no-all-versions", res.KernelPackage+":"+arch)
		if err != nil {
			return res, err
		}
		for _, st := range parseStanzas(out) {
			res.KernelVersion = st["Version"]
		}
	}
	return res, nil
}

// parseStanzas parses deb822 paragraphs (continuation lines are dropped).
func parseStanzas(out []byte) []map[string]string {
	var all []map[string]string
	cur := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.TrimSpace(line) == "" {
			if len(cur) > 0 {
				all = append(all, cur)
				cur = map[string]string{}
			}
			continue
		}
		if line[0] == ' ' || line[0] == '\t' {
			continue
		}
		if k, v, ok := strings.Cut(line, ":"); ok {
			cur[k] = strings.TrimSpace(v)
		}
	}
	if len(cur) > 0 {
		all = append(all, cur)
	}
	return all
}

// debFileName is the name apt-get download gives a package file.
func debFileName(pkg, version, arch string) string {
	return pkg + "_" + strings.ReplaceAll(version, ":", "%3a") + "_" + arch + ".deb"
}

// kernelDeb is the kernel package's file name ("" when not needed).
func (b *builder) kernelDeb() string {
	if !b.needKernelPackage() {
		return ""
	}
	return debFileName(b.apt.KernelPackage, b.apt.KernelVersion, b.cfg.Arch)
}

// download returns the path of a package file in the cache, downloading it
// when neither the cache nor apt's own archive holds it.
func (b *builder) download(ctx context.Context, pkg, version string) (string, error) {
	name := debFileName(pkg, version, b.cfg.Arch)
	cached := filepath.Join(b.cfg.CacheDir, name)
	if _, err := os.Stat(cached); err == nil {
		return cached, nil
	}
	if p := filepath.Join("/var/cache/apt/archives", name); fileExists(p) {
		return p, nil
	}
	err := b.step("download "+pkg, func() error {
		tmp, err := os.MkdirTemp(b.cfg.CacheDir, tmpPrefix)
		if err != nil {
			return err
		}
		defer os.RemoveAll(tmp)
		// apt drops privileges to _apt, which cannot write to our cache.
		if _, err := run(ctx, tmp, "apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", pkg+":"+b.cfg.Arch+"="+version); err != nil {
			return err
		}
		got, err := filepath.Glob(filepath.Join(tmp, "*.deb"))
		if err != nil || len(got) != 1 {
			return fmt.Errorf("apt-get download %s: got %v", pkg, got)
		}
		return os.Rename(got[0], cached)
	})
	if err != nil {
		return "", err
	}
	return cached, nil
}

// extractDeb unpacks a package into a new temporary directory.
func (b *builder) extractDeb(ctx context.Context, deb string) (string, error) {
	dir, err := b.tempDir()
	if err != nil {
		return "", err
	}
	err = b.step("extract "+filepath.Base(deb), func() error {
		_, err := run(ctx, "", "dpkg-deb", "-x", deb, dir)
		return err
	})
	return dir, err
}

// kernelTree downloads and extracts the kernel package once per build.
func (b *builder) kernelTree(ctx context.Context) (string, error) {
	if b.kdir != "" {
		return b.kdir, nil
	}
	deb, err := b.download(ctx, b.apt.KernelPackage, b.apt.KernelVersion)
	if err != nil {
		return "", err
	}
	dir, err := b.extractDeb(ctx, deb)
	if err != nil {
		return "", err
	}
	b.kdir = dir
	return dir, nil
}

// ensureForeignArch adds arch to dpkg's architectures (and updates the apt
// lists) when it is neither the native nor an added foreign one.
func ensureForeignArch(ctx context.Context, arch string, log interface {
	Info(string, ...any)
}) error {
	native, err := run(ctx, "", "dpkg", "--print-architecture")
	if err != nil {
		return err
	}
	if strings.TrimSpace(string(native)) == arch {
		return nil
	}
	unlock, err := lockPath(ctx, filepath.Join(os.TempDir(), "firkin-apt.lock"))
	if err != nil {
		return fmt.Errorf("apt lock: %w", err)
	}
	defer unlock()
	foreign, err := run(ctx, "", "dpkg", "--print-foreign-architectures")
	if err != nil {
		return err
	}
	for _, a := range strings.Fields(string(foreign)) {
		if a == arch {
			return nil
		}
	}
	log.Info("adding dpkg architecture", "add", arch)
	if _, err := run(ctx, "", "dpkg", "--add-architecture", arch); err != nil {
		return err
	}
	return aptUpdateLocked(ctx, log)
}

func aptUpdate(ctx context.Context, log interface{ Info(string, ...any) }) error {
	unlock, err := lockPath(ctx, filepath.Join(os.TempDir(), "firkin-apt.lock"))
	if err != nil {
		return fmt.Errorf("apt lock: %w", err)
	}
	defer unlock()
	return aptUpdateLocked(ctx, log)
}

func aptUpdateLocked(ctx context.Context, log interface{ Info(string, ...any) }) error {
	log.Info("running apt-get update")
	_, err := run(ctx, "", "apt-get", "-q", "update")
	return err
}

// run runs a command and returns its combined output; the error carries the
// output's tail.
func run(ctx context.Context, dir, name string, args ...string) ([]byte, error) {
	return runEnv(ctx, nil, dir, name, args...)
}

// runEnv is run with env added to the command's environment.
func runEnv(ctx context.Context, env []string, dir, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(append(os.Environ(), "LC_ALL=C", "DEBIAN_FRONTEND=noninteractive"), env...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Run(); err != nil {
		tail := out.String()
		if len(tail) > 2000 {
			tail = "..." + tail[len(tail)-2000:]
		}
		if errors.Is(err, exec.ErrNotFound) {
			return out.Bytes(), fmt.Errorf("%s not found (install it: scripts/deps.sh): %w", name, err)
		}
		return out.Bytes(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(tail))
	}
	return out.Bytes(), nil
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}
