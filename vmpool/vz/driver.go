package vz

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// Driver starts machines on Virtualization.framework. It is safe for
// concurrent use.
type Driver struct {
	cfg Config
	log *slog.Logger
	hv  hypervisor
}

var (
	_ vmpool.Driver   = (*Driver)(nil)
	_ vmpool.Saver    = (*Driver)(nil)
	_ vmpool.Restorer = (*Driver)(nil)
)

// New returns the VZ driver. On systems other than macOS it fails with an
// error of class errdefs.ErrUnsupported that says to use the qemu driver.
func New(cfg Config) (*Driver, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	hv, err := newHypervisor()
	if err != nil {
		return nil, err
	}
	return newDriver(cfg, hv), nil
}

// newDriver returns a Driver over hv (the real one, or a test's fake).
func newDriver(cfg Config, hv hypervisor) *Driver {
	cfg = cfg.withDefaults()
	return &Driver{cfg: cfg, log: cfg.Logger, hv: hv}
}

// Name returns "vz".
func (d *Driver) Name() string { return "vz" }

// Boot cold-boots a machine: its directory, identity (machine identifier
// and MACs, persisted), a clone of the template's disk, the configuration,
// Start, and a first agent session (the vsock dial retried with backoff
// until ctx ends).
func (d *Driver) Boot(ctx context.Context, spec vmpool.BootSpec) (vmpool.Machine, error) {
	if err := checkBootSpec(spec); err != nil {
		return nil, err
	}
	undo := &undoStack{log: d.log, op: "boot " + spec.ID}
	var (
		id identity
		mc machineConfig
		v  vm
		m  *machine
	)
	nics := 0
	if spec.Network {
		nics = 1
	}
	steps := []step{
		{"create machine directory", func() error {
			if err := os.MkdirAll(spec.Dir, 0o700); err != nil {
				return err
			}
			undo.push("remove machine directory", func() error { return os.RemoveAll(spec.Dir) })
			return nil
		}},
		{"machine identity", func() (err error) {
			id, err = loadOrCreateIdentity(spec.Dir, d.hv, nics)
			return err
		}},
		{"validate configuration", func() error {
			mc = bootConfig(d.cfg, spec, id)
			return mc.Validate(d.hv.Limits())
		}},
		{"stage disk", func() error { return stageDisk(d.hv, spec.Image.RootDisk, mc.Disk) }},
		{"choose devices", func() error { mc = chooseDevices(d.hv, mc); return nil }},
		{"configure", func() (err error) {
			if v, err = d.hv.NewVM(mc); err == nil {
				undo.push("stop", func() error { return v.Stop() })
			}
			return err
		}},
		{"start", func() error {
			if err := v.Start(); err != nil {
				return err
			}
			m = newMachine(d, spec.ID, spec.Dir, v, mc, spec.Image)
			return nil
		}},
		{"connect to the agent", func() error { return m.connect(ctx) }},
	}
	if err := runSteps("boot "+spec.ID, steps); err != nil {
		if m != nil {
			m.closeAgent()
		}
		d.logConsole(spec.Dir)
		undo.run()
		return nil, err
	}
	d.log.Debug("vz: booted", "id", spec.ID, "vcpus", mc.VCPUs, "memory_mb", mc.MemoryMB, "macs", mc.MACs)
	return m, nil
}

// Save snapshots a running machine into dir (macOS 14 on arm64): quiesce
// the agent session, pause, remove a stale state file, freeze the disk (an
// APFS clone), SaveMachineStateToPath, record the configuration, then
// resume and reconnect (or stop, with opts.Stop). When a step after the
// pause fails, the machine is resumed and reconnected.
func (d *Driver) Save(ctx context.Context, mm vmpool.Machine, dir string, opts vmpool.SaveOptions) (vmpool.Snapshot, error) {
	m, ok := mm.(*machine)
	if !ok || m.d != d {
		return vmpool.Snapshot{}, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("vz: save: %T is not a machine of this driver", mm))
	}
	switch opts.Kind {
	case "", vmpool.Continuation, vmpool.Template:
	default:
		return vmpool.Snapshot{}, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("vz: save: unknown snapshot kind %q", opts.Kind))
	}
	if dir == "" || !filepath.IsAbs(dir) {
		return vmpool.Snapshot{}, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("vz: save: snapshot directory %q is not an absolute path", dir))
	}
	return m.save(ctx, dir, opts)
}

// Restore starts a machine from a snapshot (macOS 14 on arm64): the saved
// configuration with the same machine identifier and MACs, a clone of the
// frozen disk in the new machine's directory, RestoreMachineStateFromURL,
// Resume, and a new agent session (the vsock dial retried with backoff).
func (d *Driver) Restore(ctx context.Context, spec vmpool.RestoreSpec) (vmpool.Machine, error) {
	if err := checkRestoreSpec(spec); err != nil {
		return nil, err
	}
	undo := &undoStack{log: d.log, op: "restore " + spec.ID}
	var (
		saved, mc machineConfig
		v         vm
		m         *machine
	)
	steps := []step{
		{"read saved configuration", func() (err error) {
			saved, err = savedConfig(spec.Snapshot)
			if err == nil && spec.Network != (len(saved.MACs) > 0) {
				// A VZ restore needs the device layout the machine was
				// saved with; the network follows the snapshot.
				d.log.Warn("vz: restore keeps the snapshot's network devices", "id", spec.ID, "network", spec.Network, "snapshot_macs", saved.MACs)
			}
			return err
		}},
		{"create machine directory", func() error {
			if err := os.MkdirAll(spec.Dir, 0o700); err != nil {
				return err
			}
			undo.push("remove machine directory", func() error { return os.RemoveAll(spec.Dir) })
			return nil
		}},
		{"validate configuration", func() error {
			mc = restoreConfig(saved, spec.Dir)
			return mc.Validate(d.hv.Limits())
		}},
		{"persist identity", func() error {
			return writeIdentity(spec.Dir, identity{MachineIdentifier: mc.MachineIdentifier, MACs: mc.MACs})
		}},
		{"stage disk", func() error { return stageDisk(d.hv, spec.Snapshot.Disk, mc.Disk) }},
		{"check save/restore support", func() error { return unsupported(d.hv.SaveRestoreSupported(mc)) }},
		{"configure", func() (err error) {
			if v, err = d.hv.NewVM(mc); err == nil {
				undo.push("stop", func() error { return v.Stop() })
			}
			return err
		}},
		{"restore machine state", func() error {
			if err := v.RestoreState(filepath.Join(spec.Snapshot.Dir, stateFile)); err != nil {
				return err
			}
			m = newMachine(d, spec.ID, spec.Dir, v, mc, spec.Snapshot.Image)
			return nil
		}},
		{"resume", func() error { return v.Resume() }},
		{"connect to the agent", func() error { return m.connect(ctx) }},
	}
	if err := runSteps("restore "+spec.ID, steps); err != nil {
		if m != nil {
			m.closeAgent()
		}
		d.logConsole(spec.Dir)
		undo.run()
		return nil, err
	}
	return m, nil
}

// unsupported classes a save/restore support error as
// errdefs.ErrUnsupported.
func unsupported(err error) error {
	if err == nil || errors.Is(err, errdefs.ErrUnsupported) {
		return err
	}
	return errdefs.Wrap(errdefs.ErrUnsupported, err)
}

// consoleTail is how much of the console a failed boot or restore reports.
const consoleTail = 2048

// logConsole logs the tail of the guest console of a failed boot or
// restore (most often where the reason is), before its directory goes.
func (d *Driver) logConsole(dir string) {
	b, err := os.ReadFile(filepath.Join(dir, consoleFile))
	if err != nil || len(b) == 0 {
		return
	}
	if len(b) > consoleTail {
		b = b[len(b)-consoleTail:]
	}
	d.log.Warn("vz: guest console tail", "dir", dir, "console", string(b))
}
