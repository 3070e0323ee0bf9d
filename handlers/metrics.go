package handlers

import (
	"context"
	"errors"

	"github.com/nats-io/nats.go/micro"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// Metrics is the runtime's per-sandbox resource samples. It is optional: a
// runtime without it answers metrics with unsupported.
type Metrics interface {
	SandboxMetrics(ctx context.Context, id string) (subjects.MetricsReply, error)
}

// sandboxMetrics answers firkin.sandbox.<id>.metrics.
func (s *Service) sandboxMetrics(ctx context.Context, req micro.Request, id string) (any, error) {
	if _, err := decode[struct{}](req); err != nil {
		return nil, err
	}
	m, ok := s.rt.(Metrics)
	if !ok {
		return nil, errdefs.Wrap(errdefs.ErrUnsupported, errors.New("this worker keeps no sandbox metrics"))
	}
	ctx, cancel := context.WithTimeout(ctx, quickTimeout)
	defer cancel()
	return m.SandboxMetrics(ctx, id)
}
