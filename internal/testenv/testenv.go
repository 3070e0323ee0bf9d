// Package testenv gives tests real guest images quickly: the guest agent built
// for an arch, images built once into a cache that survives test runs and is
// shared by test binaries running in parallel, and a check that QEMU is
// installed.
//
// The cache is $FIRKIN_TEST_CACHE, or firkin-test-cache in os.TempDir().
// Images are rebuilt only when an input changed (see package images), so a
// warm cache costs a few milliseconds per call.
package testenv

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/images"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// CacheEnv names the environment variable that overrides the cache directory.
const CacheEnv = "FIRKIN_TEST_CACHE"

// Per test binary memo of what was built.
var (
	mu       sync.Mutex
	binaries = map[string]string{}       // "arch pkg" -> path
	built    = map[string]vmpool.Image{} // "arch agent name" -> image
)

// buildTimeout bounds an image build (a first build downloads about 30 MB).
const buildTimeout = 10 * time.Minute

// CacheDir returns the shared test cache directory, creating it.
func CacheDir(t testing.TB) string {
	t.Helper()
	dir := os.Getenv(CacheEnv)
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "firkin-test-cache")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("testenv: cache dir: %v", err)
	}
	return dir
}

// RepoRoot returns the root of the firkin-worker module (the directory
// holding go.mod).
func RepoRoot(t testing.TB) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("testenv: cannot locate the source tree")
	}
	root := filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatalf("testenv: no go.mod at %s: %v", root, err)
	}
	return root
}

// CheckArch fails the test unless arch is "amd64" or "arm64".
func CheckArch(t testing.TB, arch string) {
	t.Helper()
	if arch != "amd64" && arch != "arm64" {
		t.Fatalf("testenv: arch %q: want amd64 or arm64", arch)
	}
}

// StaticBinary builds the Go package pkg (a path relative to the module root,
// e.g. "./cmd/firkin-agent") as a static binary for arch into the cache and
// returns its path. It always runs go build: with Go's build cache an
// unchanged package costs well under a second, and a changed one is never
// stale. The binary is renamed into place, so parallel test binaries share it
// safely.
//
// Within one test binary the result is remembered: the sources do not change
// while it runs.
func StaticBinary(t testing.TB, arch, pkg string) string {
	t.Helper()
	CheckArch(t, arch)
	key := arch + " " + pkg
	mu.Lock()
	defer mu.Unlock()
	if p, ok := binaries[key]; ok {
		return p
	}
	dir := filepath.Join(CacheDir(t), "bin", arch)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	name := filepath.Base(strings.TrimSuffix(pkg, "/"))
	out := filepath.Join(dir, name)
	tmp, err := os.CreateTemp(dir, "."+name+"-")
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	tmp.Close()
	t.Cleanup(func() { os.Remove(tmp.Name()) })

	gobin, err := exec.LookPath("go")
	if err != nil {
		gobin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, gobin, "build", "-trimpath", "-ldflags=-s -w", "-o", tmp.Name(), pkg)
	cmd.Dir = RepoRoot(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+arch)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("testenv: go build %s for %s: %v\n%s", pkg, arch, err, b)
	}
	if err := os.Rename(tmp.Name(), out); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	binaries[key] = out
	return out
}

// AgentBinary builds the guest agent (./cmd/firkin-agent) for arch, static,
// and returns its path in the cache.
func AgentBinary(t testing.TB, arch string) string {
	t.Helper()
	return StaticBinary(t, arch, "./cmd/firkin-agent")
}

// Image returns the guest image for arch with the current agent as /init,
// built (or reused) in the shared cache.
func Image(t testing.TB, arch string) vmpool.Image {
	t.Helper()
	return ImageWithAgent(t, arch, AgentBinary(t, arch), "agent")
}

// ImageWithAgent builds the image for arch with agent as /init into the
// cache's state directory called name. Give every distinct agent its own
// name, or the builds for one name keep replacing each other's initramfs.
func ImageWithAgent(t testing.TB, arch, agent, name string) vmpool.Image {
	t.Helper()
	CheckArch(t, arch)
	key := arch + " " + agent + " " + name
	mu.Lock()
	img, ok := built[key]
	mu.Unlock()
	if ok {
		return img
	}
	cache := CacheDir(t)
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	img, err := images.Build(ctx, images.Config{
		StateDir:    filepath.Join(cache, "state-"+name),
		CacheDir:    filepath.Join(cache, "debs"),
		Arch:        arch,
		AgentBinary: agent,
		Logger:      slog.New(slog.NewTextHandler(t.Output(), nil)),
	})
	if err != nil {
		t.Fatalf("testenv: build %s image: %v\n(missing tools? run scripts/deps.sh as root)", arch, err)
	}
	mu.Lock()
	built[key] = img
	mu.Unlock()
	return img
}

// QEMUBinary names the QEMU system emulator for arch and the Debian package
// that installs it.
func QEMUBinary(arch string) (binary, pkg string) {
	if arch == "arm64" {
		return "qemu-system-aarch64", "qemu-system-arm"
	}
	return "qemu-system-x86_64", "qemu-system-x86"
}

// RequireQEMU fails the test (it never skips) when the QEMU system emulator
// for arch or qemu-img is missing, saying how to install them. It returns the
// emulator's path.
func RequireQEMU(t testing.TB, arch string) string {
	t.Helper()
	CheckArch(t, arch)
	bin, pkg := QEMUBinary(arch)
	p, err := exec.LookPath(bin)
	if err != nil {
		t.Fatalf("testenv: %s not found: these tests boot real VMs. Install it with scripts/deps.sh (as root), or apt-get install -y %s qemu-utils", bin, pkg)
	}
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Fatal("testenv: qemu-img not found: install it with scripts/deps.sh (as root), or apt-get install -y qemu-utils")
	}
	return p
}
