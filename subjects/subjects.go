// Package subjects is the wire contract of firkin-worker: subject names, the
// message types carried on them, and the error codes of error replies. It is
// shared by the worker, its clients and its tests, and uses only the standard
// library (and the worker's own error classes).
package subjects

import (
	"fmt"
	"regexp"
	"strings"
)

// DefaultPrefix is the first token of every subject.
const DefaultPrefix = "firkin"

// Verbs of the per-sandbox subjects firkin.sandbox.<id>.<verb>.
const (
	VerbGet      = "get"
	VerbExec     = "exec"
	VerbKill     = "kill"
	VerbSnapshot = "snapshot"
	VerbRoute    = "route"
	VerbTimeout  = "timeout"
	VerbLogs     = "logs"
)

// SandboxVerbs lists the verbs the owning worker answers.
var SandboxVerbs = []string{VerbGet, VerbExec, VerbKill, VerbSnapshot, VerbRoute, VerbTimeout, VerbPause, VerbResume, VerbFork}

// Lifecycle event kinds, published on firkin.events.<kind>.<id>.
const (
	EventCreated     = "created"
	EventKilled      = "killed"
	EventSnapshotted = "snapshotted"
	EventExpired     = "expired"
	EventFailed      = "failed"
)

// Subjects builds and parses subject names under one prefix.
type Subjects struct {
	Prefix string
}

// New returns the subjects under prefix (DefaultPrefix when empty). A prefix
// is one or more dot-separated tokens without wildcards or white space.
func New(prefix string) (Subjects, error) {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	for _, tok := range strings.Split(prefix, ".") {
		if !validToken(tok) {
			return Subjects{}, fmt.Errorf("subject prefix %q: token %q is empty or has a wildcard, dot or space", prefix, tok)
		}
	}
	return Subjects{Prefix: prefix}, nil
}

// Default is the subjects under DefaultPrefix.
var Default = Subjects{Prefix: DefaultPrefix}

// maxVerbTokens bounds the tokens of a per-sandbox verb.
const maxVerbTokens = 4

// validVerb reports whether verb is 1..maxVerbTokens valid tokens joined by
// dots.
func validVerb(verb string) bool {
	toks := strings.Split(verb, ".")
	if len(toks) > maxVerbTokens {
		return false
	}
	for _, tok := range toks {
		if !validToken(tok) {
			return false
		}
	}
	return true
}

func validToken(tok string) bool {
	return tok != "" && !strings.ContainsAny(tok, ".*> \t\r\n")
}

// WorkerStatus is <prefix>.worker.status: every worker answers.
func (s Subjects) WorkerStatus() string { return s.Prefix + ".worker.status" }

// WorkerStatusOf is <prefix>.worker.<id>.status: that worker answers.
func (s Subjects) WorkerStatusOf(workerID string) string {
	return s.Prefix + ".worker." + workerID + ".status"
}

// CreateSandbox is <prefix>.sandbox.create.
func (s Subjects) CreateSandbox() string { return s.Prefix + ".sandbox.create" }

// ListSandboxes is <prefix>.sandbox.list.
func (s Subjects) ListSandboxes() string { return s.Prefix + ".sandbox.list" }

// Sandbox is <prefix>.sandbox.<id>.<verb>.
func (s Subjects) Sandbox(id, verb string) string {
	return s.Prefix + ".sandbox." + id + "." + verb
}

// SandboxAll is <prefix>.sandbox.<id>.>, what the owning worker subscribes
// to (verbs may have several tokens: proc.start, proc.<command id>.stdin,
// fs.read, fs.chunk.<transfer id>).
func (s Subjects) SandboxAll(id string) string { return s.Prefix + ".sandbox." + id + ".>" }

// SandboxVerbWildcard is <prefix>.sandbox.*.<verb>.
func (s Subjects) SandboxVerbWildcard(verb string) string { return s.Prefix + ".sandbox.*." + verb }

// BuildTemplate is <prefix>.template.build.
func (s Subjects) BuildTemplate() string { return s.Prefix + ".template.build" }

// ListSnapshots is <prefix>.snapshot.list.
func (s Subjects) ListSnapshots() string { return s.Prefix + ".snapshot.list" }

// Snapshot is <prefix>.snapshot.<sid>.<verb> (verb "get" or "delete").
func (s Subjects) Snapshot(sid, verb string) string {
	return s.Prefix + ".snapshot." + sid + "." + verb
}

// SnapshotVerbWildcard is <prefix>.snapshot.*.<verb>.
func (s Subjects) SnapshotVerbWildcard(verb string) string { return s.Prefix + ".snapshot.*." + verb }

// PoolStatus is <prefix>.pool.status.
func (s Subjects) PoolStatus() string { return s.Prefix + ".pool.status" }

// SetPool is <prefix>.pool.set.
func (s Subjects) SetPool() string { return s.Prefix + ".pool.set" }

// Logs is <prefix>.logs.<id>, where a sandbox's log events are published.
func (s Subjects) Logs(id string) string { return s.Prefix + ".logs." + id }

// BuildLogs is <prefix>.logs.build.<template id>, where a template build's
// progress is published.
func (s Subjects) BuildLogs(templateID string) string { return s.Prefix + ".logs.build." + templateID }

// LogsAll is <prefix>.logs.>, the subjects of the log stream.
func (s Subjects) LogsAll() string { return s.Prefix + ".logs.>" }

// Event is <prefix>.events.<kind>.<id>.
func (s Subjects) Event(kind, id string) string { return s.Prefix + ".events." + kind + "." + id }

// EventsAll is <prefix>.events.>.
func (s Subjects) EventsAll() string { return s.Prefix + ".events.>" }

// ParseSandbox splits <prefix>.sandbox.<id>.<verb> into a validated sandbox id
// and verb. A verb is one or more tokens (at most maxVerbTokens, each
// without wildcards or white space) joined by dots: "get", "proc.start",
// "proc.<command id>.stdin", "fs.read", "fs.chunk.<transfer id>". Its errors
// are errdefs.ErrInvalidArgument.
func (s Subjects) ParseSandbox(subject string) (id, verb string, err error) {
	rest, ok := strings.CutPrefix(subject, s.Prefix+".sandbox.")
	if !ok {
		return "", "", invalid("subject %q is not under %s.sandbox", subject, s.Prefix)
	}
	id, verb, ok = strings.Cut(rest, ".")
	if !ok || !validVerb(verb) {
		return "", "", invalid("subject %q is not %s.sandbox.<id>.<verb>", subject, s.Prefix)
	}
	if err := ValidateSandboxID(id); err != nil {
		return "", "", err
	}
	return id, verb, nil
}

// ParseSnapshot splits <prefix>.snapshot.<sid>.<verb> into a validated snapshot
// id and verb. Its errors are errdefs.ErrInvalidArgument (a malformed subject
// is the client's mistake, not a runtime failure).
func (s Subjects) ParseSnapshot(subject string) (sid, verb string, err error) {
	rest, ok := strings.CutPrefix(subject, s.Prefix+".snapshot.")
	if !ok {
		return "", "", invalid("subject %q is not under %s.snapshot", subject, s.Prefix)
	}
	i := strings.LastIndexByte(rest, '.')
	if i < 0 {
		return "", "", invalid("subject %q is not %s.snapshot.<id>.<verb>", subject, s.Prefix)
	}
	sid, verb = rest[:i], rest[i+1:]
	if err := ValidateSnapshotName(sid); err != nil {
		return "", "", err
	}
	return sid, verb, nil
}

var (
	sandboxIDPattern    = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)
	snapshotNamePattern = regexp.MustCompile(`^[A-Za-z0-9._-]{1,128}$`)
	templateIDPattern   = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,62}$`)
)

// ValidateSandboxID checks a sandbox id: [a-z0-9][a-z0-9-]{0,62}, so it is a
// DNS label and a single subject token.
func ValidateSandboxID(id string) error {
	if !sandboxIDPattern.MatchString(id) {
		return invalid("sandbox id %q: want 1-63 characters of [a-z0-9-], starting with a letter or digit", id)
	}
	return nil
}

// ValidateSnapshotName checks a snapshot id or name: 1-128 characters of
// [A-Za-z0-9._-], not starting or ending with a dot and without "..". Such a
// name is a valid NATS KV key (whose charset is [-/_=.a-zA-Z0-9], without
// leading or trailing dot), a sequence of non-empty subject tokens, and a
// single file name (no "/"). Snapshot ids that contain dots cannot be used in
// the per-snapshot subjects as one token, so the snapshot subjects take the id
// as everything between "snapshot." and the last dot (the verb has no dot).
func ValidateSnapshotName(name string) error {
	if !snapshotNamePattern.MatchString(name) || strings.HasPrefix(name, ".") || strings.HasSuffix(name, ".") || strings.Contains(name, "..") {
		return invalid("snapshot name %q: want 1-128 characters of [A-Za-z0-9._-], not starting or ending with \".\" and without \"..\"", name)
	}
	return nil
}

// ValidateTemplateID checks a template id: [a-z0-9][a-z0-9_-]{0,62}.
func ValidateTemplateID(id string) error {
	if !templateIDPattern.MatchString(id) {
		return invalid("template id %q: want 1-63 characters of [a-z0-9_-], starting with a letter or digit", id)
	}
	return nil
}
