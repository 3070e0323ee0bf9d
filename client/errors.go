package client

import (
	"errors"
	"fmt"
	"strings"

	"github.com/firkin-dev/firkin-worker/subjects"
)

// ErrNoResponders matches (errors.Is) an *Error for a request nobody
// answered: no worker owns the sandbox, no worker runs, or no stream stores
// the job queue's subject.
var ErrNoResponders = errors.New("no responders")

// Error is an error reply of the contract: its code and message, and the
// subject of the request. It also matches errors.Is against the errdefs
// class of its code (errdefs.ErrNotFound for sandbox_not_found,
// errdefs.ErrInvalidArgument for invalid_request, …), so subjects.CodeOf
// gives its code back; a request nobody answered matches ErrNoResponders.
//
//	var e *client.Error
//	if errors.As(err, &e) && e.Code == subjects.CodeCapacityRejected { … }
//	if errors.Is(err, errdefs.ErrNotFound) { … }
type Error struct {
	Code    subjects.Code
	Message string
	// Subject is the request's subject.
	Subject string
	// NoResponders is set when nobody answered the request (no error body
	// came back; Code is what the contract says that means here).
	NoResponders bool
}

// Error returns "<subject>: <code>: <message>".
func (e *Error) Error() string {
	var b strings.Builder
	if e.Subject != "" {
		b.WriteString(e.Subject)
		b.WriteString(": ")
	}
	fmt.Fprintf(&b, "%s: %s", e.Code, e.Message)
	return b.String()
}

// Unwrap returns the code's errdefs class (see subjects.ErrorDetail.Err).
func (e *Error) Unwrap() error {
	return subjects.ErrorDetail{Code: e.Code, Message: e.Message}.Err()
}

// Is reports whether target is ErrNoResponders and nobody answered.
func (e *Error) Is(target error) bool {
	return target == ErrNoResponders && e.NoResponders
}

// noResponders is the error for a request nobody answered. Per-sandbox
// subjects mean the sandbox has no owner (sandbox_not_found, as the contract
// says); anything else means no worker runs.
func (c *Client) noResponders(subject string) *Error {
	e := &Error{Subject: subject, NoResponders: true}
	if _, _, err := c.subj.ParseSandbox(subject); err == nil {
		e.Code, e.Message = subjects.CodeSandboxNotFound, "no worker owns this sandbox (no responders)"
	} else {
		e.Code, e.Message = subjects.CodeRuntimeFailed, "no worker answers (no responders): is any worker running on this NATS server or cluster?"
	}
	return e
}
