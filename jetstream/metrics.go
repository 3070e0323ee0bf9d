package jetstream

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	js "github.com/nats-io/nats.go/jetstream"

	"github.com/firkin-dev/firkin-worker/subjects"
)

// MetricsStream keeps the per-sandbox resource samples published on
// firkin.metrics.<id>, for a short while.
const MetricsStream = "FIRKIN_METRICS"

// Retention of the metrics stream.
const (
	metricsMaxAge   = time.Hour
	metricsMaxBytes = 256 << 20
)

// openMetricsStream creates or updates the metrics stream.
func openMetricsStream(ctx context.Context, j js.JetStream, cfg Config) error {
	if _, err := j.CreateOrUpdateStream(ctx, js.StreamConfig{
		Name:              MetricsStream,
		Description:       "firkin per-sandbox resource samples (short retention)",
		Subjects:          []string{cfg.Subjects.MetricsAll()},
		MaxAge:            metricsMaxAge,
		MaxBytes:          metricsMaxBytes,
		MaxMsgsPerSubject: 1000,
		MaxMsgSize:        64 << 10,
		Discard:           js.DiscardOld,
		Replicas:          cfg.Replicas,
	}); err != nil {
		return fmt.Errorf("jetstream: stream %s: %w", MetricsStream, err)
	}
	return nil
}

// PublishMetrics publishes a sandbox's resource sample on
// firkin.metrics.<id> (core NATS: a sample lost now and then is replaced
// by the next one, and nobody waits for an acknowledgement).
func (s *Store) PublishMetrics(_ context.Context, m subjects.SandboxMetrics) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	return s.nc.Publish(s.subj.Metrics(m.SandboxID), b)
}
