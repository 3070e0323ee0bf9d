package worker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/firkin-dev/firkin-worker/metrics"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// Version is the worker's version: in its heartbeat, micro service and
// status replies.
const Version = "0.2.0"

// newMetrics measures the worker; its state is read from the backend at
// each scrape and status request.
func (w *Worker) newMetrics() *metrics.Metrics {
	return metrics.New(metrics.Info{
		WorkerID: w.id, Version: Version, Driver: w.backend.DriverName(), Accelerator: w.backend.Accelerator(),
	}, w.metricsState)
}

func (w *Worker) metricsState() metrics.State {
	u := w.backend.Usage()
	return metrics.State{
		Sandboxes: u.Sandboxes, Warm: u.Warm, VCPUs: u.VCPUs, MemoryMB: u.MemoryMB,
		Limits:          subjects.WorkerLimits{MaxSandboxes: u.Limits.MaxSessions, MaxVCPUs: u.Limits.MaxVCPUs, MaxMemoryMB: u.Limits.MaxMemoryMB},
		Pool:            w.backend.PoolStatus().Templates,
		QEMUProcesses:   countQEMU(w.cfg.StateDir),
		LogDroppedBytes: w.backend.LogDroppedBytes(),
	}
}

// countQEMU counts the QEMU processes whose command line names a path in
// the state directory: the worker's machines, including any it lost track
// of.
func countQEMU(stateDir string) int {
	abs, err := filepath.Abs(stateDir)
	if err != nil {
		return 0
	}
	needle := []byte(filepath.Join(abs, "sandboxes") + "/")
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range entries {
		if e.Name()[0] < '0' || e.Name()[0] > '9' {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		if bytes.HasPrefix(cmdline, []byte("qemu-system")) || bytes.Contains(cmdline, []byte("/qemu-system")) {
			if bytes.Contains(cmdline, needle) {
				n++
			}
		}
	}
	return n
}

// startMetrics serves the Prometheus endpoint on Config.MetricsListen.
func (w *Worker) startMetrics() error {
	if w.cfg.MetricsListen == "" {
		return nil
	}
	ln, err := net.Listen("tcp", w.cfg.MetricsListen)
	if err != nil {
		return fmt.Errorf("metrics listener: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", w.metrics.Handler())
	w.metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second, WriteTimeout: 30 * time.Second}
	w.metricsAddr = ln.Addr().String()
	go func() {
		if err := w.metricsSrv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			w.log.Error("metrics endpoint", "err", err)
		}
	}()
	w.log.Info("metrics endpoint", "addr", "http://"+w.metricsAddr+"/metrics")
	return nil
}

func (w *Worker) stopMetrics() {
	if w.metricsSrv == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = w.metricsSrv.Shutdown(ctx)
}

// MetricsAddr is the address of the Prometheus endpoint ("" when off).
func (w *Worker) MetricsAddr() string { return w.metricsAddr }
