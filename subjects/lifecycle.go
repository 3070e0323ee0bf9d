package subjects

import (
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// Lifecycle verbs of firkin.sandbox.<id>.<verb>.
const (
	// VerbPause saves the sandbox as a continuation snapshot and stops its
	// machine; the session stays, in state paused.
	VerbPause = "pause"
	// VerbResume restores a paused sandbox under the same id.
	VerbResume = "resume"
	// VerbFork makes new running sandboxes from a running one.
	VerbFork = "fork"
)

// StatePaused is the state of a paused sandbox: no machine, its session
// kept, resumable.
const StatePaused = "paused"

// What a sandbox does at its deadline (CreateSandboxRequest.OnTimeout).
const (
	OnTimeoutKill  = "kill"
	OnTimeoutPause = "pause"
)

// MaxForkCount bounds fork's count.
const MaxForkCount = 8

// PauseRequest is the body of firkin.sandbox.<id>.pause (empty today).
type PauseRequest struct{}

// ResumeRequest is the body of firkin.sandbox.<id>.resume. TimeoutS, when
// set, gives the resumed sandbox a new lifetime (otherwise it gets what was
// left of its deadline when it was paused).
type ResumeRequest struct {
	TimeoutS int `json:"timeout_s,omitempty"`
}

// ForkRequest is the body of firkin.sandbox.<id>.fork.
type ForkRequest struct {
	// Count is how many sandboxes to make, 1..MaxForkCount (default 1).
	Count int `json:"count,omitempty"`
	// Metadata replaces the source's metadata on the forks when set.
	Metadata map[string]string `json:"metadata,omitempty"`
	// TimeoutS is each fork's lifetime (default: the source's remaining).
	TimeoutS int `json:"timeout_s,omitempty"`
}

// Validate checks a fork request and applies its default count.
func (r *ForkRequest) Validate() error {
	if r.Count == 0 {
		r.Count = 1
	}
	if r.Count < 1 || r.Count > MaxForkCount {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("count %d: want 1..%d", r.Count, MaxForkCount))
	}
	if r.TimeoutS < 0 {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("timeout_s %d: want >= 0", r.TimeoutS))
	}
	return nil
}

// ForkReply is the reply of fork: the new sandboxes, each with its own
// traffic access token (as a create reply carries it).
type ForkReply struct {
	SourceID  string    `json:"source_id"`
	Sandboxes []Sandbox `json:"sandboxes"`
	// SnapshotID is the continuation snapshot the forks were restored from.
	SnapshotID string `json:"snapshot_id"`
	// Routes are the port routes each fork got, by fork id: the source's
	// routes, opened again on the fork (its own host names and, for a
	// public sandbox, its own raw TCP listeners).
	Routes map[string][]RouteReply `json:"routes,omitempty"`
}

// Bounds of a list request.
const (
	DefaultListLimit = 100
	MaxListLimit     = 1000
	maxListFilter    = 16
)

// ListSandboxesRequest is the body of firkin.sandbox.list. Every field is
// optional: Metadata keeps the sandboxes whose metadata has every given
// key with that value; State keeps one state; Limit (1..1000, default 100)
// bounds a page; Cursor continues after the previous page's NextCursor.
type ListSandboxesRequest struct {
	Metadata map[string]string `json:"metadata,omitempty"`
	State    string            `json:"state,omitempty"`
	Limit    int               `json:"limit,omitempty"`
	Cursor   string            `json:"cursor,omitempty"`
}

// Validate checks a list request and applies the default limit.
func (r *ListSandboxesRequest) Validate() error {
	switch {
	case r.Limit == 0:
		r.Limit = DefaultListLimit
	case r.Limit < 0 || r.Limit > MaxListLimit:
		return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("limit %d: want 1..%d", r.Limit, MaxListLimit))
	}
	if len(r.Metadata) > maxListFilter {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("metadata filter has %d keys: at most %d", len(r.Metadata), maxListFilter))
	}
	if r.Cursor != "" {
		if err := ValidateSandboxID(r.Cursor); err != nil {
			return errdefs.Wrap(errdefs.ErrInvalidArgument, errors.New("cursor: not a cursor of this list"))
		}
	}
	return nil
}

// Match reports whether sb passes the request's filters.
func (r ListSandboxesRequest) Match(sb Sandbox) bool {
	if r.State != "" && sb.State != r.State {
		return false
	}
	for k, v := range r.Metadata {
		if got, ok := sb.Metadata[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// PausedInfo is what a paused sandbox's record keeps to resume it.
type PausedInfo struct {
	// SnapshotID is the continuation snapshot the sandbox resumes from.
	SnapshotID string    `json:"snapshot_id"`
	PausedAt   time.Time `json:"paused_at"`
	// RemainingMS is what was left of its deadline when it was paused (the
	// deadline is suspended while paused).
	RemainingMS int64 `json:"remaining_ms"`
}

// Lifecycle events of pause, resume and fork.
const (
	EventPaused  = "paused"
	EventResumed = "resumed"
	EventForked  = "forked"
)

// PageSandboxes filters list by req (validated) and returns one page, in
// sandbox id order, with the cursor of the next page when there is one.
func PageSandboxes(list []Sandbox, req ListSandboxesRequest) ListSandboxesReply {
	kept := make([]Sandbox, 0, len(list))
	for _, sb := range list {
		if req.Match(sb) && (req.Cursor == "" || sb.SandboxID > req.Cursor) {
			kept = append(kept, sb)
		}
	}
	sort.Slice(kept, func(i, j int) bool { return kept[i].SandboxID < kept[j].SandboxID })
	reply := ListSandboxesReply{Sandboxes: kept}
	if req.Limit > 0 && len(kept) > req.Limit {
		reply.Sandboxes = kept[:req.Limit]
		reply.NextCursor = kept[req.Limit-1].SandboxID
	}
	return reply
}

// ResumeSandbox is <prefix>.sandbox.resume (queue group): resume a paused
// sandbox whose worker is gone, on the worker that answers.
func (s Subjects) ResumeSandbox() string { return s.Prefix + ".sandbox.resume" }

// TakeOverRequest is the body of firkin.sandbox.resume.
type TakeOverRequest struct {
	SandboxID string `json:"sandbox_id"`
	TimeoutS  int    `json:"timeout_s,omitempty"`
}
