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

// gatherFirst bounds the wait for the first reply when ctx has no deadline
// (a publish the server refused gets no reply at all).
const gatherFirst = 30 * time.Second

// gatherMax bounds the replies gather keeps.
const gatherMax = 4096

// gather sends {} to a subject every worker answers (no queue group) and
// collects the replies until none came for gatherQuiet, or ctx (at most
// gatherFirst without a deadline) ends after at least one. Error replies are skipped when another worker answered;
// when all of them are errors, the first is returned.
func gather[T any](ctx context.Context, c *Client, subject string) ([]T, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, gatherFirst)
		defer cancel()
	}
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

// WorkersList asks <prefix>.workers.list (one worker answers from the
// heartbeats in KV firkin_workers) for the cluster's members and decodes
// the reply into reply (subjects.ListWorkersReply, or a map). Workers
// without cluster membership give ErrNoResponders.
func (c *Client) WorkersList(ctx context.Context, reply any) error {
	return c.Request(ctx, c.subj.Prefix+".workers.list", struct{}{}, reply)
}

// DrainWorker asks a worker to drain (<prefix>.worker.<id>.drain, a lame
// duck): it stops taking creates and jobs and finishes or hands back what
// runs. req is the request body (subjects.DrainRequest, e.g. with Wait to
// be answered once drained; nil sends {}); the reply is decoded into reply
// (subjects.DrainReply; nil: ignored). A worker id nobody serves gives
// ErrNoResponders.
func (c *Client) DrainWorker(ctx context.Context, workerID string, req, reply any) error {
	if workerID == "" || len(workerID) > 128 || !validToken(workerID) {
		return &Error{Code: subjects.CodeInvalidRequest, Message: fmt.Sprintf("worker id %q: want 1-128 characters of [A-Za-z0-9_-]", cut(workerID, 64))}
	}
	if req == nil {
		req = struct{}{}
	}
	return c.Request(ctx, c.subj.Prefix+".worker."+workerID+".drain", req, reply)
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
