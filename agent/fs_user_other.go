//go:build !linux

package agent

import (
	"errors"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// asUser needs per-thread file system ids: only Linux guests have them.
func asUser(u userInfo, do func() error) error {
	if u.uid == 0 && u.gid == 0 {
		return do()
	}
	return errdefs.Wrap(errdefs.ErrUnsupported, errors.New("file operations as a user need a Linux guest"))
}
