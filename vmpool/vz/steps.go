package vz

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// step is one named step of a boot, save or restore, so that an error says
// which step failed.
type step struct {
	name string
	run  func() error
}

// runSteps runs steps in order and stops at the first failure, which it
// returns as "vz: <op>: <step>: <error>". An error that belongs to no
// errdefs class is classed errdefs.ErrInternalFailure.
func runSteps(op string, steps []step) error {
	for _, s := range steps {
		if err := s.run(); err != nil {
			return classify(fmt.Errorf("vz: %s: %s: %w", op, s.name, err))
		}
	}
	return nil
}

// errorClasses are the errdefs classes an error may already belong to.
var errorClasses = []error{
	errdefs.ErrInvalidArgument, errdefs.ErrNotFound, errdefs.ErrConflict, errdefs.ErrCapacity,
	errdefs.ErrDiskPressure, errdefs.ErrUnsupported, errdefs.ErrProtocol, errdefs.ErrTimeout,
	errdefs.ErrTemplateBuild, errdefs.ErrIntegrity, errdefs.ErrFailedPrecondition, errdefs.ErrInternalFailure,
}

// classify returns err unchanged when it belongs to an errdefs class, else
// err classed errdefs.ErrInternalFailure.
func classify(err error) error {
	if err == nil {
		return nil
	}
	for _, c := range errorClasses {
		if errors.Is(err, c) {
			return err
		}
	}
	return errdefs.Wrap(errdefs.ErrInternalFailure, err)
}

// undoStack collects what to undo when a later step fails: every resource
// registers its undo when it is made, and the undos run once, in reverse.
type undoStack struct {
	log *slog.Logger
	op  string
	fns []step
}

// push registers an undo.
func (u *undoStack) push(name string, fn func() error) {
	u.fns = append(u.fns, step{name: name, run: fn})
}

// run runs the undos in reverse order, logging the ones that fail (the
// caller keeps the first error, the one that made it undo).
func (u *undoStack) run() {
	for i := len(u.fns) - 1; i >= 0; i-- {
		if err := u.fns[i].run(); err != nil && u.log != nil {
			u.log.Warn("vz: undo failed", "op", u.op, "undo", u.fns[i].name, "err", err)
		}
	}
	u.fns = nil
}
