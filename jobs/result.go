package jobs

import (
	"encoding/base64"
	"encoding/json"
	"time"
	"unicode/utf8"

	"github.com/firkin-dev/firkin-worker/subjects"
)

// Job statuses (Result.Status).
const (
	StatusSucceeded = "succeeded" // every command exited 0 (and the snapshot, if asked, was saved)
	StatusFailed    = "failed"    // a command exited non-zero, timed out or was refused; or the job timed out
	StatusInvalid   = "invalid"   // the job failed validation (not retried; dead-lettered)
	StatusCanceled  = "canceled"  // canceled while waiting or running
	StatusDead      = "dead"      // infrastructure failures on every attempt (dead-lettered)
)

// Result is stored in the KV bucket firkin_results under the job id and
// published on <prefix>.results.<job id>.
type Result struct {
	JobID      string          `json:"job_id"`
	Queue      string          `json:"queue"`
	Status     string          `json:"status"`
	Code       subjects.Code   `json:"code,omitempty"`  // the error code for invalid, dead and failed-by-error
	Error      string          `json:"error,omitempty"` // why, for every status but succeeded
	Commands   []CommandResult `json:"commands"`
	SandboxID  string          `json:"sandbox_id,omitempty"`
	SnapshotID string          `json:"snapshot_id,omitempty"`
	WorkerID   string          `json:"worker_id"`
	Attempts   int             `json:"attempts"`
	// StreamSeq is the job message's FIRKIN_JOBS sequence.
	StreamSeq   uint64    `json:"stream_seq"`
	SubmittedAt time.Time `json:"submitted_at"`
	StartedAt   time.Time `json:"started_at"`
	FinishedAt  time.Time `json:"finished_at"`
	// QueuedMS is from submission to the start of the last attempt;
	// DurationMS from that start to the end.
	QueuedMS   int64 `json:"queued_ms"`
	DurationMS int64 `json:"duration_ms"`
}

// CommandResult is one command's outcome. Stdout and Stderr keep the first
// OutputHead bytes (the whole output is in FIRKIN_LOGS under command_id).
type CommandResult struct {
	Command    string `json:"command"`
	ExitCode   int    `json:"exit_code"`
	Signal     string `json:"signal,omitempty"`
	Stdout     string `json:"stdout"`
	Stderr     string `json:"stderr"`
	StdoutB64  string `json:"stdout_b64,omitempty"`
	StderrB64  string `json:"stderr_b64,omitempty"`
	Truncated  bool   `json:"truncated,omitempty"`
	TimedOut   bool   `json:"timed_out,omitempty"`
	Error      string `json:"error,omitempty"` // refused or failed to run (exit_code is then -1)
	CommandID  string `json:"command_id,omitempty"`
	DurationMS int64  `json:"duration_ms"`
	// LogsDroppedBytes is the exec reply's: output not in the log stream.
	LogsDroppedBytes int64 `json:"logs_dropped_bytes,omitempty"`
}

// DeadLetter is published on <prefix>.jobs.dead.<queue> (and kept in the
// stream FIRKIN_JOBS_DEAD) for invalid and dead jobs.
type DeadLetter struct {
	JobID    string          `json:"job_id"`
	Queue    string          `json:"queue"`
	Status   string          `json:"status"`
	Code     subjects.Code   `json:"code,omitempty"`
	Reason   string          `json:"reason"`
	Attempts int             `json:"attempts"`
	WorkerID string          `json:"worker_id"`
	Time     time.Time       `json:"time"`
	Job      json.RawMessage `json:"job,omitempty"`     // the message body when it is JSON
	JobB64   string          `json:"job_b64,omitempty"` // else base64
}

// StatusReply is one worker's answer on <prefix>.jobs.status.
type StatusReply struct {
	WorkerID    string        `json:"worker_id"`
	Concurrency int           `json:"concurrency"`
	Queues      []QueueStatus `json:"queues"`
}

// QueueStatus counts a queue's jobs. Waiting and Running are the cluster's
// (the durable consumer's pending and ack-pending counts); the others
// count what this worker finished since it started.
type QueueStatus struct {
	Queue       string `json:"queue"`
	Waiting     uint64 `json:"waiting"`
	Running     int    `json:"running"`
	RunningHere int    `json:"running_here"`
	Redelivered int    `json:"redelivered"`
	Succeeded   int64  `json:"succeeded"`
	Failed      int64  `json:"failed"`
	Invalid     int64  `json:"invalid"`
	Canceled    int64  `json:"canceled"`
	Dead        int64  `json:"dead"`
	Error       string `json:"error,omitempty"`
}

// CancelReply answers <prefix>.jobs.<job id>.cancel.
type CancelReply struct {
	JobID string `json:"job_id"`
	// Status is the job's final status when it already has a result, else
	// "cancel_requested": the job is skipped when fetched, or stopped by
	// the worker running it within a second.
	Status string `json:"status"`
}

// MaxResultBytes bounds a stored result: under the embedded server's 8 MiB
// payload and an external server's 1 MiB default. A job's commands and
// outputs (JSON-escaped up to sixfold) could exceed it; encodeResult then
// drops the outputs and cuts the echoed texts.
const MaxResultBytes = 900 << 10

// encodeResult marshals res, shrinking it to at most MaxResultBytes.
func encodeResult(res Result) ([]byte, error) {
	data, err := json.Marshal(res)
	if err != nil || len(data) <= MaxResultBytes {
		return data, err
	}
	cmds := make([]CommandResult, len(res.Commands))
	for i, c := range res.Commands {
		c.Command, c.Error = cut(c.Command, 256), cut(c.Error, 256)
		c.Stdout, c.Stderr, c.StdoutB64, c.StderrB64 = "", "", "", ""
		c.Truncated = true
		cmds[i] = c
	}
	res.Commands, res.Error = cmds, cut(res.Error, 4096)
	return json.Marshal(res)
}

// head cuts an exec reply's output to OutputHead bytes.
func head(text, b64 string) (string, string, bool) {
	if b64 != "" {
		raw, err := base64.StdEncoding.DecodeString(b64)
		if err != nil || len(raw) <= OutputHead {
			return "", b64, false
		}
		return "", base64.StdEncoding.EncodeToString(raw[:OutputHead]), true
	}
	if len(text) <= OutputHead {
		return text, "", false
	}
	n := OutputHead
	for n > 0 && !utf8.RuneStart(text[n]) {
		n--
	}
	return text[:n], "", true
}
