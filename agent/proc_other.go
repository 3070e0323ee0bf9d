//go:build !unix

package agent

import (
	"errors"
	"io"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// procTable is empty where processes are not supported.
type procTable struct{}

func (s *Server) serveProc(st io.ReadWriter, op string, _ *procRequest) {
	sendError(st, errdefs.Wrap(errdefs.ErrUnsupported, errors.New(op+" is only supported on unix guests")))
}
