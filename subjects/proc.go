package subjects

import (
	"regexp"
	"strings"
	"time"
)

// Process verbs: firkin.sandbox.<id>.proc.start, .proc.list, and
// firkin.sandbox.<id>.proc.<command id>.<op> for the ops below.
const (
	VerbProcStart = "proc.start"
	VerbProcList  = "proc.list"

	ProcOpStdin   = "stdin"
	ProcOpSignal  = "signal"
	ProcOpResize  = "resize"
	ProcOpConnect = "connect"
)

// ProcOps lists the per-process ops of firkin.sandbox.<id>.proc.<command id>.<op>.
var ProcOps = []string{ProcOpStdin, ProcOpSignal, ProcOpResize, ProcOpConnect}

// Headers of the messages on a process's output subject.
const (
	// ProcStreamHeader says what a message carries: ProcStreamStdout,
	// ProcStreamStderr (bytes in the body) or ProcStreamExit (a ProcExit
	// in JSON, the last message).
	ProcStreamHeader = "Firkin-Proc-Stream"
	// ProcSeqHeader is the message's sequence number on this subject for
	// this process, in decimal, starting at 1 with no gaps as sent: a
	// reader that sees a jump lost messages (the live subject is best
	// effort; the log stream has them).
	ProcSeqHeader = "Firkin-Proc-Seq"
	// ProcCommandHeader is the process's command id.
	ProcCommandHeader = "Firkin-Command-Id"
)

// Values of ProcStreamHeader.
const (
	ProcStreamStdout = "stdout"
	ProcStreamStderr = "stderr"
	ProcStreamExit   = "exit"
)

// SourceExit is the source of the log event that ends a process's output in
// FIRKIN_LOGS: its message is the ProcExit in JSON.
const SourceExit = "exit"

// Process states.
const (
	ProcRunning = "running"
	ProcExited  = "exited"
)

// MaxLiveChunk is the most output bytes one message on a live output
// subject carries.
const MaxLiveChunk = 64 << 10

// ProcOutput is <prefix>.proc.<sandbox id>.<command id>.out, a process's
// default live output subject.
func (s Subjects) ProcOutput(sandboxID, commandID string) string {
	return s.Prefix + ".proc." + sandboxID + "." + commandID + ".out"
}

// ProcAll is <prefix>.proc.>, every live output subject.
func (s Subjects) ProcAll() string { return s.Prefix + ".proc.>" }

// ProcVerb is the verb of per-process op op: proc.<command id>.<op>.
func ProcVerb(commandID, op string) string { return "proc." + commandID + "." + op }

// ParseProcVerb splits a per-sandbox verb under "proc.": proc.start and
// proc.list give op "start" or "list" and no command id;
// proc.<command id>.<op> gives a validated command id and one of ProcOps.
// ok is false for a verb not under "proc."; err (ErrInvalidArgument) for
// one that is but is malformed.
func ParseProcVerb(verb string) (commandID, op string, ok bool, err error) {
	rest, found := strings.CutPrefix(verb, "proc.")
	if !found {
		return "", "", false, nil
	}
	switch rest {
	case "start", "list":
		return "", rest, true, nil
	}
	commandID, op, found = strings.Cut(rest, ".")
	if !found {
		return "", "", true, invalid("unknown process verb %q: want proc.start, proc.list or proc.<command id>.<op>", verb)
	}
	if err := ValidateCommandID(commandID); err != nil {
		return "", "", true, err
	}
	for _, o := range ProcOps {
		if op == o {
			return commandID, op, true, nil
		}
	}
	return "", "", true, invalid("unknown process op %q: want one of %v", op, ProcOps)
}

var commandIDPattern = regexp.MustCompile(`^[a-z][a-z0-9]{11}$`)

// ValidateCommandID checks a command id: 12 characters [a-z][a-z0-9]{11}.
func ValidateCommandID(id string) error {
	if !commandIDPattern.MatchString(id) {
		return invalid("command id %q: want 12 characters [a-z][a-z0-9]{11}", id)
	}
	return nil
}

// PTYSize is a terminal's size in characters.
type PTYSize struct {
	Cols int `json:"cols"`
	Rows int `json:"rows"`
}

// Validate checks the size: 1..1000 each.
func (p PTYSize) Validate() error {
	if p.Cols < 1 || p.Cols > 1000 || p.Rows < 1 || p.Rows > 1000 {
		return invalid("pty size %dx%d: want cols and rows 1..1000", p.Cols, p.Rows)
	}
	return nil
}

// ProcStartRequest is the body of firkin.sandbox.<id>.proc.start: exec's
// fields plus argv, a PTY, a tag, background, and where output goes live.
type ProcStartRequest struct {
	// Command is a shell command line run with /bin/sh -lc; with Args it is
	// the program (looked up in PATH) and Args its arguments, run without
	// a shell.
	Command   string            `json:"command"`
	Args      []string          `json:"args,omitempty"`
	Cwd       string            `json:"cwd,omitempty"`
	Env       map[string]string `json:"env,omitempty"`
	User      string            `json:"user,omitempty"`
	Stdin     string            `json:"stdin,omitempty"`
	TimeoutMS int               `json:"timeout_ms,omitempty"`
	// PTY runs the command on a terminal of this size (stdout and stderr
	// are then one stream, reported as stdout).
	PTY *PTYSize `json:"pty,omitempty"`
	// Tag is a label of the caller's, shown by proc.list.
	Tag string `json:"tag,omitempty"`
	// Background lifts the default timeout: the process runs until it
	// exits, is signalled, outlives timeout_ms (when set) or the sandbox
	// ends.
	Background bool `json:"background,omitempty"`
	// OutputSubject is where output goes live instead of
	// <prefix>.proc.<sandbox id>.<command id>.out; it must be under the
	// client's inbox prefix (_INBOX.).
	OutputSubject string `json:"output_subject,omitempty"`
}

// Bounds of process requests.
const (
	MaxProcArgs    = 1024
	MaxProcArgLen  = 128 << 10
	MaxProcTag     = 64
	MaxProcCommand = 128 << 10
)

// validateArgs bounds an argv: entries, total bytes, no NUL.
func validateArgs(args []string) error {
	if len(args) > MaxProcArgs {
		return invalid("args: %d entries, at most %d", len(args), MaxProcArgs)
	}
	total := 0
	for _, a := range args {
		total += len(a)
		if strings.IndexByte(a, 0) >= 0 {
			return invalid("args: an argument has a NUL byte")
		}
	}
	if total > MaxProcArgLen {
		return invalid("args: %d bytes, at most %d", total, MaxProcArgLen)
	}
	return nil
}

// Validate checks what needs no sandbox: command and args.
func (r ExecRequest) Validate() error {
	if r.Command == "" {
		return invalid("command is required")
	}
	if r.Args != nil && (len(r.Command) > MaxProcCommand || strings.IndexByte(r.Command, 0) >= 0) {
		return invalid("command: at most %d bytes, no NUL", MaxProcCommand)
	}
	return validateArgs(r.Args)
}

// Validate checks what needs no sandbox: command, args, tag, pty, timeout.
func (r ProcStartRequest) Validate() error {
	if r.Command == "" {
		return invalid("command is required")
	}
	if len(r.Command) > MaxProcCommand || strings.IndexByte(r.Command, 0) >= 0 {
		return invalid("command: at most %d bytes, no NUL", MaxProcCommand)
	}
	if err := validateArgs(r.Args); err != nil {
		return err
	}
	if len(r.Tag) > MaxProcTag || !printable(r.Tag) {
		return invalid("tag: at most %d printable characters", MaxProcTag)
	}
	if r.PTY != nil {
		if err := r.PTY.Validate(); err != nil {
			return err
		}
	}
	if r.TimeoutMS < 0 {
		return invalid("timeout_ms %d: want 0 or more", r.TimeoutMS)
	}
	return nil
}

func printable(s string) bool {
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			return false
		}
	}
	return true
}

// ProcStartReply answers proc.start as soon as the process runs.
type ProcStartReply struct {
	CommandID string    `json:"command_id"`
	PID       int       `json:"pid"`
	SandboxID string    `json:"sandbox_id"`
	StartedAt time.Time `json:"started_at"`
	// OutputSubject is where output goes live (the request's, or the
	// default).
	OutputSubject string `json:"output_subject"`
	// LogSubject is the FIRKIN_LOGS subject holding the output (events
	// with this command_id, the last of source "exit").
	LogSubject string `json:"log_subject"`
}

// ProcStdinRequest is the JSON form of a proc.<command id>.stdin body: data
// (text) or data_b64 (bytes), then close when set. A body that is not such
// an object is written to stdin as it is.
type ProcStdinRequest struct {
	Data    string `json:"data,omitempty"`
	DataB64 []byte `json:"data_b64,omitempty"`
	Close   bool   `json:"close,omitempty"`
}

// ProcStdinReply answers a stdin write once the guest took the bytes.
type ProcStdinReply struct {
	Written int  `json:"written"`
	Closed  bool `json:"closed,omitempty"`
}

// ProcSignalRequest is the body of proc.<command id>.signal.
type ProcSignalRequest struct {
	// Signal is a name (TERM, SIGTERM, term) of Signals.
	Signal string `json:"signal"`
}

// Signals are the signals a client may send, by name (without SIG), with
// their Linux numbers.
var Signals = map[string]int{
	"HUP": 1, "INT": 2, "QUIT": 3, "KILL": 9, "USR1": 10, "USR2": 12, "PIPE": 13,
	"ALRM": 14, "TERM": 15, "CONT": 18, "STOP": 19, "TSTP": 20, "WINCH": 28,
}

// ParseSignal returns the canonical name (TERM) of a signal given as TERM,
// SIGTERM or term.
func ParseSignal(s string) (string, error) {
	n := strings.TrimPrefix(strings.ToUpper(s), "SIG")
	if _, ok := Signals[n]; !ok || len(s) > 16 {
		return "", invalid("signal %q: want one of HUP INT QUIT KILL USR1 USR2 PIPE ALRM TERM CONT STOP TSTP WINCH", s)
	}
	return n, nil
}

// SignalName returns the name (TERM) of Linux signal number n, or "" when
// it has none here.
func SignalName(n int) string {
	for name, v := range Signals {
		if v == n {
			return name
		}
	}
	switch n {
	case 6:
		return "ABRT"
	case 11:
		return "SEGV"
	case 4:
		return "ILL"
	case 7:
		return "BUS"
	case 8:
		return "FPE"
	}
	return ""
}

// ProcSignalReply answers a signal request.
type ProcSignalReply struct {
	Signal string `json:"signal"`
}

// ProcResizeRequest is the body of proc.<command id>.resize (PTY only).
type ProcResizeRequest = PTYSize

// ProcConnectRequest is the body of proc.<command id>.connect.
type ProcConnectRequest struct {
	// OutputSubject, when set (under the client's inbox prefix), also gets
	// the process's output live from now on.
	OutputSubject string `json:"output_subject,omitempty"`
}

// ProcExit is how a process ended: the body of the last message on its
// output subject, and the message of its "exit" log event.
type ProcExit struct {
	CommandID string `json:"command_id"`
	// ExitCode is the process's exit status; 128 + n when signal n ended it.
	ExitCode int `json:"exit_code"`
	// Signal is the name of the signal that ended it (TERM, KILL), if one did.
	Signal     string `json:"signal,omitempty"`
	TimedOut   bool   `json:"timed_out,omitempty"`
	DurationMS int64  `json:"duration_ms"`
	// LogsDroppedBytes is output not in the log stream (over the sandbox's
	// log budget, or not stored).
	LogsDroppedBytes int64 `json:"logs_dropped_bytes,omitempty"`
	// Lost is set when the worker lost track of the process (the guest no
	// longer knows it); ExitCode is then -1.
	Lost bool `json:"lost,omitempty"`
}

// ProcInfo describes one process (proc.list, proc.connect).
type ProcInfo struct {
	CommandID  string    `json:"command_id"`
	PID        int       `json:"pid"`
	Tag        string    `json:"tag,omitempty"`
	Command    string    `json:"command"`
	Args       []string  `json:"args,omitempty"`
	PTY        bool      `json:"pty,omitempty"`
	Background bool      `json:"background,omitempty"`
	StartedAt  time.Time `json:"started_at"`
	State      string    `json:"state"`
	// Exit is set once the process has exited.
	Exit *ProcExit `json:"exit,omitempty"`
	// OutputSubject is its default live output subject, LogSubject where
	// its output is kept.
	OutputSubject string `json:"output_subject"`
	LogSubject    string `json:"log_subject"`
}

// ProcListReply is the reply of proc.list.
type ProcListReply struct {
	Processes []ProcInfo `json:"processes"`
}

// ProcConnectReply is the reply of proc.connect: the process, and where to
// read it (see PROTOCOL.md, "Reading a process's output").
type ProcConnectReply struct {
	ProcInfo
	// LogStream is the stream holding LogSubject (FIRKIN_LOGS).
	LogStream string `json:"log_stream"`
	// ReplayFrom is the time to start an ordered consumer of LogSubject
	// at: the process's start less a margin for clock skew.
	ReplayFrom time.Time `json:"replay_from"`
	// Live lists the subjects that get its output live now.
	Live []string `json:"live"`
}
