package testenv

import (
	"debug/elf"
	"os"
	"path/filepath"
	"testing"
)

func TestCacheDirEnv(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "c")
	t.Setenv(CacheEnv, dir)
	if got := CacheDir(t); got != dir {
		t.Errorf("CacheDir = %s, want %s", got, dir)
	}
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		t.Errorf("cache dir not made: %v", err)
	}
}

// TestAgentBinary builds the agent for both arches and checks it is a static
// binary for the right machine.
func TestAgentBinary(t *testing.T) {
	for arch, machine := range map[string]elf.Machine{"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64} {
		p := AgentBinary(t, arch)
		f, err := elf.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		if f.Machine != machine {
			t.Errorf("%s agent is for %v", arch, f.Machine)
		}
		for _, prog := range f.Progs {
			if prog.Type == elf.PT_INTERP {
				t.Errorf("%s agent is not static", arch)
			}
		}
		f.Close()
		if again := AgentBinary(t, arch); again != p {
			t.Errorf("second AgentBinary = %s, want %s", again, p)
		}
	}
}

func TestQEMUBinary(t *testing.T) {
	if b, p := QEMUBinary("arm64"); b != "qemu-system-aarch64" || p != "qemu-system-arm" {
		t.Errorf("arm64: %s %s", b, p)
	}
	if b, p := QEMUBinary("amd64"); b != "qemu-system-x86_64" || p != "qemu-system-x86" {
		t.Errorf("amd64: %s %s", b, p)
	}
	RequireQEMU(t, "amd64")
}
