package client

import (
	"context"

	"github.com/firkin-dev/firkin-worker/subjects"
)

// Metrics returns a sandbox's latest resource sample and a short history
// (firkin.sandbox.<id>.metrics). Samples are also published live on
// firkin.metrics.<id> and kept for an hour in the FIRKIN_METRICS stream.
func (c *Client) Metrics(ctx context.Context, id string) (subjects.MetricsReply, error) {
	var r subjects.MetricsReply
	err := c.Request(ctx, c.subj.Sandbox(id, subjects.VerbMetrics), struct{}{}, &r)
	return r, err
}
