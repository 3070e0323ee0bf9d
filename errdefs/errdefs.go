// Package errdefs holds the error classes shared by every layer of the worker.
// Errors are wrapped with %w and context as they travel up; the handlers turn a
// class into a wire error code in exactly one place (subjects.CodeOf).
package errdefs

import "errors"

// The error classes. Match them with errors.Is.
var (
	ErrInvalidArgument    = errors.New("invalid argument")
	ErrNotFound           = errors.New("not found")
	ErrConflict           = errors.New("conflict")              // already exists, in use
	ErrCapacity           = errors.New("capacity exhausted")    // admission said no
	ErrDiskPressure       = errors.New("disk pressure")         // not enough free disk
	ErrUnsupported        = errors.New("unsupported")           // driver or host cannot
	ErrProtocol           = errors.New("protocol failure")      // guest agent misbehaved
	ErrTimeout            = errors.New("timeout")               // a deadline passed
	ErrTemplateBuild      = errors.New("template build failed") // a step or ready check failed
	ErrIntegrity          = errors.New("integrity check failed")
	ErrFailedPrecondition = errors.New("failed precondition") // wrong state for the operation
	ErrInternalFailure    = errors.New("runtime failed")      // anything else
)

// classed is an error that belongs to a class while keeping its own message.
type classed struct {
	class error
	err   error
}

func (e *classed) Error() string   { return e.err.Error() }
func (e *classed) Unwrap() []error { return []error{e.err, e.class} }

// Wrap marks err as belonging to class without changing its message.
// It returns nil when err is nil.
func Wrap(class, err error) error {
	if err == nil {
		return nil
	}
	return &classed{class: class, err: err}
}
