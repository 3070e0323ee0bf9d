//go:build darwin && !arm64

package vz

import (
	"errors"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// errSaveNeedsARM64 is what save and restore say on an Intel Mac: the
// framework saves machine state on Apple silicon only.
var errSaveNeedsARM64 = errdefs.Wrap(errdefs.ErrUnsupported, errors.New("VZ save and restore need macOS 14 or later on Apple silicon (arm64); this Mac is not arm64"))

// SaveRestoreSupported always fails on an Intel Mac.
func (vzHypervisor) SaveRestoreSupported(machineConfig) error { return errSaveNeedsARM64 }

// SaveState always fails on an Intel Mac.
func (m *vzVM) SaveState(string) error { return errSaveNeedsARM64 }

// RestoreState always fails on an Intel Mac.
func (m *vzVM) RestoreState(string) error { return errSaveNeedsARM64 }
