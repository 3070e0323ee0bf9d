// Package agent is the channel between the host and the guest agent: the wire
// protocol, the host-side Client and the guest-side Server.
//
// One channel is a byte stream (a virtio-serial port or a vsock connection in the
// guest; a unix socket or vsock connection on the host). A session starts with a
// line handshake and then carries multiplexed streams, so several commands, file
// transfers and TCP streams run at once. A session can be dropped (Quiesce, before a
// snapshot) and a new one established on the same channel after a restore.
//
// # Protocol
//
// A session starts with a line handshake on the raw channel:
//
//	host:  FIRKIN/1 HELLO <nonce>\n
//	guest: FIRKIN/1 READY <nonce>\n
//
// The guest skips any bytes before a complete hello line (it answers the last
// one it finds); the host skips any bytes before the READY line carrying its
// own nonce. Then the host is a yamux client and the guest a yamux server.
//
// Every yamux stream opened by the host starts with one request frame (a JSON
// request naming the operation). Frames are
//
//	type (1 byte) | payload length (4 bytes, big endian) | payload
//
// with a payload of at most MaxFramePayload bytes. The operations:
//
//	ping        R{op}                                   → O
//	init        R{op, init}                             → O | E
//	quiesce     R{op}                                   → O, then the guest drops the session
//	shutdown    R{op}                                   → O, then the guest syncs and powers off
//	read_file   R{op, path}                             → D* O | E
//	write_file  R{op, path, mode} D* F                  → O | E
//	exec        R{op, exec} (0* c)? k?                  → S (1|2)* X | E
//	dial        R{op, port}                             → "OK\n" raw bytes... | "ERR <msg>\n"
//	stats       R{op}                                   → O{GuestStats}
//
// and the file operations of fs.go (stat, list, mkdir, remove, rename,
// fs_read, fs_write, watch), which may run as a guest user.
//
// An exec stream carries stdin as '0' frames closed by 'c'; 'k' kills the
// command's process group, and so does the end of the stream. The guest
// reports the start ('S', with the pid), output as it comes ('1' stdout, '2'
// stderr) and the end ('X', an ExecResult). A detached exec answers X (with
// the pid) at once. Errors are 'E' frames carrying a RemoteError.
//
// The host treats everything from the guest as untrusted and bounds it: the
// handshake buffer, data frames (MaxFramePayload), the JSON of O, E, S and X
// frames (64 KiB, refused from the header before the payload is read), guest
// error messages (cut at 4 KiB, unknown codes read as internal), signal names,
// the dial answer line (512 bytes, printable characters only), ReadFile
// (MaxReadFile), file infos (paths and links 4 KiB, known types), lists
// (MaxListEntries), watch batches (MaxWatchBatch) and guest stats (clamped). Exceeding a bound is an error of class errdefs.ErrProtocol.
//
// After a quiesce, or when the host side of the channel goes away, the guest
// waits for the next hello on the same channel. An end of file read before
// the host sent a session its first byte does not end that session: a
// virtio-serial driver can report the previous host's disconnection after
// the new host's hello. A host that leaves a session idle is replaced by the
// next hello, which breaks it.
package agent

import "time"

// Stream names which output stream a chunk of exec output came from.
type Stream string

// The output streams of a command.
const (
	Stdout Stream = "stdout"
	Stderr Stream = "stderr"
)

// ExecRequest asks the guest to run one command with /bin/sh -lc inside the
// sandbox's root file system.
type ExecRequest struct {
	// Command is run with /bin/sh -lc, or, when Direct, is the program
	// (found in PATH) run with Args and no shell.
	Command string            `json:"command"`
	Args    []string          `json:"args,omitempty"`
	Direct  bool              `json:"direct,omitempty"`
	Env     map[string]string `json:"env,omitempty"`
	Cwd     string            `json:"cwd,omitempty"`  // default "/"
	User    string            `json:"user,omitempty"` // name, uid or uid:gid; default root
	Stdin   []byte            `json:"stdin,omitempty"`
	// Timeout, when positive, makes the guest kill the command's process group
	// after this long; the result then has TimedOut set.
	Timeout time.Duration `json:"timeout,omitempty"`
	// Detach starts the command in the background and returns as soon as it has
	// started (template start commands). Its output is discarded.
	Detach bool `json:"detach,omitempty"`
	// WarmShells makes the guest start its warm login shells (see the
	// agent's warm shells) before it answers, so that a snapshot saved
	// right after has them (template builds).
	WarmShells bool `json:"warm_shells,omitempty"`
}

// ExecResult is how a command ended. A command ended by a signal has
// ExitCode 128+signal (as a shell reports it) and Signal set.
type ExecResult struct {
	ExitCode int    `json:"exit_code"`
	Signal   string `json:"signal,omitempty"` // e.g. "killed" when ended by a signal
	TimedOut bool   `json:"timed_out,omitempty"`
	PID      int    `json:"pid,omitempty"`
}

// InitRequest re-initialises the guest's identity after a boot or a restore.
type InitRequest struct {
	SandboxID string            `json:"sandbox_id"`
	Hostname  string            `json:"hostname"`
	Env       map[string]string `json:"env,omitempty"` // default env for every later exec
	// UnixNano is the host's clock; the guest sets its clock to it.
	UnixNano int64 `json:"unix_nano"`
	// Entropy is mixed into the guest's random pool (and credited).
	Entropy []byte `json:"entropy,omitempty"`
	// KeepEnv keeps the default env the guest has (a resume: the env is
	// in guest memory already); Env is then ignored.
	KeepEnv bool `json:"keep_env,omitempty"`
	// MAC, when set, becomes the hardware address of the guest's first
	// ethernet interface (a fork's own network identity).
	MAC string `json:"mac,omitempty"`
}

// OutputFunc receives exec output as it is produced. It is called from one
// goroutine at a time for a given exec; data is only valid during the call.
type OutputFunc func(stream Stream, data []byte)
