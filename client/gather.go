package client

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/subjects"
)

// gatherQuiet is how long gather waits for one more reply.
const gatherQuiet = 250 * time.Millisecond

// gatherMax bounds the replies gather keeps.
const gatherMax = 4096

// gather sends {} to a subject every worker answers (no queue group) and
// collects the replies until none came for gatherQuiet, or ctx ends after
// at least one. Error replies are skipped when another worker answered;
// when all of them are errors, the first is returned.
func gather[T any](ctx context.Context, c *Client, subject string) ([]T, error) {
	inbox := c.nc.NewInbox()
	ch := make(chan *nats.Msg, 64)
	sub, err := c.nc.ChanSubscribe(inbox, ch)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", subject, err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := c.nc.PublishRequest(subject, inbox, []byte("{}")); err != nil {
		return nil, fmt.Errorf("%s: %w", subject, err)
	}
	var (
		out      []T
		firstErr error
		quiet    <-chan time.Time
	)
	for len(out) < gatherMax {
		select {
		case <-ctx.Done():
			if len(out) > 0 {
				return out, nil
			}
			if firstErr != nil {
				return nil, firstErr
			}
			return nil, fmt.Errorf("%s: %w", subject, ctx.Err())
		case <-quiet:
			if len(out) == 0 && firstErr != nil {
				return nil, firstErr
			}
			return out, nil
		case m := <-ch:
			if len(m.Data) == 0 && m.Header.Get("Status") == "503" {
				return nil, c.noResponders(subject)
			}
			quiet = time.After(gatherQuiet)
			var v T
			if err := decodeReply(subject, m, &v); err != nil {
				if firstErr == nil {
					firstErr = err
				}
				continue
			}
			out = append(out, v)
		}
	}
	return out, nil
}

// PoolStatusAll asks every worker for its pool status and returns the
// replies heard until none came for 250 ms.
func (c *Client) PoolStatusAll(ctx context.Context) ([]subjects.PoolStatusReply, error) {
	return gather[subjects.PoolStatusReply](ctx, c, c.subj.PoolStatus())
}

// WorkersList asks <prefix>.workers.list for the cluster's members and
// decodes the reply into reply (the cluster package's reply type, or a
// map). A cluster without membership support answers no responders.
func (c *Client) WorkersList(ctx context.Context, reply any) error {
	return c.Request(ctx, c.subj.Prefix+".workers.list", struct{}{}, reply)
}

// DrainWorker asks a worker to drain (<prefix>.worker.<id>.drain): it stops
// taking creates and jobs and finishes or hands back what runs. The reply
// is decoded into reply (nil: ignored).
func (c *Client) DrainWorker(ctx context.Context, workerID string, reply any) error {
	if workerID == "" || len(workerID) > 128 || !validToken(workerID) {
		return &Error{Code: subjects.CodeInvalidRequest, Message: fmt.Sprintf("worker id %q: want one subject token", cut(workerID, 64))}
	}
	return c.Request(ctx, c.subj.Prefix+".worker."+workerID+".drain", struct{}{}, reply)
}

// validToken reports whether s is one subject token of safe characters.
func validToken(s string) bool {
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
			return false
		}
	}
	return true
}
