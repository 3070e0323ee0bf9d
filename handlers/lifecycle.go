package handlers

import (
	"context"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/micro"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// Lifecycle is the runtime's pause, resume and fork. It is optional: a
// runtime without it answers those verbs with unsupported.
type Lifecycle interface {
	Pause(ctx context.Context, id string, req subjects.PauseRequest) (subjects.Sandbox, error)
	Resume(ctx context.Context, id string, req subjects.ResumeRequest) (subjects.Sandbox, error)
	// Wake makes a sandbox ready for a request that needs its machine:
	// it resumes a paused sandbox created with auto_resume and refuses
	// (failed_precondition) one without.
	Wake(ctx context.Context, id string) error
}

// Forker is the runtime's fork (optional).
type Forker interface {
	Fork(ctx context.Context, id string, req subjects.ForkRequest) (subjects.ForkReply, error)
}

// Lister is the runtime's filtered, paginated list (optional: without it
// firkin.sandbox.list answers every sandbox in one page).
type Lister interface {
	ListPage(ctx context.Context, req subjects.ListSandboxesRequest) (subjects.ListSandboxesReply, error)
}

// noWake are the verbs answered without the sandbox's machine: they work
// on a paused sandbox as they are and never resume it.
var noWake = map[string]bool{
	subjects.VerbGet: true, subjects.VerbKill: true, subjects.VerbRoute: true, subjects.VerbLogs: true,
	subjects.VerbPause: true, subjects.VerbResume: true,
}

// lifecycleVerb answers pause, resume and fork, and wakes a paused sandbox
// before the verbs that need its machine. handled is false when the
// caller dispatches the verb.
func (s *Service) lifecycleVerb(ctx context.Context, req micro.Request, id, verb string) (out any, handled bool, err error) {
	lc, ok := s.rt.(Lifecycle)
	if !ok {
		if verb == subjects.VerbPause || verb == subjects.VerbResume || verb == subjects.VerbFork {
			return nil, true, errdefs.Wrap(errdefs.ErrUnsupported, errors.New("this worker cannot pause, resume or fork sandboxes"))
		}
		return nil, false, nil
	}
	switch verb {
	case subjects.VerbPause:
		in, err := decode[subjects.PauseRequest](req)
		if err != nil {
			return nil, true, err
		}
		ctx, cancel := context.WithTimeout(ctx, snapshotTimeout)
		defer cancel()
		out, err := lc.Pause(ctx, id, in)
		return out, true, err
	case subjects.VerbResume:
		in, err := decode[subjects.ResumeRequest](req)
		if err != nil {
			return nil, true, err
		}
		ctx, cancel := context.WithTimeout(ctx, snapshotTimeout)
		defer cancel()
		out, err := lc.Resume(ctx, id, in)
		return out, true, err
	}
	if !noWake[verb] {
		wctx, cancel := context.WithTimeout(ctx, snapshotTimeout)
		err := lc.Wake(wctx, id)
		cancel()
		if err != nil {
			return nil, true, err
		}
	}
	if verb != subjects.VerbFork {
		return nil, false, nil
	}
	f, ok := s.rt.(Forker)
	if !ok {
		return nil, true, errdefs.Wrap(errdefs.ErrUnsupported, errors.New("this worker cannot fork sandboxes"))
	}
	in, err := decode[subjects.ForkRequest](req)
	if err != nil {
		return nil, true, err
	}
	if err := in.Validate(); err != nil {
		return nil, true, err
	}
	ctx, cancel := context.WithTimeout(ctx, createTimeout+snapshotTimeout)
	defer cancel()
	out, err = f.Fork(ctx, id, in)
	if err != nil {
		return nil, true, fmt.Errorf("fork sandbox %s: %w", id, err)
	}
	return out, true, nil
}

// TakeOver is the runtime's resume of a paused sandbox of a worker that is
// gone (optional).
type TakeOver interface {
	TakeOver(ctx context.Context, req subjects.TakeOverRequest, live func(workerID string) bool) (subjects.Sandbox, error)
}

// resumeElsewhere answers firkin.sandbox.resume (queue group).
func (s *Service) resumeElsewhere(ctx context.Context, req micro.Request) (any, error) {
	in, err := decode[subjects.TakeOverRequest](req)
	if err != nil {
		return nil, err
	}
	to, ok := s.rt.(TakeOver)
	if !ok || s.cfg.Cluster == nil {
		return nil, errdefs.Wrap(errdefs.ErrUnsupported, errors.New("this worker cannot take sandboxes over"))
	}
	ctx, cancel := context.WithTimeout(ctx, snapshotTimeout)
	defer cancel()
	members, err := s.cfg.Cluster.Members(ctx)
	if err != nil {
		return nil, err
	}
	live := map[string]bool{}
	for _, m := range members {
		live[m.WorkerID] = true
	}
	return to.TakeOver(ctx, in, func(id string) bool { return live[id] })
}
