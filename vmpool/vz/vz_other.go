//go:build !darwin

package vz

import (
	"errors"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// errNeedsMacOS is what New says on systems other than macOS.
var errNeedsMacOS = errdefs.Wrap(errdefs.ErrUnsupported, errors.New("the vz driver needs macOS; use --driver qemu"))

// newHypervisor fails: Virtualization.framework exists only on macOS.
func newHypervisor() (hypervisor, error) { return nil, errNeedsMacOS }
