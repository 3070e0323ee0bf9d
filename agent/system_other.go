//go:build !linux

package agent

import (
	"errors"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

var errSystem = errdefs.Wrap(errdefs.ErrUnsupported, errors.New("only on linux guests"))

func setHostname(string) error { return errSystem }
func setClock(int64) error     { return errSystem }
func addEntropy([]byte) error  { return errSystem }
func setMAC(string) error      { return errSystem }
