package images_test

import (
	"bytes"
	"context"
	"debug/elf"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cavaliergopher/cpio"

	"github.com/firkin-dev/firkin-worker/images"
	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// smokeInit builds the test init (testdata/smokeinit) for arch.
func smokeInit(t *testing.T, arch string) string {
	t.Helper()
	return testenv.StaticBinary(t, arch, "./images/testdata/smokeinit")
}

// config is a build into a fresh state dir, with downloads shared in the
// test cache.
func config(t *testing.T, arch, agent string) images.Config {
	return images.Config{
		StateDir:    t.TempDir(),
		CacheDir:    filepath.Join(testenv.CacheDir(t), "debs"),
		Arch:        arch,
		AgentBinary: agent,
		Logger:      slog.New(slog.NewTextHandler(t.Output(), nil)),
	}
}

func build(t *testing.T, cfg images.Config) (vmpool.Image, time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	start := time.Now()
	img, err := images.Build(ctx, cfg)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	return img, time.Since(start)
}

type cpioFile struct {
	hdr  cpio.Header
	data []byte
}

func readCPIO(t *testing.T, path string) (map[string]cpioFile, []string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r := cpio.NewReader(f)
	files := map[string]cpioFile{}
	var order []string
	for {
		hdr, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("read cpio: %v", err)
		}
		data, err := io.ReadAll(r)
		if err != nil {
			t.Fatal(err)
		}
		files[hdr.Name] = cpioFile{hdr: *hdr, data: data}
		order = append(order, hdr.Name)
	}
	return files, order
}

func modtime(t *testing.T, p string) time.Time {
	t.Helper()
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.ModTime()
}

func debugfs(t *testing.T, disk, cmd string) string {
	t.Helper()
	out, err := exec.Command("debugfs", "-R", cmd, disk).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs -R %q: %v\n%s", cmd, err, out)
	}
	return string(out)
}

func TestBuildAMD64(t *testing.T) {
	agent := smokeInit(t, "amd64")
	cfg := config(t, "amd64", agent)
	img, first := build(t, cfg)
	t.Logf("first build (downloads cached in %s): %v", cfg.CacheDir, first)
	dir := images.Dir(cfg)
	if img.Kernel != filepath.Join(dir, images.KernelAMD64) || img.Initramfs != filepath.Join(dir, images.InitramfsFile) ||
		filepath.Dir(img.RootDisk) != dir || !strings.HasPrefix(filepath.Base(img.RootDisk), images.RootDiskBase+"-") || img.Arch != "amd64" {
		t.Fatalf("image paths: %+v", img)
	}
	for _, p := range []string{img.Kernel, img.Initramfs, img.RootDisk} {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: %d bytes", filepath.Base(p), st.Size())
	}
	if out, err := exec.Command("file", img.Kernel).Output(); err == nil && !bytes.Contains(out, []byte("bzImage")) {
		t.Errorf("kernel is not a bzImage: %s", out)
	}

	t.Run("initramfs", func(t *testing.T) { checkInitramfs(t, img.Initramfs, agent) })
	t.Run("rootdisk", func(t *testing.T) { checkRootDisk(t, img.RootDisk, elf.EM_X86_64) })

	m1, err := images.ReadManifest(dir)
	if err != nil {
		t.Fatal(err)
	}
	kt, it, rt := modtime(t, img.Kernel), modtime(t, img.Initramfs), modtime(t, img.RootDisk)

	// A second build is a no-op.
	img2, again := build(t, cfg)
	t.Logf("no-op rebuild: %v", again)
	if img2 != img {
		t.Errorf("second build: %+v, want %+v", img2, img)
	}
	m2, err := images.ReadManifest(dir)
	if err != nil {
		t.Fatal(err)
	}
	if m2.Kernel.SHA256 != m1.Kernel.SHA256 || m2.Initramfs.SHA256 != m1.Initramfs.SHA256 {
		t.Errorf("hashes changed on a no-op build")
	}
	if !modtime(t, img.Kernel).Equal(kt) || !modtime(t, img.Initramfs).Equal(it) || !modtime(t, img.RootDisk).Equal(rt) {
		t.Errorf("a no-op build rewrote files")
	}
	if again > 2*time.Second {
		t.Errorf("no-op build took %v", again)
	}

	// A changed agent rebuilds only the initramfs.
	agent2 := filepath.Join(t.TempDir(), "agent2")
	data, err := os.ReadFile(agent)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(agent2, append(data, "changed"...), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg.AgentBinary = agent2
	_, d := build(t, cfg)
	t.Logf("rebuild after agent change: %v", d)
	m3, err := images.ReadManifest(dir)
	if err != nil {
		t.Fatal(err)
	}
	if m3.Initramfs.SHA256 == m1.Initramfs.SHA256 {
		t.Errorf("initramfs not rebuilt after the agent changed")
	}
	if m3.Kernel.SHA256 != m1.Kernel.SHA256 || !modtime(t, img.Kernel).Equal(kt) || !modtime(t, img.RootDisk).Equal(rt) {
		t.Errorf("kernel or root disk rebuilt after only the agent changed")
	}
	if d > 2*time.Second {
		t.Errorf("initramfs rebuild took %v: kept modules not used?", d)
	}
	if m3.Initramfs.Modules[0] != "virtio_ring" || len(m3.Initramfs.Modules) != len(m1.Initramfs.Modules) {
		t.Errorf("modules after rebuild: %v, want %v", m3.Initramfs.Modules, m1.Initramfs.Modules)
	}

	// A kernel override with a modules directory needs no kernel package:
	// use the built kernel and the modules the builder kept in the cache.
	kept, err := filepath.Glob(filepath.Join(cfg.CacheDir, "modules", "linux-image-*-amd64_*", "lib", "modules", "*"))
	if err != nil || len(kept) == 0 {
		t.Fatalf("no kept modules in %s: %v", cfg.CacheDir, err)
	}
	ocfg := config(t, "amd64", agent)
	ocfg.Kernel = img.Kernel
	ocfg.ModulesDir = kept[0]
	oimg, d := build(t, ocfg)
	t.Logf("build with kernel override: %v", d)
	if oimg.Kernel != img.Kernel {
		t.Errorf("override: kernel %s, want %s", oimg.Kernel, img.Kernel)
	}
	if _, err := os.Stat(filepath.Join(images.Dir(ocfg), images.KernelAMD64)); !os.IsNotExist(err) {
		t.Errorf("override: the builder still extracted a kernel (%v)", err)
	}
	om, err := images.ReadManifest(images.Dir(ocfg))
	if err != nil {
		t.Fatal(err)
	}
	if om.Initramfs.SHA256 != m1.Initramfs.SHA256 {
		t.Errorf("initramfs not reproducible: same agent and modules gave %s, then %s", m1.Initramfs.SHA256, om.Initramfs.SHA256)
	}
	files, _ := readCPIO(t, oimg.Initramfs)
	if got, want := string(files[images.ModulesListPath].data), string(mustCPIO(t, img.Initramfs)[images.ModulesListPath].data); got != want {
		t.Errorf("override: module list\n%s\nwant\n%s", got, want)
	}
}

func mustCPIO(t *testing.T, path string) map[string]cpioFile {
	files, _ := readCPIO(t, path)
	return files
}

// TestBuildConcurrent runs two builds of one directory at once: the lock
// makes one wait, and both return the same image.
func TestBuildConcurrent(t *testing.T) {
	agent := smokeInit(t, "amd64")
	cfg := config(t, "amd64", agent)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	type result struct {
		img vmpool.Image
		err error
	}
	results := make(chan result, 2)
	for range 2 {
		go func() {
			img, err := images.Build(ctx, cfg)
			results <- result{img, err}
		}()
	}
	a, b := <-results, <-results
	if a.err != nil || b.err != nil {
		t.Fatalf("builds: %v, %v", a.err, b.err)
	}
	if a.img != b.img {
		t.Errorf("concurrent builds disagree: %+v vs %+v", a.img, b.img)
	}
	m, err := images.ReadManifest(images.Dir(cfg))
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Base(a.img.RootDisk) != m.RootDisk.File {
		t.Errorf("manifest root disk %s, image %s", m.RootDisk.File, a.img.RootDisk)
	}
	ents, err := os.ReadDir(images.Dir(cfg))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".tmp-") {
			t.Errorf("leftover %s", e.Name())
		}
	}
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  images.Config
		ok   bool
	}{
		{"ok", images.Config{StateDir: "/s", Arch: "amd64", AgentBinary: "/a", DiskSize: 1 << 30}, true},
		{"no state", images.Config{Arch: "amd64", AgentBinary: "/a", DiskSize: 1 << 30}, false},
		{"bad arch", images.Config{StateDir: "/s", Arch: "riscv64", AgentBinary: "/a", DiskSize: 1 << 30}, false},
		{"no agent", images.Config{StateDir: "/s", Arch: "arm64", DiskSize: 1 << 30}, false},
		{"tiny disk", images.Config{StateDir: "/s", Arch: "arm64", AgentBinary: "/a", DiskSize: 1 << 20}, false},
		{"bad module", images.Config{StateDir: "/s", Arch: "arm64", AgentBinary: "/a", DiskSize: 1 << 30, ExtraModules: []string{"../x"}}, false},
	} {
		if err := tc.cfg.Validate(); (err == nil) != tc.ok {
			t.Errorf("%s: Validate() = %v", tc.name, err)
		}
	}
}

// checkInitramfs parses the archive back and checks /init, parents and the
// module order.
func checkInitramfs(t *testing.T, path, agent string) {
	files, order := readCPIO(t, path)
	// Reproducible metadata and sorted names.
	for i, n := range order {
		h := files[n].hdr
		if !h.ModTime.IsZero() && h.ModTime.Unix() != 0 || h.Uid != 0 || h.Guid != 0 {
			t.Errorf("%s: mtime %v uid %d gid %d, want zeros", n, h.ModTime, h.Uid, h.Guid)
		}
		if i > 0 && order[i-1] >= n {
			t.Errorf("entries not sorted: %s before %s", order[i-1], n)
		}
		for d := filepath.Dir(n); d != "."; d = filepath.Dir(d) {
			if p, ok := files[d]; !ok || !p.hdr.Mode.IsDir() {
				t.Errorf("%s: parent %s missing", n, d)
			}
		}
	}
	init, ok := files["init"]
	if !ok {
		t.Fatal("no /init")
	}
	if !init.hdr.Mode.IsRegular() || init.hdr.Mode.Perm()&0o111 == 0 {
		t.Errorf("/init mode %v: not an executable file", init.hdr.Mode)
	}
	want, _ := os.ReadFile(agent)
	if !bytes.Equal(init.data, want) {
		t.Errorf("/init is not the agent")
	}
	for _, d := range []string{"dev", "proc", "sys", "tmp", "mnt/root", "run", "etc/firkin"} {
		if f, ok := files[d]; !ok || !f.hdr.Mode.IsDir() {
			t.Errorf("directory %s missing", d)
		}
	}
	list, ok := files[images.ModulesListPath]
	if !ok {
		t.Fatal("no module list")
	}
	mods := strings.Fields(string(list.data))
	loaded := map[string]bool{}
	for _, p := range mods {
		f, ok := files[strings.TrimPrefix(p, "/")]
		if !ok {
			t.Fatalf("listed module %s not in the archive", p)
		}
		ef, err := elf.NewFile(bytes.NewReader(f.data))
		if err != nil {
			t.Fatalf("%s: not an uncompressed module: %v", p, err)
		}
		info, err := ef.Section(".modinfo").Data()
		if err != nil {
			t.Fatal(err)
		}
		for _, kv := range bytes.Split(info, []byte{0}) {
			if dep, ok := strings.CutPrefix(string(kv), "depends="); ok && dep != "" {
				for _, d := range strings.Split(dep, ",") {
					if !loaded[strings.ReplaceAll(d, "-", "_")] {
						t.Errorf("%s listed before its dependency %s", p, d)
					}
				}
			}
		}
		loaded[strings.TrimSuffix(filepath.Base(p), ".ko")] = true
	}
	for _, m := range []string{"virtio_ring", "virtio", "virtio_pci", "virtio_console", "virtio_blk", "virtio_net", "vmw_vsock_virtio_transport"} {
		if !loaded[m] {
			t.Errorf("module %s missing from %v", m, mods)
		}
	}
	t.Logf("modules: %v", mods)
}

// checkRootDisk checks the ext4 image with debugfs.
func checkRootDisk(t *testing.T, disk string, machine elf.Machine) {
	st, err := os.Stat(disk)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != images.DefaultDiskSize {
		t.Errorf("disk size %d, want %d", st.Size(), images.DefaultDiskSize)
	}
	out := debugfs(t, disk, "stat /bin/busybox")
	if !strings.Contains(out, "Type: regular") || !strings.Contains(out, "Mode:  0755") {
		t.Errorf("/bin/busybox:\n%s", out)
	}
	if out := debugfs(t, disk, "stat /bin/sh"); !strings.Contains(out, "Type: symlink") {
		t.Errorf("/bin/sh:\n%s", out)
	}
	if out := debugfs(t, disk, "stat /tmp"); !strings.Contains(out, "Mode:  01777") {
		t.Errorf("/tmp:\n%s", out)
	}
	if out := debugfs(t, disk, "stat /home/user"); !strings.Contains(out, "User:  1000") {
		t.Errorf("/home/user:\n%s", out)
	}
	if out := debugfs(t, disk, "cat /etc/passwd"); !strings.Contains(out, "nobody:x:65534") {
		t.Errorf("/etc/passwd:\n%s", out)
	}
	bb := filepath.Join(t.TempDir(), "busybox")
	debugfs(t, disk, "dump /bin/busybox "+bb)
	f, err := elf.Open(bb)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.Machine != machine {
		t.Errorf("busybox is for %v, want %v", f.Machine, machine)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Errorf("busybox is not static")
		}
	}
	if out, err := exec.Command("du", "-k", disk).Output(); err == nil {
		if f := strings.Fields(string(out)); len(f) > 0 {
			t.Logf("root disk uses %s KiB on the host", f[0])
		}
	}
}

func TestBuildARM64(t *testing.T) {
	agent := smokeInit(t, "arm64")
	cfg := config(t, "arm64", agent)
	img, first := build(t, cfg)
	t.Logf("first arm64 build: %v", first)
	f, err := os.Open(img.Kernel)
	if err != nil {
		t.Fatal(err)
	}
	head := make([]byte, 64)
	_, err = io.ReadFull(f, head)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if !images.IsARM64Image(head) || filepath.Base(img.Kernel) != images.KernelARM64 {
		t.Errorf("%s is not an uncompressed arm64 Image", img.Kernel)
	}
	t.Run("initramfs", func(t *testing.T) { checkInitramfs(t, img.Initramfs, agent) })
	t.Run("rootdisk", func(t *testing.T) { checkRootDisk(t, img.RootDisk, elf.EM_AARCH64) })
	files, _ := readCPIO(t, img.Initramfs)
	if !strings.Contains(string(files[images.ModulesListPath].data), "virtio_mmio") {
		t.Errorf("arm64 initramfs lacks virtio_mmio")
	}
	_, again := build(t, cfg)
	t.Logf("no-op arm64 rebuild: %v", again)
}
