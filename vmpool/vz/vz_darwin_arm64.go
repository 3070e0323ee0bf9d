//go:build darwin && arm64

package vz

import (
	"errors"
	"fmt"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// SaveRestoreSupported returns nil when a machine of configuration cfg can
// be saved and restored: macOS 14 or later, and a configuration the
// framework can save (ValidateSaveRestoreSupport).
func (vzHypervisor) SaveRestoreSupported(cfg machineConfig) error {
	if v := macOSVersion(); !macOSAtLeast(v, 14) {
		return errdefs.Wrap(errdefs.ErrUnsupported, fmt.Errorf("VZ save and restore need macOS 14 or later on Apple silicon; this Mac runs macOS %s", v))
	}
	config, err := configuration(cfg)
	if err != nil {
		return err
	}
	ok, err := config.ValidateSaveRestoreSupport()
	if err != nil {
		return errdefs.Wrap(errdefs.ErrUnsupported, fmt.Errorf("VZ cannot save this machine's configuration: %w", err))
	}
	if !ok {
		return errdefs.Wrap(errdefs.ErrUnsupported, errors.New("VZ cannot save this machine's configuration"))
	}
	return nil
}

// SaveState writes the paused machine's state to path (macOS 14).
func (m *vzVM) SaveState(path string) error {
	return vzError("save machine state", m.vm.SaveMachineStateToPath(path))
}

// RestoreState loads a saved state into the stopped machine, which is then
// paused (macOS 14).
func (m *vzVM) RestoreState(path string) error {
	return vzError("restore machine state", m.vm.RestoreMachineStateFromURL(path))
}
