//go:build !linux

package agent

import (
	"context"
	"errors"
	"io"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// watch needs inotify: only Linux guests have it.
func (s *Server) watch(_ context.Context, st io.ReadWriteCloser, p string, _ bool) {
	sendError(st, errdefs.Wrap(errdefs.ErrUnsupported, errors.New("watch "+p+": needs a Linux guest")))
}
