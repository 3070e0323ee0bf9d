//go:build !linux

package qemu

import (
	"context"
	"errors"
	"fmt"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// Reattach needs /proc and pidfds to find a machine again safely: Linux only.
func (d *Driver) Reattach(_ context.Context, dir string) (vmpool.Machine, error) {
	return nil, errdefs.Wrap(errdefs.ErrUnsupported, fmt.Errorf("qemu: reattach %s: %w", dir, errors.New("only on Linux")))
}
