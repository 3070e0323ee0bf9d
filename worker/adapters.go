package worker

import (
	"context"

	"github.com/firkin-dev/firkin-worker/backend"
	"github.com/firkin-dev/firkin-worker/jetstream"
)

// storeAdapter presents the JetStream store as the runtime's Store.
type storeAdapter struct{ *jetstream.Store }

func (s storeAdapter) Logs(id string) backend.LogWriter       { return s.Store.Logs(id) }
func (s storeAdapter) BuildLogs(tid string) backend.LogWriter { return s.Store.BuildLogs(tid) }

// ListConfig returns the cluster settings matching filter.
func (s storeAdapter) ListConfig(ctx context.Context, filter string) ([]backend.ConfigEntry, error) {
	entries, err := s.Store.ListConfig(ctx, filter)
	out := make([]backend.ConfigEntry, len(entries))
	for i, e := range entries {
		out[i] = backend.ConfigEntry(e)
	}
	return out, err
}

// WatchConfig follows the cluster settings matching filter.
func (s storeAdapter) WatchConfig(ctx context.Context, filter string, fn func(backend.ConfigEntry)) error {
	return s.Store.WatchConfig(ctx, filter, func(e jetstream.ConfigEntry) { fn(backend.ConfigEntry(e)) })
}

var (
	_ backend.Store           = storeAdapter{}
	_ backend.SnapshotWatcher = storeAdapter{}
	_ backend.ConfigStore     = storeAdapter{}
)
