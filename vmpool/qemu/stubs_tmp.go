package qemu

import (
	"context"
	"errors"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

var errNotYet = errdefs.Wrap(errdefs.ErrUnsupported, errors.New("qemu: not implemented yet"))

// Save is not implemented yet.
func (d *Driver) Save(ctx context.Context, m vmpool.Machine, dir string, opts vmpool.SaveOptions) (vmpool.Snapshot, error) {
	return vmpool.Snapshot{}, errNotYet
}

// Restore is not implemented yet.
func (d *Driver) Restore(ctx context.Context, spec vmpool.RestoreSpec) (vmpool.Machine, error) {
	return nil, errNotYet
}

// Reattach is not implemented yet.
func (d *Driver) Reattach(ctx context.Context, dir string) (vmpool.Machine, error) {
	return nil, errNotYet
}
