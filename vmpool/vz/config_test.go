package vz

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

func TestCmdline(t *testing.T) {
	const base = "console=hvc0 panic=-1 firkin.root=/dev/vda firkin.rootfstype=ext4 firkin.channel=vsock"
	tests := []struct {
		port    uint32
		network bool
		extra   string
		want    string
	}{
		{1024, false, "", base + " firkin.vsock_port=1024"},
		{1024, true, "", base + " firkin.vsock_port=1024 firkin.ip=dhcp"},
		{5000, false, "  firkin.debug=1 ", base + " firkin.vsock_port=5000 firkin.debug=1"},
		{1024, true, "firkin.ip=192.168.64.9/24", base + " firkin.vsock_port=1024 firkin.ip=dhcp firkin.ip=192.168.64.9/24"},
	}
	for _, tt := range tests {
		if got := cmdline(tt.port, tt.network, tt.extra); got != tt.want {
			t.Errorf("cmdline(%d, %v, %q):\n got %q\nwant %q", tt.port, tt.network, tt.extra, got, tt.want)
		}
	}
}

func TestBootConfig(t *testing.T) {
	id := identity{MachineIdentifier: []byte{1, 2, 3}, MACs: []string{"02:00:00:00:00:01"}}
	spec := vmpool.BootSpec{ID: "m", Dir: "/state/m", Image: vmpool.Image{Kernel: "/img/Image", Initramfs: "/img/initrd"}}
	cfg := Config{}.withDefaults()
	got := bootConfig(cfg, spec, id)
	want := machineConfig{
		Kernel: "/img/Image", Initramfs: "/img/initrd", Cmdline: cmdline(1024, false, ""),
		VCPUs: DefaultVCPUs, MemoryMB: DefaultMemoryMB,
		Disk: "/state/m/disk.raw", ConsoleLog: "/state/m/console.log",
		MachineIdentifier: []byte{1, 2, 3}, VsockPort: 1024,
	}
	if a, b := mustJSON(t, got), mustJSON(t, want); a != b {
		t.Fatalf("no network:\n got %s\nwant %s", a, b)
	}
	spec.Network, spec.Resources = true, vmpool.Resources{VCPUs: 4, MemoryMB: 1024}
	got = bootConfig(cfg, spec, id)
	if !slices.Equal(got.MACs, id.MACs) || got.VCPUs != 4 || got.MemoryMB != 1024 || !strings.HasSuffix(got.Cmdline, " firkin.ip=dhcp") {
		t.Fatalf("with network: %+v", got)
	}

	// A restore keeps everything but the machine's own disk and console.
	r := restoreConfig(got, "/state/clone")
	if r.Disk != "/state/clone/disk.raw" || r.ConsoleLog != "/state/clone/console.log" {
		t.Fatalf("restore paths: %+v", r)
	}
	r.Disk, r.ConsoleLog = got.Disk, got.ConsoleLog
	if mustJSON(t, r) != mustJSON(t, got) {
		t.Fatalf("restore config differs:\n%s\n%s", mustJSON(t, r), mustJSON(t, got))
	}
	r.MACs[0] = "changed"
	if got.MACs[0] == "changed" {
		t.Fatal("restoreConfig shares the MAC slice")
	}
}

func TestMachineConfigValidate(t *testing.T) {
	l := limits{MinVCPUs: 1, MaxVCPUs: 4, MinMemoryMB: 128, MaxMemoryMB: 4096}
	good := machineConfig{
		Kernel: "/k", Initramfs: "/i", Disk: "/d", Cmdline: "console=hvc0", VCPUs: 1, MemoryMB: 256,
		MachineIdentifier: []byte{1}, MACs: []string{"02:00:00:00:00:01"}, VsockPort: 1024,
	}
	if err := good.Validate(l); err != nil {
		t.Fatalf("good: %v", err)
	}
	tests := map[string]func(*machineConfig){
		"no kernel":        func(c *machineConfig) { c.Kernel = "" },
		"relative disk":    func(c *machineConfig) { c.Disk = "disk.raw" },
		"too many vcpus":   func(c *machineConfig) { c.VCPUs = 5 },
		"no vcpus":         func(c *machineConfig) { c.VCPUs = 0 },
		"too little ram":   func(c *machineConfig) { c.MemoryMB = 64 },
		"too much ram":     func(c *machineConfig) { c.MemoryMB = 8192 },
		"no identifier":    func(c *machineConfig) { c.MachineIdentifier = nil },
		"multicast MAC":    func(c *machineConfig) { c.MACs = []string{"01:00:5e:00:00:01"} },
		"bad MAC":          func(c *machineConfig) { c.MACs = []string{"nope"} },
		"no vsock port":    func(c *machineConfig) { c.VsockPort = 0 },
		"cmdline newline":  func(c *machineConfig) { c.Cmdline = "a\nb" },
		"upper-case MAC":   func(c *machineConfig) { c.MACs = []string{"02:AA:00:00:00:01"} },
		"eight-byte MAC":   func(c *machineConfig) { c.MACs = []string{"02:00:00:00:00:00:00:01"} },
		"no initramfs dir": func(c *machineConfig) { c.Initramfs = "" },
	}
	for name, mutate := range tests {
		c := good
		mutate(&c)
		if err := c.Validate(l); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%s: %v, want ErrInvalidArgument", name, err)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	if err := (Config{ExtraCmdline: "firkin.debug=1"}).Validate(); err != nil {
		t.Fatal(err)
	}
	for _, c := range []Config{{ExtraCmdline: "a\nb"}, {ExtraCmdline: strings.Repeat("x", 2000)}, {StopTimeout: -1}} {
		if err := c.Validate(); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%+v: %v", c, err)
		}
	}
}

func TestCheckImageARM64(t *testing.T) {
	old := hostArch
	hostArch = "arm64"
	t.Cleanup(func() { hostArch = old })
	img := testImage(t) // an arm64 Image header
	if err := checkImage(img); err != nil {
		t.Fatalf("arm64 Image: %v", err)
	}
	gz := filepath.Join(t.TempDir(), "vmlinuz")
	if err := os.WriteFile(gz, append([]byte{0x1f, 0x8b, 8, 0}, make([]byte, 100)...), 0o644); err != nil {
		t.Fatal(err)
	}
	img.Kernel = gz
	err := checkImage(img)
	if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "not an uncompressed arm64 Image") {
		t.Fatalf("gzip kernel: %v", err)
	}
	img = testImage(t)
	img.Arch = "amd64"
	if err := checkImage(img); err == nil || !strings.Contains(err.Error(), "does not emulate") {
		t.Fatalf("amd64 image on arm64: %v", err)
	}
}

func TestNewMAC(t *testing.T) {
	seen := map[string]bool{}
	for range 100 {
		mac, err := newMAC(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		if err := checkMAC(mac); err != nil {
			t.Fatal(err)
		}
		hw, _ := net.ParseMAC(mac)
		if hw[0]&0x02 == 0 || hw[0]&0x01 != 0 {
			t.Fatalf("%s: want locally administered unicast", mac)
		}
		seen[mac] = true
	}
	if len(seen) < 95 {
		t.Fatalf("only %d distinct MACs in 100", len(seen))
	}
	// All-ones input still gives a unicast, locally administered MAC.
	mac, _ := newMAC(bytes.NewReader(bytes.Repeat([]byte{0xff}, 6)))
	if mac != "fe:ff:ff:ff:ff:ff" {
		t.Fatalf("got %s", mac)
	}
}

// newFakeHVNoT is a fake hypervisor for pure functions (no VMs).
func newFakeHVNoT() *fakeHV { return &fakeHV{fail: map[string]error{}} }

func TestIdentityPersistence(t *testing.T) {
	dir := t.TempDir()
	hv := newFakeHVNoT()
	a, err := loadOrCreateIdentity(dir, hv, 1)
	if err != nil {
		t.Fatal(err)
	}
	if len(a.MachineIdentifier) == 0 || len(a.MACs) != 1 {
		t.Fatalf("identity %+v", a)
	}
	// The second call (same directory) reads it back.
	b, err := loadOrCreateIdentity(dir, hv, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.MachineIdentifier, b.MachineIdentifier) || !slices.Equal(a.MACs, b.MACs) {
		t.Fatalf("identity changed: %+v then %+v", a, b)
	}
	// More devices: the MACs it has stay, new ones follow, persisted.
	c, err := loadOrCreateIdentity(dir, hv, 3)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.MachineIdentifier, c.MachineIdentifier) || len(c.MACs) != 3 || c.MACs[0] != a.MACs[0] {
		t.Fatalf("identity grown: %+v then %+v", a, c)
	}
	if back, err := loadIdentity(dir); err != nil || !slices.Equal(back.MACs, c.MACs) {
		t.Fatalf("grown identity not persisted: %+v %v", back, err)
	}
	// On disk: base64 identifier bytes and the MACs, as in the record.
	var onDisk map[string]any
	if err := json.Unmarshal([]byte(readFile(t, filepath.Join(dir, identityFile))), &onDisk); err != nil {
		t.Fatal(err)
	}
	if _, ok := onDisk["machine_identifier"].(string); !ok {
		t.Fatalf("identity.json: %v", onDisk)
	}
	if err := os.WriteFile(filepath.Join(dir, identityFile), []byte(`{"machine_identifier":"","network_macs":["x"]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := loadOrCreateIdentity(dir, hv, 1); !errors.Is(err, errdefs.ErrIntegrity) {
		t.Fatalf("corrupt identity: %v", err)
	}
	if err := writeIdentity(dir, identity{}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("write empty identity: %v", err)
	}
}

func TestSnapshotOf(t *testing.T) {
	cfg := machineConfig{
		Kernel: "/img/Image", Initramfs: "/img/initrd", VCPUs: 2, MemoryMB: 512,
		MachineIdentifier: []byte{0xde, 0xad}, MACs: []string{"02:00:00:00:00:01"},
	}
	img := vmpool.Image{Kernel: "/old/Image", Initramfs: "/old/initrd", RootDisk: "/img/root.raw", Arch: "arm64"}
	s := snapshotOf("/snap", cfg, img)
	want := vmpool.Snapshot{
		Dir:               "/snap",
		Artifacts:         []string{"machine.vzvmsave", "disk.raw", "vz-machine.json"},
		Disk:              "/snap/disk.raw",
		Format:            "stream",
		MachineIdentifier: []byte{0xde, 0xad},
		NetworkMACs:       []string{"02:00:00:00:00:01"},
		Resources:         vmpool.Resources{VCPUs: 2, MemoryMB: 512},
		Image:             vmpool.Image{Kernel: "/img/Image", Initramfs: "/img/initrd", RootDisk: "/img/root.raw", Arch: "arm64"},
	}
	if a, b := mustJSON(t, s), mustJSON(t, want); a != b {
		t.Fatalf("snapshot:\n got %s\nwant %s", a, b)
	}
	cfg.MachineIdentifier[0], cfg.MACs[0] = 0, "changed"
	if s.MachineIdentifier[0] != 0xde || s.NetworkMACs[0] == "changed" {
		t.Fatal("the snapshot shares the identity slices")
	}
	// The record keeps the identifier bytes through JSON (the backend stores
	// vmpool.Snapshot as JSON next to the artifacts).
	var back vmpool.Snapshot
	if err := json.Unmarshal([]byte(mustJSON(t, s)), &back); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back.MachineIdentifier, s.MachineIdentifier) || !slices.Equal(back.NetworkMACs, s.NetworkMACs) {
		t.Fatalf("round trip: %+v", back)
	}
}

func TestMacOSAtLeast(t *testing.T) {
	for v, want := range map[string]bool{"14.0": true, "14.2.1": true, "15.1": true, "26.0": true, "13.6.4": false, "12": false, "": false, "x": false} {
		if got := macOSAtLeast(v, 14); got != want {
			t.Errorf("macOSAtLeast(%q, 14) = %v", v, got)
		}
	}
}

func TestClassify(t *testing.T) {
	if err := classify(errors.New("x")); !errors.Is(err, errdefs.ErrInternalFailure) {
		t.Fatal(err)
	}
	in := errdefs.Wrap(errdefs.ErrTimeout, errors.New("late"))
	if err := classify(in); err != in {
		t.Fatalf("classify changed a classed error: %v", err)
	}
	if classify(nil) != nil {
		t.Fatal("classify(nil)")
	}
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
