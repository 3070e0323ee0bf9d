package qemu

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// Defaults for a machine's resources.
const (
	DefaultVCPUs    = 1
	DefaultMemoryMB = 256
)

var idRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

func checkID(id string) error {
	if !idRE.MatchString(id) {
		return invalid("qemu: machine id %q: want [a-z0-9][a-z0-9-]{0,62}", id)
	}
	return nil
}

// resources fills in defaults and checks the range.
func resources(r vmpool.Resources) (vmpool.Resources, error) {
	if r.VCPUs == 0 {
		r.VCPUs = DefaultVCPUs
	}
	if r.MemoryMB == 0 {
		r.MemoryMB = DefaultMemoryMB
	}
	if r.VCPUs < 1 || r.VCPUs > MaxVCPUs {
		return r, invalid("qemu: %d vcpus: want 1..%d", r.VCPUs, MaxVCPUs)
	}
	if r.MemoryMB < MinMemoryMB || r.MemoryMB > MaxMemoryMB {
		return r, invalid("qemu: %d MiB: want %d..%d", r.MemoryMB, MinMemoryMB, MaxMemoryMB)
	}
	return r, nil
}

func checkImage(img vmpool.Image) error {
	for what, p := range map[string]string{"kernel": img.Kernel, "initramfs": img.Initramfs, "root disk": img.RootDisk} {
		if err := checkPath(what, p); err != nil {
			return err
		}
		if _, err := os.Stat(p); err != nil {
			return errdefs.Wrap(errdefs.ErrNotFound, fmt.Errorf("qemu: image %s: %w", what, err))
		}
	}
	return nil
}

// Boot cold-boots a machine from spec.Image and returns it once its agent
// answered a ping. ctx bounds the boot only.
func (d *Driver) Boot(ctx context.Context, spec vmpool.BootSpec) (vmpool.Machine, error) {
	m, err := d.boot(ctx, spec, 0)
	if err != nil {
		return nil, err
	}
	return m, nil
}

func (d *Driver) boot(ctx context.Context, spec vmpool.BootSpec, agentTimeout time.Duration) (*Machine, error) {
	if err := checkID(spec.ID); err != nil {
		return nil, err
	}
	res, err := resources(spec.Resources)
	if err != nil {
		return nil, err
	}
	if err := checkImage(spec.Image); err != nil {
		return nil, err
	}
	arch, err := imageArch(spec.Image)
	if err != nil {
		return nil, err
	}
	op := "boot"
	accel := AccelTCG
	if agentTimeout > 0 {
		op, accel = "probe", AccelKVM
	} else if accel, err = d.accel(ctx, arch, spec.Image); err != nil {
		return nil, fmt.Errorf("qemu: boot %s: accelerator: %w", spec.ID, err)
	}
	u := &undo{log: d.log}
	fail := func(step string, err error) (*Machine, error) {
		u.run()
		return nil, stepError(op, spec.ID, step, err, "", "")
	}
	sockDir, cleanup, err := d.prepareDir(spec.ID, spec.Dir)
	if err != nil {
		return fail("create dir", err)
	}
	u.add("remove dir", cleanup)
	size, err := d.virtualSize(ctx, spec.Image.RootDisk, "raw")
	if err != nil {
		return fail("create overlay", err)
	}
	overlay := filepath.Join(spec.Dir, overlayName(1))
	if err := d.createOverlay(ctx, overlay, spec.Image.RootDisk, "raw", size); err != nil {
		return fail("create overlay", err)
	}
	cfg := d.baseConfig(spec.ID, arch, accel, res, spec.Image, spec.Dir, sockDir, spec.Network)
	if cfg.Kernel, cfg.Initramfs, err = linkBootFiles(spec.Image.Kernel, spec.Image.Initramfs, spec.Dir); err != nil {
		return fail("link boot files", err)
	}
	cfg.Base, cfg.Disk, cfg.Node = spec.Image.RootDisk, overlay, nodeName(1)
	if spec.SnapshotReady {
		cfg.Memory, cfg.MemPath = MemoryShared, filepath.Join(spec.Dir, memFile)
	}
	return d.start(ctx, &launch{op: op, id: spec.ID, dir: spec.Dir, cfg: cfg, image: spec.Image,
		agentTimeout: agentTimeout, diskSize: size, depth: 1}, u)
}

// baseConfig is the configuration every machine of arch starts from.
func (d *Driver) baseConfig(id, arch, accel string, res vmpool.Resources, img vmpool.Image, dir, sockDir string, network bool) vmConfig {
	machine, _ := machineType(arch)
	if sockDir == "" {
		sockDir = dir
	}
	// A confined QEMU makes its sockets in a directory of its own below
	// the (root's) socket directory holding the console socket.
	qemuSocks := sockDir
	if d.confinesUIDs() {
		qemuSocks = filepath.Join(sockDir, qemuSockDir)
	}
	cfg := vmConfig{
		Name: id, Arch: arch, Machine: machine, Accel: accel, VCPUs: res.VCPUs, MemoryMB: res.MemoryMB,
		Kernel: img.Kernel, Initramfs: img.Initramfs, Append: kernelArgs(arch, accel, network),
		Console: filepath.Join(dir, consoleFile), ConsoleSock: filepath.Join(sockDir, consoleSock),
		Agent: filepath.Join(qemuSocks, agentSock), QMP: filepath.Join(qemuSocks, qmpSock),
		Network: network, Memory: MemoryRAM,
	}
	if bin, err := d.binary(arch); err == nil {
		cfg.Sandbox = d.sandbox(bin)
	}
	if network {
		cfg.MAC = randomMAC()
	}
	if accel == AccelTCG {
		cfg.TBSizeMB = d.cfg.TBSizeMB
	}
	return cfg
}

// Names of the boot files in a machine's or a snapshot's directory.
const (
	kernelFile    = "kernel"
	initramfsFile = "initramfs"
)

// linkBootFiles hard-links (or copies) the kernel and initramfs into dir, so
// that a machine, its saves and its snapshots never depend on files an image
// rebuild may replace.
func linkBootFiles(kernel, initramfs, dir string) (string, string, error) {
	k, i := filepath.Join(dir, kernelFile), filepath.Join(dir, initramfsFile)
	if err := linkOrCopy(kernel, k); err != nil {
		return "", "", err
	}
	if err := linkOrCopy(initramfs, i); err != nil {
		return "", "", err
	}
	return k, i, nil
}
