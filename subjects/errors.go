package subjects

import (
	"context"
	"errors"
	"fmt"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// Code is an error code of an error reply.
type Code string

// The error codes of the contract.
const (
	CodeInvalidRequest      Code = "invalid_request"
	CodeSandboxNotFound     Code = "sandbox_not_found"
	CodeSnapshotNotFound    Code = "snapshot_not_found"
	CodeConflict            Code = "conflict"
	CodeTemplateBuildFailed Code = "template_build_failed"
	CodeCapacityRejected    Code = "capacity_rejected"
	CodeRuntimeFailed       Code = "runtime_failed"
	CodeUnsupported         Code = "unsupported"
	CodeProtocolFailure     Code = "protocol_failure"
	CodeTimeout             Code = "timeout"
	CodeDiskPressure        Code = "disk_pressure"
	// CodeFileNotFound is a guest path that does not exist (the sandbox
	// does: a missing sandbox is sandbox_not_found).
	CodeFileNotFound Code = "file_not_found"
	// CodePermissionDenied is a guest file operation the guest refused
	// (EACCES, EPERM, a read-only file system).
	CodePermissionDenied Code = "permission_denied"
)

// Status is the HTTP-like status sent in the Nats-Service-Error-Code header.
func (c Code) Status() int {
	switch c {
	case CodeInvalidRequest:
		return 400
	case CodeSandboxNotFound, CodeSnapshotNotFound, CodeFileNotFound:
		return 404
	case CodePermissionDenied:
		return 403
	case CodeConflict:
		return 409
	case CodeTemplateBuildFailed:
		return 422
	case CodeCapacityRejected:
		return 429
	case CodeUnsupported:
		return 501
	case CodeProtocolFailure:
		return 502
	case CodeTimeout:
		return 504
	case CodeDiskPressure:
		return 507
	}
	return 500
}

// ErrorBody is the body of an error reply.
type ErrorBody struct {
	Error ErrorDetail `json:"error"`
}

// ErrorDetail is the code and message of an error reply.
type ErrorDetail struct {
	Code    Code   `json:"code"`
	Message string `json:"message"`
}

// ErrSnapshotNotFound marks a not-found error as being about a snapshot (the
// code is then snapshot_not_found, not sandbox_not_found).
var ErrSnapshotNotFound = fmt.Errorf("snapshot %w", errdefs.ErrNotFound)

// ErrFileNotFound marks a not-found error as being about a guest path (the
// code is then file_not_found).
var ErrFileNotFound = fmt.Errorf("file %w", errdefs.ErrNotFound)

// ErrPermissionDenied marks an invalid-argument error as the guest's
// refusal of a file operation (the code is then permission_denied).
var ErrPermissionDenied = fmt.Errorf("permission denied: %w", errdefs.ErrInvalidArgument)

// CodeOf maps an error to its wire code: the one place where error classes
// become codes.
func CodeOf(err error) Code {
	switch {
	case errors.Is(err, ErrSnapshotNotFound):
		return CodeSnapshotNotFound
	case errors.Is(err, ErrFileNotFound):
		return CodeFileNotFound
	case errors.Is(err, ErrPermissionDenied):
		return CodePermissionDenied
	case errors.Is(err, errdefs.ErrNotFound):
		return CodeSandboxNotFound
	case errors.Is(err, errdefs.ErrInvalidArgument), errors.Is(err, errdefs.ErrIntegrity):
		return CodeInvalidRequest
	case errors.Is(err, errdefs.ErrConflict), errors.Is(err, errdefs.ErrFailedPrecondition):
		return CodeConflict
	case errors.Is(err, errdefs.ErrTemplateBuild):
		return CodeTemplateBuildFailed
	case errors.Is(err, errdefs.ErrCapacity):
		return CodeCapacityRejected
	case errors.Is(err, errdefs.ErrUnsupported):
		return CodeUnsupported
	case errors.Is(err, errdefs.ErrProtocol):
		return CodeProtocolFailure
	case errors.Is(err, errdefs.ErrTimeout), errors.Is(err, context.DeadlineExceeded):
		return CodeTimeout
	case errors.Is(err, errdefs.ErrDiskPressure):
		return CodeDiskPressure
	}
	return CodeRuntimeFailed
}

// Err turns an error reply back into a classified error (for clients): the
// other direction of CodeOf.
func (d ErrorDetail) Err() error {
	class := errdefs.ErrInternalFailure
	switch d.Code {
	case CodeInvalidRequest:
		class = errdefs.ErrInvalidArgument
	case CodeSandboxNotFound:
		class = errdefs.ErrNotFound
	case CodeSnapshotNotFound:
		class = ErrSnapshotNotFound
	case CodeFileNotFound:
		class = ErrFileNotFound
	case CodePermissionDenied:
		class = ErrPermissionDenied
	case CodeConflict:
		class = errdefs.ErrConflict
	case CodeTemplateBuildFailed:
		class = errdefs.ErrTemplateBuild
	case CodeCapacityRejected:
		class = errdefs.ErrCapacity
	case CodeUnsupported:
		class = errdefs.ErrUnsupported
	case CodeProtocolFailure:
		class = errdefs.ErrProtocol
	case CodeTimeout:
		class = errdefs.ErrTimeout
	case CodeDiskPressure:
		class = errdefs.ErrDiskPressure
	}
	return errdefs.Wrap(class, fmt.Errorf("%s: %s", d.Code, d.Message))
}

func invalid(format string, args ...any) error {
	return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf(format, args...))
}
