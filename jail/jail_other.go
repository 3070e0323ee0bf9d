//go:build !linux

package jail

import (
	"errors"
	"fmt"
	"os/exec"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// Command needs Linux mount namespaces.
func Command(Spec) (*exec.Cmd, error) {
	return nil, errdefs.Wrap(errdefs.ErrUnsupported, fmt.Errorf("jail: %w", errors.New("only on Linux")))
}

func run(string) error { return errors.New("jail: only on Linux") }

// Probe reports that jails need Linux.
func Probe(string, uint32, uint32) error { _, err := Command(Spec{}); return err }
