//go:build !unix

package agent

import (
	"context"
	"errors"
	"io"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

func (s *Server) exec(ctx context.Context, st io.ReadWriter, req ExecRequest) {
	sendError(st, errdefs.Wrap(errdefs.ErrUnsupported, errors.New("exec is only supported on unix guests")))
}

// warmShells is empty where exec is unsupported.
type warmShells struct{}

func (s *Server) stopWarmShells() {}
