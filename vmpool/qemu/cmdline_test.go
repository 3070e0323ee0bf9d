package qemu

import (
	"errors"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

var update = flag.Bool("update", false, "rewrite the golden command lines in testdata")

// goodConfig is a valid amd64 boot configuration.
func goodConfig() vmConfig {
	return vmConfig{
		Name: "a", Arch: "amd64", Machine: "q35", Accel: "tcg", TBSizeMB: 64, VCPUs: 1, MemoryMB: 256,
		Kernel: "/img/vmlinuz", Initramfs: "/img/initramfs.cpio", Append: kernelArgs("amd64", "tcg", false),
		Base: "/img/rootfs.raw", Disk: "/m/a/overlay-1.qcow2", Node: "ov1", Console: "/m/a/console.log",
		ConsoleSock: "/m/a/console.sock", Sandbox: true,
		Agent: "/m/a/agent.sock", QMP: "/m/a/qmp.sock", Memory: MemoryRAM,
	}
}

func TestCommandLineGolden(t *testing.T) {
	cases := map[string]func(c *vmConfig){
		"boot-amd64": func(c *vmConfig) {},
		"boot-amd64-template-network": func(c *vmConfig) {
			c.VCPUs, c.MemoryMB, c.Network, c.MAC = 2, 512, true, "52:54:00:AB:cd:01"
			c.Append = kernelArgs("amd64", "tcg", true)
			c.Memory, c.MemPath = MemoryShared, "/m/a/mem"
		},
		"restore-clone-no-network": func(c *vmConfig) {
			c.Network, c.NetOff, c.MAC = true, true, "52:54:00:ab:cd:01"
			c.Memory, c.MemPath = MemoryPrivate, "/snap/t,1/mem" // a comma is escaped
			c.Incoming = true
			// Two frozen layers below the overlay: each a descriptor,
			// each qcow2 node with its backing given.
			c.Layers = []string{"/m/a/layer-1.qcow2", "/m/a/layer-2.qcow2"}
			c.Disk, c.Node = "/m/a/overlay-3.qcow2", "ov3"
		},
		"boot-amd64-kvm": func(c *vmConfig) {
			c.Accel, c.TBSizeMB, c.Sandbox = "kvm", 0, false
			c.Append = kernelArgs("amd64", "kvm", false)
		},
		"boot-arm64": func(c *vmConfig) {
			c.Arch, c.Machine, c.Append = "arm64", "virt", kernelArgs("arm64", "tcg", false)
			c.Kernel = "/img/Image"
		},
	}
	for name, mod := range cases {
		t.Run(name, func(t *testing.T) {
			c := goodConfig()
			mod(&c)
			args, err := c.args()
			if err != nil {
				t.Fatalf("args: %v", err)
			}
			got := strings.Join(args, "\n") + "\n"
			path := filepath.Join("testdata", name+".golden")
			if *update {
				if err := os.MkdirAll("testdata", 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test -update to create it)", err)
			}
			if got != string(want) {
				t.Errorf("command line differs from %s:\ngot:\n%s\nwant:\n%s", path, got, want)
			}
		})
	}
}

func TestCommandLineRejects(t *testing.T) {
	long := "/" + strings.Repeat("d", 120) + "/agent.sock"
	cases := map[string]func(c *vmConfig){
		"arch":          func(c *vmConfig) { c.Arch = "riscv64" },
		"machine":       func(c *vmConfig) { c.Machine = "virt" },
		"arm machine":   func(c *vmConfig) { c.Arch = "arm64" },
		"accel":         func(c *vmConfig) { c.Accel = "hvf" },
		"no vcpus":      func(c *vmConfig) { c.VCPUs = 0 },
		"many vcpus":    func(c *vmConfig) { c.VCPUs = MaxVCPUs + 1 },
		"little memory": func(c *vmConfig) { c.MemoryMB = 16 },
		"much memory":   func(c *vmConfig) { c.MemoryMB = MaxMemoryMB + 1 },
		"relative disk": func(c *vmConfig) { c.Disk = "overlay.qcow2" },
		"no kernel":     func(c *vmConfig) { c.Kernel = "" },
		"newline path":  func(c *vmConfig) { c.Console = "/m/a\n-device x" },
		"long socket":   func(c *vmConfig) { c.Agent = long },
		"node name":     func(c *vmConfig) { c.Node = "Root node" },
		"base node":     func(c *vmConfig) { c.Node = "base" },
		"layer node":    func(c *vmConfig) { c.Layers = []string{"/m/a/layer-1.qcow2"} }, // top is ov1 too
		"no base":       func(c *vmConfig) { c.Base = "" },
		"relative layer": func(c *vmConfig) {
			c.Layers, c.Node = []string{"layer-1.qcow2"}, "ov2"
		},
		"many layers": func(c *vmConfig) {
			c.Layers, c.Node = make([]string, MaxLayers+1), "ov999"
			for i := range c.Layers {
				c.Layers[i] = "/m/a/l"
			}
		},
		"long console socket": func(c *vmConfig) { c.ConsoleSock = long },
		"memory kind":         func(c *vmConfig) { c.Memory = "huge" },
		"no mem path":         func(c *vmConfig) { c.Memory = MemoryShared },
		"bad mac":             func(c *vmConfig) { c.Network, c.MAC = true, "52:54:00:zz:00:01" },
		"append":              func(c *vmConfig) { c.Append = "quiet\nx" },
		"tb size":             func(c *vmConfig) { c.TBSizeMB = -1 },
		"name":                func(c *vmConfig) { c.Name = "a,b" },
	}
	for name, mod := range cases {
		t.Run(name, func(t *testing.T) {
			c := goodConfig()
			mod(&c)
			if _, err := c.args(); !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("args: %v, want an invalid-argument error", err)
			}
		})
	}
}

func TestConfigValidate(t *testing.T) {
	_, err := New(WithAccel("hvf"), WithTBSize(-3), WithQEMU("mips", "qemu"))
	if !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("New: %v", err)
	}
	for _, want := range []string{"accel", "tb-size", "no state dir", "mips", "not an absolute path"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	d, err := New(WithStateDir(t.TempDir()), WithQEMUImg("/usr/bin/qemu-img"))
	if err != nil {
		t.Fatalf("New with defaults: %v", err)
	}
	if d.cfg.Accel != AccelAuto || d.cfg.TBSizeMB != DefaultTBSizeMB || d.Name() != "qemu" {
		t.Errorf("defaults: %+v", d.cfg)
	}
}

func TestIDsAndResources(t *testing.T) {
	for _, id := range []string{"", "A", "-x", "a/b", "a b", strings.Repeat("a", 64)} {
		if err := checkID(id); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("checkID(%q): %v", id, err)
		}
	}
	if r, err := resources(vmpool.Resources{}); err != nil || r.VCPUs != DefaultVCPUs || r.MemoryMB != DefaultMemoryMB {
		t.Errorf("default resources: %+v %v", r, err)
	}
}

func TestEscape(t *testing.T) {
	if got := esc("/a,b"); got != "/a,,b" {
		t.Errorf("esc: %s", got)
	}
}

// TestIdleKernelArgs: the guest boots with the settings that keep an idle
// machine asleep, and a machine whose guest booted with another command line
// (a template from an older driver) says so.
func TestIdleKernelArgs(t *testing.T) {
	for _, arch := range []string{"amd64", "arm64"} {
		args := strings.Fields(kernelArgs(arch, "tcg", true))
		for _, want := range []string{"nowatchdog", "sysctl.vm.compaction_proactiveness=0", "psi=0"} {
			if !slices.Contains(args, want) {
				t.Errorf("%s: kernel args %q lack %s", arch, args, want)
			}
		}
		if got := slices.Contains(args, "tsc=reliable"); got != (arch == "amd64") {
			t.Errorf("%s: tsc=reliable present %v", arch, got)
		}
	}
	if args := kernelArgs("amd64", "kvm", true); strings.Contains(args, "tsc=reliable") {
		t.Errorf("kvm guest keeps its clocksource watchdog: %q", args)
	}
	now := kernelArgs("amd64", "tcg", true)
	if why := outdatedBoot(now, now); why != "" {
		t.Errorf("current command line reported outdated: %s", why)
	}
	old := "console=ttyS0 quiet panic=-1 cryptomgr.notests firkin.ip=10.0.2.15/24 firkin.gw=10.0.2.2 firkin.dns=10.0.2.3"
	if why := outdatedBoot(old, now); !strings.Contains(why, "cryptomgr.notests firkin.ip") {
		t.Errorf("older command line: %q", why)
	}
	m := &Machine{cfg: vmConfig{Arch: "amd64", Accel: "tcg", Network: true, Append: old}}
	if m.OutdatedBoot() == "" {
		t.Error("a machine booted with the older command line is not outdated")
	}
	m.cfg.Append = now
	if why := m.OutdatedBoot(); why != "" {
		t.Errorf("a machine booted now is outdated: %s", why)
	}
}
