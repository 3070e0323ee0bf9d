package worker

import (
	"github.com/firkin-dev/firkin-worker/backend"
	"github.com/firkin-dev/firkin-worker/jetstream"
)

// storeAdapter presents the JetStream store as the runtime's Store.
type storeAdapter struct{ *jetstream.Store }

func (s storeAdapter) Logs(id string) backend.LogWriter       { return s.Store.Logs(id) }
func (s storeAdapter) BuildLogs(tid string) backend.LogWriter { return s.Store.BuildLogs(tid) }

var _ backend.Store = storeAdapter{}
