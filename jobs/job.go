// Package jobs is the worker's job runner: durable jobs published to the
// JetStream work-queue stream FIRKIN_JOBS (subjects <prefix>.jobs.<queue>)
// and consumed by every worker through one durable pull consumer per queue.
// A job names a template or a snapshot, files to write and commands to run;
// the runner takes a sandbox through the runtime (so the warm pool is used),
// runs the commands, stores the result in the KV bucket firkin_results under
// the job id, publishes it on <prefix>.results.<job id>, acks the message
// and kills the sandbox. Infrastructure failures are retried with backoff
// (Nak with a delay, bounded by MaxDeliver) and then dead-lettered on
// <prefix>.jobs.dead.<queue>; a command's non-zero exit is a result.
package jobs

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path"
	"regexp"
	"strconv"
	"strings"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// Bounds of a job.
const (
	MaxCommands       = 100
	MaxCommandBytes   = 64 << 10
	MaxStdinBytes     = 1 << 20
	MaxFiles          = 64
	MaxFileBytes      = 1 << 20
	MaxTotalFileBytes = 4 << 20
	MaxEnv            = 64
	MaxEnvValueBytes  = 32 << 10
	MaxPathBytes      = 4096
	MaxJobTimeoutS    = 86400
	DefaultTimeoutS   = 600
	MaxCommandTimeout = 3600000 // ms
	// OutputHead is how many bytes of each output stream a command's result keeps.
	OutputHead = 4 << 10
)

// Job is the body of a message on <prefix>.jobs.<queue>.
type Job struct {
	JobID      string              `json:"job_id,omitempty"`
	TemplateID string              `json:"template_id,omitempty"`
	SnapshotID string              `json:"snapshot_id,omitempty"`
	Commands   []Command           `json:"commands"`
	Files      []File              `json:"files,omitempty"`
	Resources  *subjects.Resources `json:"resources,omitempty"`
	TimeoutS   int                 `json:"timeout_s,omitempty"`
	Snapshot   *SnapshotOption     `json:"snapshot,omitempty"`
	KeepGoing  bool                `json:"keep_going,omitempty"`
	Env        map[string]string   `json:"env,omitempty"`
}

// Command is one command of a job: a JSON string (the command line) or an
// object with the fields of an exec request.
type Command struct {
	Command   string            `json:"command"`
	Env       map[string]string `json:"env,omitempty"`
	Cwd       string            `json:"cwd,omitempty"`
	User      string            `json:"user,omitempty"`
	Stdin     string            `json:"stdin,omitempty"`
	TimeoutMS int               `json:"timeout_ms,omitempty"`
}

// UnmarshalJSON takes a string or a strict object.
func (c *Command) UnmarshalJSON(data []byte) error {
	data = bytes.TrimSpace(data)
	if len(data) > 0 && data[0] == '"' {
		*c = Command{}
		return json.Unmarshal(data, &c.Command)
	}
	type plain Command
	var p plain
	if err := strictDecode(data, &p); err != nil {
		return err
	}
	*c = Command(p)
	return nil
}

// File is a file written into the sandbox before the first command.
type File struct {
	Path       string `json:"path"`
	Content    string `json:"content,omitempty"`
	ContentB64 string `json:"content_b64,omitempty"`
	// Mode is octal text ("644", "0755"); default 0644.
	Mode string `json:"mode,omitempty"`

	data []byte
	mode int64
}

// SnapshotOption asks for a continuation snapshot when the commands
// succeeded: `true` (a generated name) or {"name":"…"}.
type SnapshotOption struct {
	Name string `json:"name,omitempty"`
}

// UnmarshalJSON takes true/false or an object.
func (s *SnapshotOption) UnmarshalJSON(data []byte) error {
	data = bytes.TrimSpace(data)
	switch string(data) {
	case "true":
		*s = SnapshotOption{}
		return nil
	case "false":
		return errors.New(`snapshot: false is not needed; leave the field out`)
	}
	type plain SnapshotOption
	var p plain
	if err := strictDecode(data, &p); err != nil {
		return err
	}
	*s = SnapshotOption(p)
	return nil
}

func strictDecode(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return errors.New("data after the JSON value")
	}
	return nil
}

var (
	jobIDPattern = regexp.MustCompile(`^[A-Za-z0-9_-]{1,128}$`)
	queuePattern = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,31}$`)
	octalPattern = regexp.MustCompile(`^0?[0-7]{1,4}$`)
)

// reservedQueues are tokens of <prefix>.jobs.<x> that are not queues.
var reservedQueues = map[string]bool{"status": true, "dead": true, "submit": true, "cancel": true}

// ValidateJobID checks a job id: 1-128 characters of [A-Za-z0-9_-] (a KV
// key and one subject token).
func ValidateJobID(id string) error {
	if !jobIDPattern.MatchString(id) {
		return invalid("job id %q: want 1-128 characters of [A-Za-z0-9_-]", cut(id, 64))
	}
	return nil
}

// ValidateQueue checks a queue name: [a-z0-9][a-z0-9_-]{0,31}, not one of
// status, dead, submit, cancel.
func ValidateQueue(q string) error {
	if !queuePattern.MatchString(q) || reservedQueues[q] {
		return invalid("queue %q: want 1-32 characters of [a-z0-9_-] starting with a letter or digit, not status, dead, submit or cancel", cut(q, 64))
	}
	return nil
}

// Decode parses and validates a job strictly (unknown fields, wrong types,
// trailing data and values out of bounds are errdefs.ErrInvalidArgument).
func Decode(data []byte) (Job, error) {
	var j Job
	if err := subjects.Decode(data, &j); err != nil {
		return j, err
	}
	return j, j.Validate()
}

// Validate checks every field against its bounds and decodes file contents.
func (j *Job) Validate() error {
	if j.JobID != "" {
		if err := ValidateJobID(j.JobID); err != nil {
			return err
		}
	}
	switch {
	case j.TemplateID == "" && j.SnapshotID == "":
		return invalid("template_id or snapshot_id is required")
	case j.TemplateID != "" && j.SnapshotID != "":
		return invalid("give template_id or snapshot_id, not both")
	case j.TemplateID != "":
		if err := subjects.ValidateTemplateID(j.TemplateID); err != nil {
			return err
		}
	default:
		if err := subjects.ValidateSnapshotName(j.SnapshotID); err != nil {
			return err
		}
	}
	if len(j.Commands) == 0 || len(j.Commands) > MaxCommands {
		return invalid("commands: %d, want 1..%d", len(j.Commands), MaxCommands)
	}
	for i, c := range j.Commands {
		if err := c.validate(); err != nil {
			return fmt.Errorf("commands[%d]: %w", i, err)
		}
	}
	if len(j.Files) > MaxFiles {
		return invalid("files: %d, want at most %d", len(j.Files), MaxFiles)
	}
	total := 0
	for i := range j.Files {
		if err := j.Files[i].validate(); err != nil {
			return fmt.Errorf("files[%d]: %w", i, err)
		}
		total += len(j.Files[i].data)
	}
	if total > MaxTotalFileBytes {
		return invalid("files: %d bytes in all, want at most %d", total, MaxTotalFileBytes)
	}
	if r := j.Resources; r != nil && (r.VCPUs < 0 || r.VCPUs > 64 || r.MemoryMB < 0 || r.MemoryMB > 1<<20) {
		return invalid("resources out of bounds")
	}
	if j.TimeoutS < 0 || j.TimeoutS > MaxJobTimeoutS {
		return invalid("timeout_s %d: want 0..%d", j.TimeoutS, MaxJobTimeoutS)
	}
	if j.Snapshot != nil && j.Snapshot.Name != "" {
		if err := subjects.ValidateSnapshotName(j.Snapshot.Name); err != nil {
			return fmt.Errorf("snapshot.name: %w", err)
		}
	}
	return validateEnv("env", j.Env)
}

func (c Command) validate() error {
	if c.Command == "" || len(c.Command) > MaxCommandBytes {
		return invalid("command: %d bytes, want 1..%d", len(c.Command), MaxCommandBytes)
	}
	if strings.ContainsRune(c.Command, 0) {
		return invalid("command: contains NUL")
	}
	if len(c.Stdin) > MaxStdinBytes {
		return invalid("stdin: %d bytes, want at most %d", len(c.Stdin), MaxStdinBytes)
	}
	if c.TimeoutMS < 0 || c.TimeoutMS > MaxCommandTimeout {
		return invalid("timeout_ms %d: want 0..%d", c.TimeoutMS, MaxCommandTimeout)
	}
	if len(c.Cwd) > MaxPathBytes || strings.ContainsRune(c.Cwd, 0) {
		return invalid("cwd: too long or contains NUL")
	}
	if len(c.User) > 64 || strings.ContainsAny(c.User, "\x00\n") {
		return invalid("user: too long or contains NUL")
	}
	return validateEnv("env", c.Env)
}

func validateEnv(what string, env map[string]string) error {
	if len(env) > MaxEnv {
		return invalid("%s: %d entries, want at most %d", what, len(env), MaxEnv)
	}
	for k, v := range env {
		if k == "" || len(k) > 256 || strings.ContainsAny(k, "=\x00") {
			return invalid("%s: key %q: want 1..256 bytes without '=' or NUL", what, cut(k, 64))
		}
		if len(v) > MaxEnvValueBytes || strings.ContainsRune(v, 0) {
			return invalid("%s: value of %q: at most %d bytes, no NUL", what, cut(k, 64), MaxEnvValueBytes)
		}
	}
	return nil
}

func (f *File) validate() error {
	if f.Path == "" || len(f.Path) > MaxPathBytes || !strings.HasPrefix(f.Path, "/") || path.Clean(f.Path) != f.Path || f.Path == "/" || strings.ContainsRune(f.Path, 0) {
		return invalid("path %q: want a clean absolute file path", cut(f.Path, 64))
	}
	switch {
	case f.Content != "" && f.ContentB64 != "":
		return invalid("give content or content_b64, not both")
	case f.ContentB64 != "":
		if len(f.ContentB64) > base64.StdEncoding.EncodedLen(MaxFileBytes) {
			return invalid("content_b64: more than %d bytes", MaxFileBytes)
		}
		data, err := base64.StdEncoding.DecodeString(f.ContentB64)
		if err != nil {
			return invalid("content_b64: %v", err)
		}
		f.data = data
	default:
		f.data = []byte(f.Content)
	}
	if len(f.data) > MaxFileBytes {
		return invalid("content: %d bytes, want at most %d", len(f.data), MaxFileBytes)
	}
	f.mode = 0o644
	if f.Mode != "" {
		if !octalPattern.MatchString(f.Mode) {
			return invalid("mode %q: want octal digits such as \"644\" or \"0755\"", cut(f.Mode, 16))
		}
		f.mode, _ = strconv.ParseInt(f.Mode, 8, 32)
	}
	return nil
}

func invalid(format string, args ...any) error {
	return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf(format, args...))
}

func cut(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
