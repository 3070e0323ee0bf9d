package qemu

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/firkin-dev/firkin-worker/vmpool"
	"golang.org/x/sys/unix"
)

// accelVerdict is the cached outcome of a KVM probe.
type accelVerdict struct {
	Accel   string    `json:"accel"`
	Reason  string    `json:"reason"`
	QEMU    string    `json:"qemu"`
	Kernel  string    `json:"host_kernel"`
	Image   string    `json:"image_kernel_sha256"`
	Elapsed string    `json:"probe_elapsed"`
	Time    time.Time `json:"time"`
}

// accel returns the accelerator for a machine of arch booting img: the
// configured one, or for "auto" KVM when /dev/kvm is usable and a probe
// showed a guest actually runs on it. The probe runs once per host kernel,
// QEMU version and guest kernel; its verdict is cached in the state dir.
func (d *Driver) accel(ctx context.Context, arch string, img vmpool.Image) (string, error) {
	fixed := ""
	switch {
	case d.cfg.Accel == AccelTCG:
		fixed = AccelTCG
	case arch != runtime.GOARCH:
		fixed = AccelTCG // KVM runs only the host's arch
	case d.cfg.Accel == AccelKVM:
		fixed = AccelKVM
	}
	if fixed != "" {
		d.accelMu.Lock()
		logged := d.accels["fixed "+arch] != ""
		d.accels["fixed "+arch] = fixed
		d.accelMu.Unlock()
		if !logged {
			d.log.Info("accelerator: "+fixed, "arch", arch, "configured", d.cfg.Accel)
		}
		return fixed, nil
	}
	if reason := kvmUsable(); reason != "" {
		d.accelMu.Lock()
		logged := d.accels["nokvm"] != ""
		d.accels["nokvm"] = AccelTCG
		d.accelMu.Unlock()
		if !logged {
			d.log.Info("accelerator: tcg", "reason", reason)
		}
		return AccelTCG, nil
	}
	key, v, err := d.probeKey(ctx, arch, img)
	if err != nil {
		return "", err
	}
	// One probe at a time; later callers find the verdict.
	d.accelMu.Lock()
	defer d.accelMu.Unlock()
	if a := d.accels[key]; a != "" {
		return a, nil
	}
	path := filepath.Join(d.cfg.StateDir, "accel-"+key[:16]+".json")
	var cached accelVerdict
	if err := readJSON(path, &cached); err == nil && (cached.Accel == AccelKVM || cached.Accel == AccelTCG) {
		d.accels[key] = cached.Accel
		d.log.Info("accelerator: "+cached.Accel+" (cached probe)", "reason", cached.Reason, "cache", path)
		return cached.Accel, nil
	}
	start := time.Now()
	v.Accel, v.Reason = d.probe(ctx, arch, img)
	v.Elapsed, v.Time = time.Since(start).Round(time.Millisecond).String(), time.Now().UTC()
	if ctx.Err() != nil {
		return "", fmt.Errorf("kvm probe: %w", ctx.Err())
	}
	d.accels[key] = v.Accel
	if err := writeJSON(path, v); err != nil {
		d.log.Warn("cannot cache the accelerator verdict", "err", err)
	}
	d.log.Info("accelerator: "+v.Accel, "reason", v.Reason, "probe", v.Elapsed)
	return v.Accel, nil
}

// kvmUsable returns why KVM cannot be used, or "".
func kvmUsable() string {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return "/dev/kvm: " + err.Error()
	}
	f.Close()
	return ""
}

// probeKey identifies what the verdict depends on.
func (d *Driver) probeKey(ctx context.Context, arch string, img vmpool.Image) (string, accelVerdict, error) {
	var v accelVerdict
	bin, err := d.binary(arch)
	if err != nil {
		return "", v, err
	}
	out, err := exec.CommandContext(ctx, bin, "--version").Output()
	if err != nil {
		return "", v, fmt.Errorf("%s --version: %w", bin, err)
	}
	v.QEMU = strings.SplitN(string(out), "\n", 2)[0]
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		return "", v, err
	}
	v.Kernel = unix.ByteSliceToString(uts.Release[:])
	f, err := os.Open(img.Kernel)
	if err != nil {
		return "", v, err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", v, err
	}
	v.Image = hex.EncodeToString(h.Sum(nil))
	who := "root"
	if d.confinesUIDs() { // a confined QEMU may not be allowed to open /dev/kvm
		who = "confined"
	}
	k := sha256.Sum256([]byte(v.QEMU + "\x00" + v.Kernel + "\x00" + v.Image + "\x00" + arch + "\x00" + who))
	return hex.EncodeToString(k[:]), v, nil
}

// probe boots img under KVM and returns "kvm" when its agent answers within
// the probe timeout, else "tcg" and why.
func (d *Driver) probe(ctx context.Context, arch string, img vmpool.Image) (accel, reason string) {
	dir, err := os.MkdirTemp(d.cfg.StateDir, "probe-")
	if err != nil {
		return AccelTCG, "probe dir: " + err.Error()
	}
	defer os.RemoveAll(dir)
	d.log.Info("probing KVM", "timeout", d.cfg.ProbeTimeout)
	m, err := d.boot(ctx, vmpool.BootSpec{ID: "kvm-probe", Dir: filepath.Join(dir, "m"), Image: img,
		Resources: vmpool.Resources{VCPUs: 1, MemoryMB: 256}}, d.cfg.ProbeTimeout)
	if err != nil {
		msg := strings.Join(strings.Fields(strings.ReplaceAll(err.Error(), "\n", " | ")), " ")
		if len(msg) > 600 {
			msg = msg[:600] + "..."
		}
		return AccelTCG, "a KVM guest did not answer: " + msg
	}
	_ = m.Stop(context.Background())
	return AccelKVM, "a KVM guest answered"
}
