package envd

import (
	"context"
	"errors"
	"net/http"
	"strings"

	"connectrpc.com/connect"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// codeOf is the firkin error code of err ("" when it has none).
func codeOf(err error) subjects.Code {
	var ce *client.Error
	if errors.As(err, &ce) {
		return ce.Code
	}
	return subjects.CodeOf(err)
}

// connectError maps an error of the NATS API to a Connect error.
func connectError(err error) error {
	if err == nil {
		return nil
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		return err
	}
	code := connect.CodeInternal
	switch {
	case errors.Is(err, context.Canceled):
		code = connect.CodeCanceled
	case errors.Is(err, context.DeadlineExceeded):
		code = connect.CodeDeadlineExceeded
	default:
		switch codeOf(err) {
		case subjects.CodeFileNotFound, subjects.CodeSnapshotNotFound:
			code = connect.CodeNotFound
		case subjects.CodeSandboxNotFound:
			code = connect.CodeUnavailable // the SDK: "sandbox is probably not running anymore"
		case subjects.CodePermissionDenied:
			code = connect.CodePermissionDenied
		case subjects.CodeInvalidRequest:
			code = connect.CodeInvalidArgument
		case subjects.CodeConflict:
			code = connect.CodeFailedPrecondition
		case subjects.CodeCapacityRejected, subjects.CodeDiskPressure:
			code = connect.CodeResourceExhausted
		case subjects.CodeTimeout:
			code = connect.CodeDeadlineExceeded
		case subjects.CodeUnsupported:
			code = connect.CodeUnimplemented
		}
	}
	if code == connect.CodeInternal {
		return connect.NewError(code, errors.New(publicMessage(err)))
	}
	return connect.NewError(code, err)
}

// publicMessage is what a client of the sandbox API is told of err: its
// text, but for an internal failure only the worker's error id. The
// worker's message of an internal failure can name host paths (state
// directories, snapshot files) and is meant for NATS clients and the
// worker's log, not for the holder of one sandbox's token.
func publicMessage(err error) string {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err.Error()
	}
	switch code := codeOf(err); {
	case code.Status() < 500, code == subjects.CodeTimeout, code == subjects.CodeUnsupported, code == subjects.CodeDiskPressure:
		return err.Error()
	}
	msg := err.Error()
	if i := strings.LastIndex(msg, "(error id "); i >= 0 && strings.HasSuffix(msg, ")") && len(msg)-i <= 32 {
		return "internal error " + msg[i:]
	}
	return "internal error"
}

// httpStatus maps an error of the NATS API to the status /files answers.
func httpStatus(err error) int {
	switch codeOf(err) {
	case subjects.CodeFileNotFound:
		return http.StatusNotFound
	case subjects.CodeSandboxNotFound:
		return http.StatusBadGateway
	case subjects.CodePermissionDenied:
		return http.StatusForbidden
	case subjects.CodeInvalidRequest:
		return http.StatusBadRequest
	case subjects.CodeDiskPressure:
		return http.StatusInsufficientStorage
	case subjects.CodeCapacityRejected:
		return http.StatusTooManyRequests
	case subjects.CodeTimeout:
		return http.StatusGatewayTimeout
	}
	if errors.Is(err, errdefs.ErrInvalidArgument) {
		return http.StatusBadRequest
	}
	return http.StatusInternalServerError
}
