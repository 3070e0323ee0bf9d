//go:build !linux

package agent

import (
	"errors"
	"io"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// stats needs /proc: only Linux guests have it.
func (s *Server) stats(st io.Writer) {
	sendError(st, errdefs.Wrap(errdefs.ErrUnsupported, errors.New("stats: needs a Linux guest")))
}
