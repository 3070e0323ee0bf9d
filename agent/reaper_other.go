//go:build !linux

package agent

import (
	"context"
	"errors"
	"os/exec"
	"syscall"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// Reaper reaps orphaned children as PID 1 must. It only exists on Linux;
// elsewhere start always fails.
type Reaper struct{}

// NewReaper returns a Reaper that cannot start commands on this platform.
func NewReaper(ctx context.Context) *Reaper { return &Reaper{} }

func (r *Reaper) start(cmd *exec.Cmd) (<-chan syscall.WaitStatus, error) {
	return nil, errdefs.Wrap(errdefs.ErrUnsupported, errors.New("reaper: linux only"))
}
