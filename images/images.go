// Package images builds the guest images the worker boots: a kernel taken from
// Debian's cloud kernel package, an initramfs holding the guest agent (as /init)
// and the kernel modules it loads, and the root disk of the built-in template
// "tiny" (busybox on ext4).
//
// Build lays the files out under StateDir/images/<arch>/:
//
//	vmlinuz          amd64 kernel (bzImage), or
//	Image            arm64 kernel (raw, uncompressed: VZ needs it so)
//	initramfs.cpio   newc cpio, uncompressed: /init is the agent
//	tiny-<key>.ext4  the tiny template's root disk (sparse, 1 GiB by default)
//	manifest.json    the inputs every file was built from
//
// The root disk is named after its inputs (<key> is a hash of them) and old
// ones are never replaced or removed by Build: overlays and frozen snapshot
// disks name their backing file by path, so a disk must not change under
// them. Deleting root disks that nothing references any more is up to the
// caller. The kernel and initramfs are replaced in place (atomically): a
// running machine has read them already, and a restore does not re-read them
// into guest memory.
//
// Build is incremental: it compares the inputs of each file with the manifest
// and rebuilds only the files whose inputs changed. Every file is written to a
// temporary name and renamed into place, and a lock file serialises builders,
// so several processes may call Build for the same directory at once.
//
// Downloaded packages are kept in CacheDir and reused. Building needs the
// Debian tools apt-get, apt-cache, dpkg, dpkg-deb, mkfs.ext4 and (for amd64)
// the busybox-static package; scripts/deps.sh installs them.
package images

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/firkin-dev/firkin-worker/internal/atomicfile"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// BuilderVersion is part of every file's inputs: bump it when the builder
// starts to produce different files from the same inputs, so existing images
// are rebuilt.
const BuilderVersion = "1"

// DefaultDiskSize is the apparent size of the tiny root disk. The file is
// sparse, so the free space costs no host disk until the guest writes to it
// (and guests write to copy-on-write overlays, never to the base disk).
const DefaultDiskSize = 1 << 30

// File names inside StateDir/images/<arch>/.
const (
	KernelAMD64   = "vmlinuz"
	KernelARM64   = "Image"
	InitramfsFile = "initramfs.cpio"
	RootDiskBase  = "tiny" // root disk: tiny-<key>.ext4
	ManifestFile  = "manifest.json"
	lockFileName  = ".lock"
	tmpPrefix     = atomicfile.TempPrefix
)

// ModulesListPath is where the initramfs lists the modules the agent loads,
// one absolute in-initramfs path a line, in load order (dependencies first).
const ModulesListPath = "etc/firkin/modules"

// Config says what to build and where.
type Config struct {
	// StateDir is the worker's state directory; images go to
	// StateDir/images/<arch>/. Required.
	StateDir string
	// CacheDir keeps downloaded .deb packages. Default: StateDir/cache.
	CacheDir string
	// Arch is "amd64" or "arm64". Default: the host's (runtime.GOARCH).
	Arch string
	// AgentBinary is the static guest agent (built from ./cmd/firkin-agent
	// for Arch); it becomes /init. Required.
	AgentBinary string
	// Kernel, when set, is used as the guest kernel as it is (not copied):
	// a bzImage on amd64, an uncompressed Image on arm64. Its modules must
	// still match it: they come from ModulesDir when set, and otherwise from
	// the Debian package as without Kernel (so the override must then be the
	// same kernel version as the package).
	Kernel string
	// ModulesDir is a lib/modules/<version> directory to take modules from
	// instead of the Debian package (it needs modules.builtin beside the
	// kernel/ tree). Only the path is recorded in the manifest: changes
	// inside the directory are not detected (delete the initramfs, or use a
	// new path, to rebuild).
	ModulesDir string
	// ExtraModules are loaded after the standard set (their dependencies
	// are resolved too).
	ExtraModules []string
	// DiskSize is the apparent size of the tiny root disk in bytes.
	// Default: DefaultDiskSize.
	DiskSize int64
	// Logger receives progress of the long steps. Default: discard.
	Logger *slog.Logger
}

// Validate checks the configuration (after defaults were applied).
func (c Config) Validate() error {
	var errs []error
	if c.StateDir == "" {
		errs = append(errs, errors.New("state dir is required"))
	}
	if c.Arch != "amd64" && c.Arch != "arm64" {
		errs = append(errs, fmt.Errorf("arch %q: want amd64 or arm64", c.Arch))
	}
	if c.AgentBinary == "" {
		errs = append(errs, errors.New("agent binary is required"))
	}
	if c.DiskSize < 64<<20 {
		errs = append(errs, fmt.Errorf("disk size %d: want at least 64 MiB", c.DiskSize))
	}
	for _, m := range c.ExtraModules {
		if m == "" || strings.ContainsAny(m, "/\\ \t\n") {
			errs = append(errs, fmt.Errorf("extra module %q: not a module name", m))
		}
	}
	return errors.Join(errs...)
}

func (c Config) withDefaults() Config {
	if c.Arch == "" {
		c.Arch = runtime.GOARCH
	}
	if c.CacheDir == "" && c.StateDir != "" {
		c.CacheDir = filepath.Join(c.StateDir, "cache")
	}
	if c.DiskSize == 0 {
		c.DiskSize = DefaultDiskSize
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// Dir is the directory Build writes the images of cfg's arch to.
func Dir(cfg Config) string {
	cfg = cfg.withDefaults()
	return filepath.Join(cfg.StateDir, "images", cfg.Arch)
}

// Manifest records what each file of an image directory was built from.
type Manifest struct {
	BuilderVersion string `json:"builder_version"`
	Arch           string `json:"arch"`
	// Apt caches the package resolution, valid while the apt lists are
	// unchanged (asking apt-cache costs about a second).
	Apt       AptResolution `json:"apt"`
	Kernel    Artifact      `json:"kernel"`
	Initramfs Artifact      `json:"initramfs"`
	RootDisk  Artifact      `json:"root_disk"`
}

// AptResolution is which packages the Debian metapackages resolved to.
type AptResolution struct {
	ListsStamp     string `json:"lists_stamp"`
	KernelPackage  string `json:"kernel_package"` // e.g. linux-image-6.1.0-56-cloud-amd64
	KernelVersion  string `json:"kernel_version"`
	BusyboxVersion string `json:"busybox_version"`
}

// Artifact is one built file and the inputs it was built from.
type Artifact struct {
	File   string            `json:"file"`
	SHA256 string            `json:"sha256,omitempty"`
	Size   int64             `json:"size"`
	Inputs map[string]string `json:"inputs"`
	// Modules lists the modules in the initramfs, in load order.
	Modules []string `json:"modules,omitempty"`
}

// ReadManifest reads the manifest of an image directory.
func ReadManifest(dir string) (Manifest, error) {
	var m Manifest
	b, err := os.ReadFile(filepath.Join(dir, ManifestFile))
	if err != nil {
		return m, fmt.Errorf("read manifest: %w", err)
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("decode manifest %s: %w", dir, err)
	}
	return m, nil
}

// Build makes (or reuses) the image of cfg.Arch and returns its paths.
func Build(ctx context.Context, cfg Config) (vmpool.Image, error) {
	cfg = cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return vmpool.Image{}, fmt.Errorf("images: %w", err)
	}
	dir := Dir(cfg)
	for _, d := range []string{dir, cfg.CacheDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return vmpool.Image{}, fmt.Errorf("images: %w", err)
		}
	}
	unlock, err := lockPath(ctx, filepath.Join(dir, lockFileName))
	if err != nil {
		return vmpool.Image{}, fmt.Errorf("images: lock %s: %w", dir, err)
	}
	defer unlock()

	b := &builder{cfg: cfg, dir: dir, log: cfg.Logger.With("arch", cfg.Arch)}
	defer b.cleanup()
	img, err := b.build(ctx)
	if err != nil {
		return vmpool.Image{}, fmt.Errorf("images: build %s: %w", cfg.Arch, err)
	}
	return img, nil
}

type builder struct {
	cfg Config
	dir string
	log *slog.Logger

	old     Manifest
	apt     AptResolution
	tmpDirs []string
	kdir    string // extracted kernel package (lazily)
}

func (b *builder) cleanup() {
	for _, d := range b.tmpDirs {
		if err := os.RemoveAll(d); err != nil {
			b.log.Warn("remove temporary directory", "dir", d, "err", err)
		}
	}
}

// tempDir makes a temporary directory inside the image directory, removed at
// the end of the build.
func (b *builder) tempDir() (string, error) {
	d, err := os.MkdirTemp(b.dir, tmpPrefix)
	if err != nil {
		return "", err
	}
	b.tmpDirs = append(b.tmpDirs, d)
	return d, nil
}

// step runs fn, logging its name and duration.
func (b *builder) step(name string, fn func() error) error {
	start := time.Now()
	b.log.Info("image step", "step", name)
	if err := fn(); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	b.log.Info("image step done", "step", name, "duration", time.Since(start).Round(time.Millisecond))
	return nil
}

func (b *builder) build(ctx context.Context) (vmpool.Image, error) {
	start := time.Now()
	// Leftovers of builds that died half-way.
	if ents, err := os.ReadDir(b.dir); err == nil {
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), tmpPrefix) {
				_ = os.RemoveAll(filepath.Join(b.dir, e.Name()))
			}
		}
	}
	old, err := ReadManifest(b.dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		b.log.Warn("ignoring unreadable manifest", "err", err)
	}
	if old.BuilderVersion != BuilderVersion || old.Arch != b.cfg.Arch {
		old = Manifest{}
	}
	b.old = old
	if err := b.resolve(ctx); err != nil {
		return vmpool.Image{}, err
	}
	agentSum, err := sha256File(b.cfg.AgentBinary)
	if err != nil {
		return vmpool.Image{}, fmt.Errorf("agent binary: %w", err)
	}
	if err := checkELF(b.cfg.AgentBinary, b.cfg.Arch, true); err != nil {
		return vmpool.Image{}, fmt.Errorf("agent binary: %w", err)
	}

	m := Manifest{BuilderVersion: BuilderVersion, Arch: b.cfg.Arch, Apt: b.apt}
	built := 0
	// Write the manifest after every file, so a later failure does not
	// throw away work done.
	save := func() error { return writeManifest(b.dir, m) }

	// Kernel.
	img := vmpool.Image{Arch: b.cfg.Arch}
	kernelFile := KernelAMD64
	if b.cfg.Arch == "arm64" {
		kernelFile = KernelARM64
	}
	if b.cfg.Kernel != "" {
		if !fileExists(b.cfg.Kernel) {
			return vmpool.Image{}, fmt.Errorf("kernel %s: not a regular file", b.cfg.Kernel)
		}
		img.Kernel = b.cfg.Kernel
		m.Kernel = Artifact{File: b.cfg.Kernel, Inputs: map[string]string{"override": b.cfg.Kernel}}
	} else {
		in := map[string]string{"builder": BuilderVersion, "package": b.kernelDeb()}
		a, ok := b.reuse(b.old.Kernel, kernelFile, in)
		if !ok {
			if err := b.step("kernel", func() error {
				var err error
				a, err = b.buildKernel(ctx, kernelFile, in)
				return err
			}); err != nil {
				return vmpool.Image{}, err
			}
			built++
		}
		m.Kernel = a
		img.Kernel = filepath.Join(b.dir, kernelFile)
		if err := save(); err != nil {
			return vmpool.Image{}, err
		}
	}

	// Initramfs.
	modSrc := "package:" + b.kernelDeb()
	if b.cfg.ModulesDir != "" {
		modSrc = "dir:" + b.cfg.ModulesDir
	}
	in := map[string]string{
		"builder":      BuilderVersion,
		"agent_sha256": agentSum,
		"modules_from": modSrc,
		"modules":      strings.Join(b.wantModules(), ","),
	}
	a, ok := b.reuse(b.old.Initramfs, InitramfsFile, in)
	if !ok {
		if err := b.step("initramfs", func() error {
			var err error
			a, err = b.buildInitramfs(ctx, in)
			return err
		}); err != nil {
			return vmpool.Image{}, err
		}
		built++
	}
	m.Initramfs = a
	img.Initramfs = filepath.Join(b.dir, InitramfsFile)
	if err := save(); err != nil {
		return vmpool.Image{}, err
	}

	// Root disk.
	bb, err := b.busybox(ctx)
	if err != nil {
		return vmpool.Image{}, err
	}
	in = map[string]string{
		"builder":         BuilderVersion,
		"busybox_version": bb.version,
		"busybox":         bb.key,
		"disk_size":       fmt.Sprint(b.cfg.DiskSize),
		"rootfs":          rootfsRecipe,
	}
	diskFile := RootDiskBase + "-" + inputsKey(in) + ".ext4"
	a, ok = b.reuse(b.old.RootDisk, diskFile, in)
	if !ok {
		if err := b.step("root disk", func() error {
			var err error
			a, err = b.buildRootDisk(ctx, bb, diskFile, in)
			return err
		}); err != nil {
			return vmpool.Image{}, err
		}
		built++
	}
	m.RootDisk = a
	img.RootDisk = filepath.Join(b.dir, diskFile)
	if err := save(); err != nil {
		return vmpool.Image{}, err
	}
	b.log.Info("image ready", "dir", b.dir, "rebuilt", built, "duration", time.Since(start).Round(time.Millisecond))
	return img, nil
}

// reuse returns the old artifact when its inputs equal in and its file is
// still there with the recorded size.
func (b *builder) reuse(old Artifact, file string, in map[string]string) (Artifact, bool) {
	if old.File != file || !maps.Equal(old.Inputs, in) {
		return Artifact{}, false
	}
	st, err := os.Stat(filepath.Join(b.dir, file))
	if err != nil || !st.Mode().IsRegular() || st.Size() != old.Size {
		return Artifact{}, false
	}
	return old, true
}

// install renames the finished temporary file tmp to name in the image
// directory and describes it.
func (b *builder) install(tmp, name string, in map[string]string, hash bool) (Artifact, error) {
	a := Artifact{File: name, Inputs: in}
	st, err := os.Stat(tmp)
	if err != nil {
		return a, err
	}
	a.Size = st.Size()
	if hash {
		if a.SHA256, err = sha256File(tmp); err != nil {
			return a, err
		}
	}
	if err := os.Chmod(tmp, 0o644); err != nil {
		return a, err
	}
	if err := os.Rename(tmp, filepath.Join(b.dir, name)); err != nil {
		return a, fmt.Errorf("install %s: %w", name, err)
	}
	return a, nil
}

func writeManifest(dir string, m Manifest) error {
	data, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return fmt.Errorf("encode manifest: %w", err)
	}
	return writeFileAtomic(filepath.Join(dir, ManifestFile), append(data, '\n'))
}

func writeFileAtomic(path string, data []byte) error {
	return atomicfile.Write(path, data, 0o644)
}

// inputsKey is a short stable hash of an inputs map.
func inputsKey(in map[string]string) string {
	h := sha256.New()
	for _, k := range slices.Sorted(maps.Keys(in)) {
		fmt.Fprintf(h, "%s=%s\n", k, in[k])
	}
	return hex.EncodeToString(h.Sum(nil))[:12]
}

func sha256File(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("hash %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
