package vz

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// FormatStream is the Snapshot.Format of every VZ snapshot: the whole guest
// memory is in the state file (VZ has no shared-memory restore).
const FormatStream = "stream"

// snapshotOf describes what a save wrote into dir for a machine of
// configuration cfg booted from img: the state file, the frozen disk and
// the configuration to restore with, and the identity (machine identifier
// and MACs) the snapshot record carries, as the seed's does.
func snapshotOf(dir string, cfg machineConfig, img vmpool.Image) vmpool.Snapshot {
	img.Kernel, img.Initramfs = cfg.Kernel, cfg.Initramfs
	return vmpool.Snapshot{
		Dir:               dir,
		Artifacts:         []string{stateFile, frozenDiskFile, machineJSONFile},
		Disk:              filepath.Join(dir, frozenDiskFile),
		Format:            FormatStream,
		MachineIdentifier: slices.Clone(cfg.MachineIdentifier),
		NetworkMACs:       slices.Clone(cfg.MACs),
		Resources:         vmpool.Resources{VCPUs: cfg.VCPUs, MemoryMB: cfg.MemoryMB},
		Image:             img,
	}
}

// savedConfig reads the configuration snap was saved with and checks it
// against the snapshot's description: the same machine identifier, the same
// MACs, the same resources, and every file a restore needs present.
func savedConfig(snap vmpool.Snapshot) (machineConfig, error) {
	path := filepath.Join(snap.Dir, machineJSONFile)
	b, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return machineConfig{}, errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("snapshot %s has no %s: it was not saved by the vz driver", snap.Dir, machineJSONFile))
		}
		return machineConfig{}, errdefs.Wrap(errdefs.ErrIntegrity, err)
	}
	var cfg machineConfig
	if err := json.Unmarshal(b, &cfg); err != nil {
		return machineConfig{}, errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("%s: %w", path, err))
	}
	var errs []error
	if !bytes.Equal(cfg.MachineIdentifier, snap.MachineIdentifier) {
		errs = append(errs, errors.New("the machine identifier of the record differs from the one the machine was saved with"))
	}
	if !slices.Equal(cfg.MACs, snap.NetworkMACs) {
		errs = append(errs, fmt.Errorf("the record's network MACs %v differ from the saved machine's %v", snap.NetworkMACs, cfg.MACs))
	}
	if r := snap.Resources; (r.VCPUs != 0 && r.VCPUs != cfg.VCPUs) || (r.MemoryMB != 0 && r.MemoryMB != cfg.MemoryMB) {
		errs = append(errs, fmt.Errorf("the record's resources %+v differ from the saved machine's (%d vCPUs, %d MiB)", r, cfg.VCPUs, cfg.MemoryMB))
	}
	for _, f := range []struct{ name, path string }{
		{"state file", filepath.Join(snap.Dir, stateFile)},
		{"disk", snap.Disk},
		{"kernel", cfg.Kernel},
		{"initramfs", cfg.Initramfs},
	} {
		if _, err := os.Stat(f.path); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", f.name, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return machineConfig{}, errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("snapshot %s: %w", snap.Dir, err))
	}
	return cfg, nil
}
