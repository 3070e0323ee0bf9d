package images

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// baseModules are the modules the agent needs, in the order it loads them
// (dependencies are added before each one automatically).
var baseModules = []string{
	"virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
	"virtio_console", "virtio_blk", "virtio_net", "ext4",
	// vsock: the agent channel under VZ.
	"vmw_vsock_virtio_transport",
}

// moduleConfig maps the modules we ask for to the kernel option that builds
// them, so the kernel config decides what is built in.
var moduleConfig = map[string]string{
	"virtio_ring":                "CONFIG_VIRTIO",
	"virtio":                     "CONFIG_VIRTIO",
	"virtio_pci_modern_dev":      "CONFIG_VIRTIO_PCI_LIB",
	"virtio_pci_legacy_dev":      "CONFIG_VIRTIO_PCI_LIB_LEGACY",
	"virtio_pci":                 "CONFIG_VIRTIO_PCI",
	"virtio_mmio":                "CONFIG_VIRTIO_MMIO",
	"virtio_console":             "CONFIG_VIRTIO_CONSOLE",
	"virtio_blk":                 "CONFIG_VIRTIO_BLK",
	"virtio_net":                 "CONFIG_VIRTIO_NET",
	"ext4":                       "CONFIG_EXT4_FS",
	"vmw_vsock_virtio_transport": "CONFIG_VIRTIO_VSOCKETS",
}

// wantModules is the module list for the build's arch.
func (b *builder) wantModules() []string {
	want := slices.Clone(baseModules)
	if b.cfg.Arch == "arm64" {
		// Device trees of arm64 machines put virtio devices on MMIO.
		want = slices.Insert(want, slices.Index(want, "virtio_pci")+1, "virtio_mmio")
	}
	for _, m := range b.cfg.ExtraModules {
		m = modName(m)
		if !slices.Contains(want, m) {
			want = append(want, m)
		}
	}
	return want
}

// modulesRoot returns the lib/modules/<version> directory to take modules
// from and the kernel config path ("" when unknown). From the Debian package
// it first looks for the modules a previous build kept in the cache (see
// keepModules), which spares extracting the package when only the agent
// changed; otherwise it extracts the package and returns a keep function
// that saves the chosen modules for next time.
func (b *builder) modulesRoot(ctx context.Context) (root, config string, keep func([]module), err error) {
	if b.cfg.ModulesDir != "" {
		root = b.cfg.ModulesDir
		for _, c := range []string{
			filepath.Join(root, "config"),
			filepath.Join(root, "build", ".config"),
			filepath.Join("/boot", "config-"+filepath.Base(root)),
		} {
			if fileExists(c) {
				return root, c, nil, nil
			}
		}
		return root, "", nil, nil
	}
	kept := filepath.Join(b.cfg.CacheDir, "modules",
		strings.TrimSuffix(b.kernelDeb(), ".deb")+"-"+inputsKey(map[string]string{"modules": strings.Join(b.wantModules(), ",")}))
	if root, config, err := treeRoot(kept); err == nil && fileExists(filepath.Join(kept, ".complete")) {
		return root, config, nil, nil
	}
	tree, err := b.kernelTree(ctx)
	if err != nil {
		return "", "", nil, err
	}
	root, config, err = treeRoot(tree)
	if err != nil {
		return "", "", nil, fmt.Errorf("kernel package: %w", err)
	}
	keep = func(mods []module) {
		if err := keepModules(kept, root, config, mods); err != nil {
			b.log.Warn("keeping modules in the cache", "dir", kept, "err", err)
		}
	}
	return root, config, keep, nil
}

// treeRoot finds lib/modules/<version> and boot/config-<version> in an
// extracted kernel package (or a kept copy of one).
func treeRoot(tree string) (root, config string, err error) {
	var roots []string
	for _, pat := range []string{"lib/modules/*", "usr/lib/modules/*"} {
		m, _ := filepath.Glob(filepath.Join(tree, pat))
		roots = append(roots, m...)
	}
	if len(roots) != 1 {
		return "", "", fmt.Errorf("want one lib/modules/<version> in %s, found %v", tree, roots)
	}
	root = roots[0]
	config = filepath.Join(tree, "boot", "config-"+filepath.Base(root))
	if !fileExists(config) {
		config = ""
	}
	return root, config, nil
}

// keepModules saves the chosen (uncompressed) modules with modules.builtin
// and the kernel config as a small tree at dir, renamed into place whole.
func keepModules(dir, root, config string, mods []module) error {
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), tmpPrefix)
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	kver := filepath.Base(root)
	mroot := filepath.Join(tmp, "lib", "modules", kver)
	for _, m := range mods {
		p := filepath.Join(mroot, m.Rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(p, m.Data, 0o644); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(filepath.Join(mroot, "kernel"), 0o755); err != nil {
		return err
	}
	if fileExists(filepath.Join(root, "modules.builtin")) {
		if err := copyFile(filepath.Join(root, "modules.builtin"), filepath.Join(mroot, "modules.builtin"), 0o644); err != nil {
			return err
		}
	}
	if config != "" {
		if err := os.MkdirAll(filepath.Join(tmp, "boot"), 0o755); err != nil {
			return err
		}
		if err := copyFile(config, filepath.Join(tmp, "boot", "config-"+kver), 0o644); err != nil {
			return err
		}
	}
	if err := os.WriteFile(filepath.Join(tmp, ".complete"), nil, 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, dir); err != nil && !fileExists(filepath.Join(dir, ".complete")) {
		return err
	}
	return nil
}

// module is one kernel module to put into the initramfs.
type module struct {
	Name string
	Rel  string // path relative to the modules root, e.g. kernel/drivers/virtio/virtio.ko
	Data []byte // uncompressed
	Deps []string
}

// modName normalises a module name ("virtio-pci" and "virtio_pci" are one).
func modName(s string) string {
	s = filepath.Base(s)
	for _, ext := range []string{".xz", ".zst", ".gz"} {
		s = strings.TrimSuffix(s, ext)
	}
	s = strings.TrimSuffix(s, ".ko")
	return strings.ReplaceAll(s, "-", "_")
}

// resolveModules finds want and their dependencies under root, skipping
// built-in ones, and returns them in load order (dependencies first).
//
// Debian's kernel packages ship no modules.dep (depmod makes it when the
// package is installed), so dependencies come from each module's own
// .modinfo "depends=" (what depmod reads too) and its "softdep=pre:".
func resolveModules(root, configPath string, want []string) ([]module, error) {
	builtin := map[string]bool{}
	if f, err := os.Open(filepath.Join(root, "modules.builtin")); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if l := strings.TrimSpace(sc.Text()); l != "" {
				builtin[modName(l)] = true
			}
		}
		f.Close()
	}
	var kcfg map[string]string
	if configPath != "" {
		var err error
		if kcfg, err = readKernelConfig(configPath); err != nil {
			return nil, fmt.Errorf("kernel config: %w", err)
		}
		if kcfg["CONFIG_BLK_DEV_INITRD"] != "y" {
			return nil, fmt.Errorf("kernel config %s: CONFIG_BLK_DEV_INITRD is not y: no initramfs support", configPath)
		}
	}
	index := map[string]string{}
	err := filepath.WalkDir(filepath.Join(root, "kernel"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.Contains(d.Name(), ".ko") {
			rel, _ := filepath.Rel(root, p)
			index[modName(d.Name())] = rel
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("index modules: %w", err)
	}

	var order []module
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name string, from string, optional bool) error
	visit = func(name, from string, optional bool) error {
		switch state[name] {
		case 1:
			return fmt.Errorf("module dependency cycle at %s", name)
		case 2:
			return nil
		}
		if opt, ok := moduleConfig[name]; ok && kcfg != nil {
			switch kcfg[opt] {
			case "y":
				state[name] = 2
				return nil
			case "m":
			default:
				return fmt.Errorf("module %s: kernel has %s unset", name, opt)
			}
		}
		if builtin[name] {
			state[name] = 2
			return nil
		}
		rel, ok := index[name]
		if !ok {
			if optional {
				state[name] = 2
				return nil
			}
			if from != "" {
				return fmt.Errorf("module %s (needed by %s) is neither built in nor under %s", name, from, root)
			}
			return fmt.Errorf("module %s is neither built in nor under %s", name, root)
		}
		state[name] = 1
		data, err := readModule(filepath.Join(root, rel))
		if err != nil {
			return err
		}
		deps, soft, err := modinfoDeps(data)
		if err != nil {
			return fmt.Errorf("module %s: %w", rel, err)
		}
		slices.Sort(deps)
		for _, d := range deps {
			if err := visit(d, name, false); err != nil {
				return err
			}
		}
		for _, d := range soft {
			if err := visit(d, name, true); err != nil {
				return err
			}
		}
		state[name] = 2
		order = append(order, module{Name: name, Rel: strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(rel, ".xz"), ".zst"), ".gz"), Data: data, Deps: deps})
		return nil
	}
	for _, w := range want {
		if err := visit(modName(w), "", false); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// readModule reads a module, decompressing .ko.xz, .ko.zst and .ko.gz so the
// agent can finit_module a plain file.
func readModule(path string) ([]byte, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var r io.Reader
	switch {
	case strings.HasSuffix(path, ".xz"):
		r, err = xz.NewReader(bytes.NewReader(raw))
	case strings.HasSuffix(path, ".zst"):
		var d *zstd.Decoder
		d, err = zstd.NewReader(bytes.NewReader(raw))
		if err == nil {
			defer d.Close()
			r = d
		}
	case strings.HasSuffix(path, ".gz"):
		r, err = gzip.NewReader(bytes.NewReader(raw))
	default:
		return raw, nil
	}
	if err != nil {
		return nil, fmt.Errorf("decompress %s: %w", path, err)
	}
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, fmt.Errorf("decompress %s: %w", path, err)
	}
	return data, nil
}

// modinfoDeps reads a module's hard dependencies ("depends=") and its
// pre-load soft dependencies ("softdep=pre: a b post: c").
func modinfoDeps(data []byte) (deps, soft []string, err error) {
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		return nil, nil, err
	}
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, nil, fmt.Errorf("no .modinfo section")
	}
	info, err := sec.Data()
	if err != nil {
		return nil, nil, err
	}
	for _, kv := range bytes.Split(info, []byte{0}) {
		k, v, ok := strings.Cut(string(kv), "=")
		if !ok {
			continue
		}
		switch k {
		case "depends":
			for _, d := range strings.Split(v, ",") {
				if d = strings.TrimSpace(d); d != "" {
					deps = append(deps, modName(d))
				}
			}
		case "softdep":
			pre := false
			for _, w := range strings.Fields(v) {
				switch w {
				case "pre:":
					pre = true
				case "post:":
					pre = false
				default:
					if pre {
						soft = append(soft, modName(w))
					}
				}
			}
		}
	}
	return deps, soft, nil
}
