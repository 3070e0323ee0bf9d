package subjects

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"
	"unicode/utf8"
)

// Resources is the machine size a create asks for.
type Resources struct {
	VCPUs    int `json:"vcpus,omitempty"`
	MemoryMB int `json:"memory_mb,omitempty"`
}

// CreateSandboxRequest is the body of firkin.sandbox.create.
type CreateSandboxRequest struct {
	TemplateID    string            `json:"template_id,omitempty"`
	SnapshotID    string            `json:"snapshot_id,omitempty"`
	SandboxID     string            `json:"sandbox_id,omitempty"`
	Resources     *Resources        `json:"resources,omitempty"`
	TimeoutS      int               `json:"timeout_s,omitempty"`
	Env           map[string]string `json:"env,omitempty"`
	Metadata      map[string]string `json:"metadata,omitempty"`
	PublicTraffic *bool             `json:"public_traffic,omitempty"`
	Network       *bool             `json:"network,omitempty"`
	Egress        *EgressPolicy     `json:"egress,omitempty"`
	// ColdBoot boots the template's image instead of restoring its
	// snapshot or taking a warm machine (benchmarks and debugging; only for
	// built-in image templates).
	ColdBoot bool `json:"cold_boot,omitempty"`
	// AutoResume: a request to the sandbox while it is paused (exec,
	// proc.*, fs.*, metrics, snapshot, fork, and port traffic) resumes it
	// first.
	AutoResume bool `json:"auto_resume,omitempty"`
	// OnTimeout is what happens at the deadline: "kill" (default) or
	// "pause".
	OnTimeout string `json:"on_timeout,omitempty"`
	// Secure issues an envd access token with the sandbox: the E2B
	// sandbox API (port 49983 through the proxy) then requires it in
	// X-Access-Token.
	Secure bool `json:"secure,omitempty"`
}

// Sandbox states.
const (
	StateRunning  = "running"
	StateStopping = "stopping"
	StateStopped  = "stopped"
)

// Sandbox sources: how a create got its machine.
const (
	SourcePool    = "pool"
	SourceRestore = "restore"
	SourceBoot    = "boot"
)

// Sandbox describes one sandbox: the reply of create, get and timeout, the
// items of list, and the value of the firkin_sessions KV bucket.
//
// TrafficAccessToken opens a private sandbox through the port proxy; only
// the create reply carries it (see WithoutTokens), it is never stored.
// Generation is a random nonce made at every create, stored in the record:
// the token is bound to it, so it opens this instance only, never a later
// sandbox with the same id. It is not secret. EnvdAccessToken, issued for
// a Secure sandbox, opens its E2B sandbox API (port 49983); like the
// traffic token only the create reply carries it.
type Sandbox struct {
	SandboxID          string            `json:"sandbox_id"`
	TemplateID         string            `json:"template_id,omitempty"`
	SnapshotID         string            `json:"snapshot_id,omitempty"`
	ClientID           string            `json:"client_id"`
	TrafficAccessToken string            `json:"traffic_access_token,omitempty"`
	EnvdAccessToken    string            `json:"envd_access_token,omitempty"`
	Secure             bool              `json:"secure,omitempty"`
	Generation         string            `json:"generation,omitempty"`
	State              string            `json:"state"`
	StartedAt          time.Time         `json:"started_at"`
	EndAt              time.Time         `json:"end_at"`
	Source             string            `json:"source"`
	Resources          Resources         `json:"resources"`
	Metadata           map[string]string `json:"metadata,omitempty"`
	PublicTraffic      bool              `json:"public_traffic"`
	Network            bool              `json:"network"`
	// Egress is the sandbox's network policy as the create asked for it.
	Egress *EgressPolicy `json:"egress,omitempty"`
	Driver string        `json:"driver,omitempty"`
	// Dir is the sandbox's machine directory on its worker, for people to
	// read: the worker derives it from its state directory and the sandbox
	// id and never takes it from a record.
	Dir string `json:"dir,omitempty"`
	// DiskParent is the snapshot whose frozen disk the sandbox's overlay
	// sits on (it may not be deleted while the sandbox lives).
	DiskParent string `json:"disk_parent,omitempty"`
	// DiskParentLocation is where that snapshot's files are on the owner,
	// for people to read (never used as a path).
	DiskParentLocation string `json:"disk_parent_location,omitempty"`
	// MAC authenticates the stored record (HMAC-SHA256 under a key derived
	// from the worker secret): a restarted worker believes only signed
	// session records.
	MAC string `json:"mac,omitempty"`
	// AutoResume and OnTimeout are the create's (see CreateSandboxRequest).
	AutoResume bool   `json:"auto_resume,omitempty"`
	OnTimeout  string `json:"on_timeout,omitempty"`
	// Paused is set while the sandbox is paused (state paused).
	Paused *PausedInfo `json:"paused,omitempty"`
	// ForkedFrom is the sandbox a fork was made from.
	ForkedFrom string `json:"forked_from,omitempty"`
}

// WithoutTokens returns s with its access token cleared. Only the create
// reply carries the token: get, list, timeout and the session record do not.
func (s Sandbox) WithoutTokens() Sandbox {
	s.TrafficAccessToken = ""
	s.EnvdAccessToken = ""
	return s
}

// ListSandboxesReply is the reply of firkin.sandbox.list.
type ListSandboxesReply struct {
	Sandboxes []Sandbox `json:"sandboxes"`
	// NextCursor, when set, asks for the next page (see
	// ListSandboxesRequest).
	NextCursor string `json:"next_cursor,omitempty"`
}

// ExecRequest is the body of firkin.sandbox.<id>.exec.
type ExecRequest struct {
	// Command is a shell command line run with /bin/sh -lc. With Args
	// (even `[]`), Command is the program, looked up in PATH, and Args its
	// arguments, run directly with no shell (faster: one exec). Args is
	// not omitted when empty, so that `[]` (a program with no arguments)
	// survives encoding.
	Command   string            `json:"command"`
	Args      []string          `json:"args"`
	Cwd       string            `json:"cwd,omitempty"`
	Env       map[string]string `json:"env,omitempty"`
	User      string            `json:"user,omitempty"`
	Stdin     string            `json:"stdin,omitempty"`
	TimeoutMS int               `json:"timeout_ms,omitempty"`
	// StreamSubject, when set (under the client's inbox prefix), also gets
	// the output live as it is produced, in the format of a process's
	// output subject (see ProcStreamHeader).
	StreamSubject string `json:"stream_subject,omitempty"`
}

// ExecReply is the reply of exec. Output that is not valid UTF-8 comes base64
// encoded in StdoutB64/StderrB64 instead of Stdout/Stderr. Output over the reply
// cap, or beyond what fits the server's max payload once encoded, is cut (the
// head is kept) and Truncated is set; the full output is in the log stream
// under CommandID.
type ExecReply struct {
	Stdout     string `json:"stdout"`
	Stderr     string `json:"stderr"`
	StdoutB64  string `json:"stdout_b64,omitempty"`
	StderrB64  string `json:"stderr_b64,omitempty"`
	ExitCode   int    `json:"exit_code"`
	Signal     string `json:"signal,omitempty"`
	TimedOut   bool   `json:"timed_out,omitempty"`
	DurationMS int64  `json:"duration_ms"`
	Truncated  bool   `json:"truncated,omitempty"`
	CommandID  string `json:"command_id,omitempty"`
	// LogsDroppedBytes is how many bytes of this command's output are not in
	// the log stream (over the sandbox's log budget, or not stored); a
	// system log event says the same. 0: the log stream has all of it.
	LogsDroppedBytes int64 `json:"logs_dropped_bytes,omitempty"`
}

// KillReply is the reply of kill.
type KillReply struct {
	SandboxID string `json:"sandbox_id"`
	State     string `json:"state"`
}

// TimeoutRequest is the body of firkin.sandbox.<id>.timeout: the new deadline
// is now + timeout_s.
type TimeoutRequest struct {
	TimeoutS int `json:"timeout_s"`
}

// Snapshot kinds.
const (
	KindContinuation = "continuation"
	KindTemplate     = "template"
)

// TemplateMetadata is kept with template snapshots.
type TemplateMetadata struct {
	Envs     map[string]string `json:"envs"`
	StartCmd string            `json:"start_cmd,omitempty"`
	ReadyCmd string            `json:"ready_cmd,omitempty"`
}

// SnapshotRequest is the body of firkin.sandbox.<id>.snapshot.
type SnapshotRequest struct {
	Name             string            `json:"name,omitempty"`
	Kind             string            `json:"kind,omitempty"`
	TemplateMetadata *TemplateMetadata `json:"template_metadata,omitempty"`
	// Stop stops the source sandbox after the save.
	Stop bool `json:"stop,omitempty"`
}

// SnapshotRecord is the reply of snapshot and template.build and the value of
// the firkin_snapshots KV bucket: the seed's fields plus kind, created_at,
// size_bytes, sha256, worker_id and driver, generation and mac.
//
// Location, StagingDir and ParentLocation are for people to read: a worker
// keeps a snapshot's files in <state dir>/snapshots/<snapshot_id>.<generation>
// and never uses a path from a record. MAC authenticates the record (an
// HMAC-SHA256 under a key derived from the worker secret over the rest of the
// record); a worker refuses a record whose mac is missing or does not match.
// Fields added here must be omitempty (the mac covers the record's encoding).
type SnapshotRecord struct {
	SnapshotID        string           `json:"snapshot_id"`
	SourceSandboxID   string           `json:"source_sandbox_id"`
	Names             []string         `json:"names"`
	Location          string           `json:"location,omitempty"`
	StagingDir        string           `json:"staging_dir,omitempty"`
	MachineIdentifier []byte           `json:"machine_identifier,omitempty"`
	NetworkMACs       []string         `json:"network_macs,omitempty"`
	TemplateMetadata  TemplateMetadata `json:"template_metadata"`
	Kind              string           `json:"kind"`
	CreatedAt         time.Time        `json:"created_at"`
	SizeBytes         int64            `json:"size_bytes"`
	SHA256            string           `json:"sha256"`
	WorkerID          string           `json:"worker_id"`
	Driver            string           `json:"driver"`
	TemplateID        string           `json:"template_id,omitempty"`
	Parent            string           `json:"parent,omitempty"`
	ParentLocation    string           `json:"parent_location,omitempty"`
	Format            string           `json:"format,omitempty"`
	Resources         Resources        `json:"resources"`
	Artifacts         []Artifact       `json:"artifacts,omitempty"`
	// Generation tells versions of one snapshot id apart (a rebuilt
	// template): [a-z0-9]{1,32}, the suffix of the snapshot's directory.
	Generation string `json:"generation,omitempty"`
	// MAC is "v1:" and the hex HMAC-SHA256 of the record (see above).
	MAC string `json:"mac,omitempty"`
}

// Artifact is one file of a snapshot with its integrity data.
type Artifact struct {
	Name      string `json:"name"`
	SizeBytes int64  `json:"size_bytes"`
	SHA256    string `json:"sha256"`
}

// ListSnapshotsReply is the reply of firkin.snapshot.list.
type ListSnapshotsReply struct {
	Snapshots []SnapshotRecord `json:"snapshots"`
}

// DeleteSnapshotReply is the reply of firkin.snapshot.<sid>.delete.
type DeleteSnapshotReply struct {
	SnapshotID string `json:"snapshot_id"`
	Deleted    bool   `json:"deleted"`
}

// BuildTemplateRequest is the body of firkin.template.build.
type BuildTemplateRequest struct {
	TemplateID string            `json:"template_id"`
	From       string            `json:"from,omitempty"`
	Steps      []string          `json:"steps,omitempty"`
	Envs       map[string]string `json:"envs,omitempty"`
	StartCmd   string            `json:"start_cmd,omitempty"`
	ReadyCmd   string            `json:"ready_cmd,omitempty"`
	Resources  *Resources        `json:"resources,omitempty"`
	// ReadyTimeoutS bounds how long ready_cmd is polled (default 60).
	ReadyTimeoutS int `json:"ready_timeout_s,omitempty"`
	// Replace rebuilds a template that exists: without it an existing id
	// is a conflict. Only a template snapshot is ever replaced, never a
	// continuation snapshot of the same name.
	Replace bool `json:"replace,omitempty"`
}

// RouteRequest is the body of firkin.sandbox.<id>.route.
type RouteRequest struct {
	Port int `json:"port"`
}

// RouteReply tells where a guest port is reachable. TCP, the raw TCP
// listener's address, is only there for a public sandbox: a private one is
// reached through the proxy (HTTP, or CONNECT for any protocol) with its
// traffic token.
type RouteReply struct {
	SandboxID string `json:"sandbox_id"`
	Port      int    `json:"port"`
	Host      string `json:"host"`
	URL       string `json:"url"`
	TCP       string `json:"tcp,omitempty"`
}

// Log event sources.
const (
	SourceStdout = "stdout"
	SourceStderr = "stderr"
	SourceSystem = "system"
	SourceBuild  = "build"
)

// LogEvent is one message of the FIRKIN_LOGS stream.
type LogEvent struct {
	TimestampUnixSeconds int64  `json:"timestamp_unix_seconds"`
	Timestamp            string `json:"timestamp"`
	Message              string `json:"message"`
	Source               string `json:"source"`
	SandboxID            string `json:"sandbox_id,omitempty"`
	TemplateID           string `json:"template_id,omitempty"`
	CommandID            string `json:"command_id,omitempty"`
	// MessageB64 carries output that is not valid UTF-8.
	MessageB64 string `json:"message_b64,omitempty"`
}

// LogsRequest is the body of firkin.sandbox.<id>.logs: events after cursor
// (0 = from the start), at most limit (default 100, at most 1000).
type LogsRequest struct {
	Cursor uint64 `json:"cursor,omitempty"`
	Limit  int    `json:"limit,omitempty"`
}

// LogsReply is a page of log events; pass NextCursor to get the next page.
// A page is bounded by bytes as well as by limit, so that it fits the
// server's max payload: Truncated says it stopped early (or cut the message
// of one event too large for any page) and more may follow from NextCursor.
type LogsReply struct {
	Events     []LogEvent `json:"events"`
	NextCursor uint64     `json:"next_cursor"`
	Truncated  bool       `json:"truncated,omitempty"`
}

// LifecycleEvent is published on firkin.events.<kind>.<id>.
type LifecycleEvent struct {
	Kind      string    `json:"kind"`
	SandboxID string    `json:"sandbox_id"`
	WorkerID  string    `json:"worker_id"`
	Time      time.Time `json:"time"`
	Reason    string    `json:"reason,omitempty"`
}

// PoolSetRequest is the body of firkin.pool.set.
type PoolSetRequest struct {
	TemplateID string `json:"template_id"`
	Target     int    `json:"target"`
	// WorkerID, when set, makes the target that worker's only (the others
	// do not reply); empty sets it cluster-wide.
	WorkerID string `json:"worker_id,omitempty"`
}

// PoolTemplateStatus is one template's warm pool on one worker.
type PoolTemplateStatus struct {
	TemplateID string `json:"template_id"`
	Target     int    `json:"target"`
	Ready      int    `json:"ready"`
	InProgress int    `json:"in_progress"`
	LastError  string `json:"last_error,omitempty"`
	// FillTimeouts counts warm fills of the template that missed their
	// deadline (their machine was stopped) since the worker started.
	FillTimeouts int `json:"fill_timeouts,omitempty"`
}

// PoolStatusReply is one worker's reply to firkin.pool.status and pool.set.
type PoolStatusReply struct {
	WorkerID  string               `json:"worker_id"`
	Templates []PoolTemplateStatus `json:"templates"`
	// Scope, in a pool.set reply, says where the target applies: "cluster"
	// (every worker, kept in firkin_config) or "worker" (this one).
	Scope string `json:"scope,omitempty"`
}

// CodeOK stands for a successful reply in request counts (it is never an
// error code).
const CodeOK Code = "ok"

// WorkerLimits are a worker's admission limits.
type WorkerLimits struct {
	MaxSandboxes int `json:"max_sandboxes"`
	MaxVCPUs     int `json:"max_vcpus"`
	MaxMemoryMB  int `json:"max_memory_mb"`
}

// EndpointStats counts the requests one endpoint answered since the worker
// started.
type EndpointStats struct {
	Endpoint         string `json:"endpoint"`
	Requests         int64  `json:"requests"`
	Errors           int64  `json:"errors"`
	ProcessingTimeNs int64  `json:"processing_time_ns"`
}

// WorkerStatusReply answers firkin.worker.status (every worker) and
// firkin.worker.<id>.status: the worker, what it holds, and what it has
// answered.
type WorkerStatusReply struct {
	WorkerID    string    `json:"worker_id"`
	Version     string    `json:"version"`
	Driver      string    `json:"driver"`
	Accelerator string    `json:"accelerator,omitempty"`
	StartedAt   time.Time `json:"started_at"`
	UptimeS     float64   `json:"uptime_s"`
	// Sandboxes and Warm count active sandboxes and warm machines; VCPUs
	// and MemoryMB are what both reserve, within Limits.
	Sandboxes     int                  `json:"sandboxes"`
	Warm          int                  `json:"warm"`
	VCPUs         int                  `json:"vcpus"`
	MemoryMB      int                  `json:"memory_mb"`
	Limits        WorkerLimits         `json:"limits"`
	Pool          []PoolTemplateStatus `json:"pool"`
	QEMUProcesses int                  `json:"qemu_processes"`
	// LogDroppedBytes is log output dropped since start.
	LogDroppedBytes int64 `json:"log_dropped_bytes"`
	// Endpoints count requests by endpoint: the micro endpoints and the
	// per-sandbox verbs (sandbox.exec, ...), which are served by
	// per-sandbox subscriptions and so are not in $SRV.STATS.
	Endpoints []EndpointStats `json:"endpoints"`
}

// Decode parses a request body strictly: unknown fields and trailing data are
// invalid requests. An empty body decodes as {}.
func Decode(data []byte, v any) error {
	data = bytes.TrimSpace(data)
	if len(data) == 0 {
		data = []byte("{}")
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return invalid("malformed request: %s", jsonErrorText(err))
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return invalid("malformed request: data after the JSON object")
	}
	return nil
}

func jsonErrorText(err error) string {
	var syn *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case errors.As(err, &syn):
		return fmt.Sprintf("invalid JSON at byte %d: %v", syn.Offset, syn)
	case errors.As(err, &typ):
		return fmt.Sprintf("field %q: want %s, got %s", typ.Field, typ.Type, typ.Value)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return "truncated JSON"
	}
	return err.Error()
}

// NewLogEvent builds a log event stamped now. Output that is not valid UTF-8
// goes into MessageB64.
func NewLogEvent(source, sandboxID, commandID string, data []byte) LogEvent {
	now := time.Now().UTC()
	ev := LogEvent{
		TimestampUnixSeconds: now.Unix(),
		Timestamp:            now.Format(time.RFC3339Nano),
		Source:               source,
		SandboxID:            sandboxID,
		CommandID:            commandID,
	}
	if utf8.Valid(data) {
		ev.Message = string(data)
	} else {
		ev.MessageB64 = base64.StdEncoding.EncodeToString(data)
	}
	return ev
}
