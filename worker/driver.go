package worker

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"runtime"

	"github.com/firkin-dev/firkin-worker/vmpool"
	"github.com/firkin-dev/firkin-worker/vmpool/qemu"
	"github.com/firkin-dev/firkin-worker/vmpool/vz"
)

// newDriver picks the machine driver: auto is vz on macOS, qemu elsewhere.
func newDriver(_ context.Context, cfg Config, log *slog.Logger) (vmpool.Driver, error) {
	name := cfg.Driver
	if name == "auto" {
		name = "qemu"
		if runtime.GOOS == "darwin" {
			name = "vz"
		}
	}
	switch name {
	case "qemu":
		d, err := qemu.New(
			qemu.WithStateDir(filepath.Join(cfg.StateDir, "qemu")),
			qemu.WithAccel(cfg.Accel),
			qemu.WithKeepOnExit(cfg.KeepMachinesOnExit),
			qemu.WithLogger(log.With("component", "qemu")),
		)
		if err != nil {
			return nil, err
		}
		return d, nil
	case "vz":
		d, err := vz.New(vz.Config{Logger: log.With("component", "vz")})
		if err != nil {
			return nil, err
		}
		return d, nil
	}
	return nil, fmt.Errorf("--driver %q: want auto, qemu or vz", cfg.Driver)
}
