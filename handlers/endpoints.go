package handlers

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go/micro"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// Bounds on how long one request may take, by kind.
const (
	quickTimeout    = 30 * time.Second
	createTimeout   = 3 * time.Minute
	snapshotTimeout = 3 * time.Minute
	buildTimeout    = 40 * time.Minute
	// drainTimeout bounds a drain request that waits (its timeout_s is at
	// most an hour).
	drainTimeout = 62 * time.Minute
)

func decode[T any](req micro.Request) (T, error) {
	var v T
	err := subjects.Decode(req.Data(), &v)
	return v, err
}

// errAnswered is what a handler returns for a request another worker
// answers (a forwarded create): no reply from this one.
var errAnswered = errors.New("answered by another worker")

// createSandbox answers firkin.sandbox.create and
// firkin.worker.<id>.sandbox.create. With a cluster, a create of the queue
// group goes through placement first and may be forwarded, once, to the
// worker with more room, which answers the client itself.
func (s *Service) createSandbox(ctx context.Context, req micro.Request) (any, error) {
	in, err := decode[subjects.CreateSandboxRequest](req)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, createTimeout)
	defer cancel()
	if c := s.cfg.Cluster; c != nil {
		pinned := req.Subject() != s.subj.CreateSandbox() || req.Headers().Get(subjects.ForwardedHeader) != ""
		target, err := c.Place(ctx, in, pinned)
		if err != nil {
			return nil, err
		}
		if target != "" && target != s.cfg.WorkerID {
			err := c.Forward(ctx, target, req.Reply(), req.Data())
			if err == nil {
				s.log.Debug("create forwarded", "target", target)
				return nil, errAnswered
			}
			s.log.Warn("forward create; creating here", "target", target, "err", err)
		}
	}
	return s.rt.Create(ctx, in)
}

// listWorkers answers firkin.workers.list.
func (s *Service) listWorkers(ctx context.Context, req micro.Request) (any, error) {
	if _, err := decode[struct{}](req); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, quickTimeout)
	defer cancel()
	list, err := s.cfg.Cluster.Members(ctx)
	if err != nil {
		return nil, err
	}
	return subjects.ListWorkersReply{Workers: list}, nil
}

// drainWorker answers firkin.worker.<id>.drain.
func (s *Service) drainWorker(ctx context.Context, req micro.Request) (any, error) {
	in, err := decode[subjects.DrainRequest](req)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, drainTimeout)
	defer cancel()
	return s.cfg.Cluster.Drain(ctx, in)
}

// listSandboxes answers firkin.sandbox.list.
func (s *Service) listSandboxes(ctx context.Context, req micro.Request) (any, error) {
	in, err := decode[subjects.ListSandboxesRequest](req)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, quickTimeout)
	defer cancel()
	if l, ok := s.rt.(Lister); ok {
		return l.ListPage(ctx, in)
	}
	list, err := s.rt.List(ctx)
	if err != nil {
		return nil, err
	}
	return subjects.ListSandboxesReply{Sandboxes: list}, nil
}

// sandboxLogs answers firkin.sandbox.<id>.logs (any worker: logs outlive
// their sandbox).
func (s *Service) sandboxLogs(ctx context.Context, req micro.Request) (any, error) {
	id, _, err := s.subj.ParseSandbox(req.Subject())
	if err != nil {
		return nil, err
	}
	in, err := decode[subjects.LogsRequest](req)
	if err != nil {
		return nil, err
	}
	switch {
	case in.Limit == 0:
		in.Limit = 100
	case in.Limit < 0 || in.Limit > 1000:
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("limit %d: want 1..1000", in.Limit))
	}
	ctx, cancel := context.WithTimeout(ctx, quickTimeout)
	defer cancel()
	return s.rt.Logs(ctx, id, in)
}

// sandboxVerb answers firkin.sandbox.<id>.<verb> for a sandbox this worker owns.
func (s *Service) sandboxVerb(ctx context.Context, req micro.Request) (any, error) {
	id, verb, err := s.subj.ParseSandbox(req.Subject())
	if err != nil {
		return nil, err
	}
	if out, handled, err := s.lifecycleVerb(ctx, req, id, verb); handled {
		return out, err
	}
	if strings.HasPrefix(verb, "fs.") {
		return s.fsVerb(ctx, req, id, verb)
	}
	if verb == subjects.VerbMetrics {
		return s.sandboxMetrics(ctx, req, id)
	}
	if cmd, op, ok, err := subjects.ParseProcVerb(verb); ok {
		if err != nil {
			return nil, err
		}
		return s.procVerb(ctx, req, id, cmd, op)
	}
	switch verb {
	case subjects.VerbGet:
		if _, err := decode[struct{}](req); err != nil {
			return nil, err
		}
		return s.rt.Get(ctx, id)
	case subjects.VerbExec:
		in, err := decode[subjects.ExecRequest](req)
		if err != nil {
			return nil, err
		}
		if err := s.checkLiveSubject("stream_subject", in.StreamSubject); err != nil {
			return nil, err
		}
		return s.rt.Exec(ctx, id, in) // bounded by the request's timeout_ms
	case subjects.VerbKill:
		if _, err := decode[struct{}](req); err != nil {
			return nil, err
		}
		ctx, cancel := context.WithTimeout(ctx, quickTimeout)
		defer cancel()
		return s.rt.Kill(ctx, id)
	case subjects.VerbSnapshot:
		in, err := decode[subjects.SnapshotRequest](req)
		if err != nil {
			return nil, err
		}
		ctx, cancel := context.WithTimeout(ctx, snapshotTimeout)
		defer cancel()
		return s.rt.Snapshot(ctx, id, in)
	case subjects.VerbRoute:
		in, err := decode[subjects.RouteRequest](req)
		if err != nil {
			return nil, err
		}
		ctx, cancel := context.WithTimeout(ctx, quickTimeout)
		defer cancel()
		return s.rt.Route(ctx, id, in)
	case subjects.VerbTimeout:
		in, err := decode[subjects.TimeoutRequest](req)
		if err != nil {
			return nil, err
		}
		ctx, cancel := context.WithTimeout(ctx, quickTimeout)
		defer cancel()
		return s.rt.SetTimeout(ctx, id, in)
	}
	return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("unknown sandbox verb %q: want one of %v", verb, subjects.SandboxVerbs))
}

// buildTemplate answers firkin.template.build.
func (s *Service) buildTemplate(ctx context.Context, req micro.Request) (any, error) {
	in, err := decode[subjects.BuildTemplateRequest](req)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, buildTimeout)
	defer cancel()
	return s.rt.BuildTemplate(ctx, in)
}

// snapshots answers firkin.snapshot.list, firkin.snapshot.<sid>.get and
// firkin.snapshot.<sid>.delete. Snapshot ids may contain dots, so one
// endpoint takes the whole firkin.snapshot.> space and splits off the verb.
func (s *Service) snapshots(ctx context.Context, req micro.Request) (any, error) {
	ctx, cancel := context.WithTimeout(ctx, quickTimeout)
	defer cancel()
	if req.Subject() == s.subj.ListSnapshots() {
		if _, err := decode[struct{}](req); err != nil {
			return nil, err
		}
		list, err := s.rt.ListSnapshots(ctx)
		if err != nil {
			return nil, err
		}
		return subjects.ListSnapshotsReply{Snapshots: list}, nil
	}
	sid, verb, err := s.subj.ParseSnapshot(req.Subject())
	if err != nil {
		return nil, err
	}
	if _, err := decode[struct{}](req); err != nil {
		return nil, err
	}
	switch verb {
	case "get":
		return s.rt.GetSnapshot(ctx, sid)
	case "delete":
		return s.rt.DeleteSnapshot(ctx, sid)
	}
	return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("unknown snapshot verb %q: want get or delete", verb))
}

// poolStatus answers firkin.pool.status (every worker replies).
func (s *Service) poolStatus(_ context.Context, req micro.Request) (any, error) {
	if _, err := decode[struct{}](req); err != nil {
		return nil, err
	}
	return s.rt.PoolStatus(), nil
}

// setPool answers firkin.pool.set: every worker applies a cluster-wide
// target and replies; a target for one worker (worker_id) is applied and
// answered by that worker only.
func (s *Service) setPool(ctx context.Context, req micro.Request) (any, error) {
	in, err := decode[subjects.PoolSetRequest](req)
	if err != nil {
		return nil, err
	}
	if in.WorkerID != "" && in.WorkerID != s.cfg.WorkerID {
		return nil, errAnswered // that worker answers
	}
	if s.cfg.Cluster != nil && s.cfg.Cluster.Draining() && in.Target > 0 {
		return nil, errdefs.Wrap(errdefs.ErrFailedPrecondition, fmt.Errorf("worker %s is draining: it keeps no warm pool", s.cfg.WorkerID))
	}
	return s.rt.SetPool(ctx, in)
}

// workerStatus answers firkin.worker.status (every worker) and
// firkin.worker.<id>.status.
func (s *Service) workerStatus(_ context.Context, req micro.Request) (any, error) {
	if _, err := decode[struct{}](req); err != nil {
		return nil, err
	}
	return s.cfg.Status.Status(), nil
}

func capacityError(msg string) error {
	return errdefs.Wrap(errdefs.ErrCapacity, fmt.Errorf("%s", msg))
}
