package agent

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// Handshake lines.
const (
	helloPrefix = "FIRKIN/1 HELLO "
	readyPrefix = "FIRKIN/1 READY "
	// maxNonce bounds the nonce in a handshake line.
	maxNonce = 64
)

// MaxFramePayload is the largest frame payload either side sends or accepts.
const MaxFramePayload = 1 << 20

// frameHeaderSize is the size of a frame header: type and length.
const frameHeaderSize = 5

// Frame types.
const (
	frameRequest  byte = 'R' // host→guest: first frame of every stream (JSON request)
	frameOK       byte = 'O' // guest→host: success, optional JSON payload
	frameError    byte = 'E' // guest→host: failure (JSON remoteError)
	frameStdin    byte = '0' // host→guest: stdin bytes
	frameStdinEOF byte = 'c' // host→guest: close the command's stdin
	frameKill     byte = 'k' // host→guest: kill the command's process group
	frameStdout   byte = '1' // guest→host: stdout bytes
	frameStderr   byte = '2' // guest→host: stderr bytes
	frameStarted  byte = 'S' // guest→host: the command started (JSON startedMsg)
	frameExit     byte = 'X' // guest→host: the command ended (JSON ExecResult)
	frameData     byte = 'D' // either way: file content
	frameEOF      byte = 'F' // either way: end of file content
)

// Operations named by a request frame.
const (
	opPing      = "ping"
	opInit      = "init"
	opExec      = "exec"
	opDial      = "dial"
	opQuiesce   = "quiesce"
	opReadFile  = "read_file"
	opWriteFile = "write_file"
	opShutdown  = "shutdown"
)

// request is the JSON payload of the first frame of every stream.
type request struct {
	Op   string       `json:"op"`
	Init *InitRequest `json:"init,omitempty"`
	// Exec carries the command; its Stdin is sent as frames, never inline.
	Exec *ExecRequest `json:"exec,omitempty"`
	Port int          `json:"port,omitempty"`
	Path string       `json:"path,omitempty"`
	Mode uint32       `json:"mode,omitempty"`
	// Proc carries the process operations' arguments (proc.go).
	Proc *procRequest `json:"proc,omitempty"`
	// File operations (fs.go): rename's target, list's depth and the
	// options of mkdir, remove, write and watch.
	To        string `json:"to,omitempty"`
	Depth     int    `json:"depth,omitempty"`
	Recursive bool   `json:"recursive,omitempty"`
	Parents   bool   `json:"parents,omitempty"`
	// User does a file operation as this guest user (as for exec).
	User string `json:"user,omitempty"`
}

// startedMsg is the payload of a frameStarted frame.
type startedMsg struct {
	PID int `json:"pid"`
	// At (proc_wait) is where in the output the frames that follow start.
	At *ProcOffsets `json:"at,omitempty"`
}

// Error codes carried by frameError frames.
const (
	codeInvalid     = "invalid_argument"
	codeNotFound    = "not_found"
	codeUnsupported = "unsupported"
	codeInternal    = "internal"
)

// RemoteError is an error reported by the guest agent. It matches the errdefs
// class for its code with errors.Is.
type RemoteError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// Error returns the guest's message.
func (e *RemoteError) Error() string { return "guest: " + e.Message }

// Unwrap returns the errdefs class of the error.
func (e *RemoteError) Unwrap() error {
	switch e.Code {
	case codeInvalid:
		return errdefs.ErrInvalidArgument
	case codeNotFound:
		return errdefs.ErrNotFound
	case codeUnsupported:
		return errdefs.ErrUnsupported
	default:
		if class := fsCodeClass(e.Code); class != nil {
			return class
		}
		return errdefs.ErrProtocol
	}
}

// remoteErrorOf turns a guest-side error into what goes on the wire.
func remoteErrorOf(err error) *RemoteError {
	var re *RemoteError
	if errors.As(err, &re) {
		return re
	}
	code := codeInternal
	switch {
	case errors.Is(err, errdefs.ErrInvalidArgument):
		code = codeInvalid
	case errors.Is(err, errdefs.ErrNotFound):
		code = codeNotFound
	case errors.Is(err, errdefs.ErrUnsupported):
		code = codeUnsupported
	}
	return &RemoteError{Code: code, Message: err.Error()}
}

// ErrFrameTooLarge is returned for a frame whose payload exceeds MaxFramePayload.
var ErrFrameTooLarge = errors.New("agent: frame too large")

// writeFrame writes one frame. Payloads over MaxFramePayload are refused.
func writeFrame(w io.Writer, typ byte, payload []byte) error {
	if len(payload) > MaxFramePayload {
		return ErrFrameTooLarge
	}
	buf := make([]byte, frameHeaderSize+len(payload))
	buf[0] = typ
	binary.BigEndian.PutUint32(buf[1:frameHeaderSize], uint32(len(payload)))
	copy(buf[frameHeaderSize:], payload)
	_, err := w.Write(buf)
	return err
}

// writeJSONFrame writes v as the JSON payload of a frame.
func writeJSONFrame(w io.Writer, typ byte, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return writeFrame(w, typ, b)
}

// readFrameFrom reads up to len(buf)-frameHeaderSize bytes from r straight
// into buf's payload area and returns the frame of type typ that holds them,
// ready to write, and the payload size (0 when nothing was read).
func readFrameFrom(r io.Reader, typ byte, buf []byte) ([]byte, int, error) {
	limit := min(len(buf)-frameHeaderSize, MaxFramePayload)
	n, err := r.Read(buf[frameHeaderSize : frameHeaderSize+limit])
	buf[0] = typ
	binary.BigEndian.PutUint32(buf[1:frameHeaderSize], uint32(n))
	return buf[:frameHeaderSize+n], n, err
}

// readFrame reads one frame. It returns io.EOF only when the stream ended
// cleanly before a frame started; a frame cut short is io.ErrUnexpectedEOF.
func readFrame(r io.Reader) (typ byte, payload []byte, err error) {
	return readFrameLimit(r, nil)
}

// maxControlPayload bounds the JSON payload of the frames that carry no
// data (request, OK, error, started, exit).
const maxControlPayload = 64 << 10

// frameLimit is the largest payload accepted for a frame type: data frames
// up to MaxFramePayload, control frames up to maxControlPayload.
func frameLimit(typ byte) uint32 {
	switch typ {
	case frameRequest, frameOK, frameError, frameStarted, frameExit:
		return maxControlPayload
	}
	return MaxFramePayload
}

// readFrameLimit reads one frame like readFrame, refusing (before
// allocating) a payload over limit(type) bytes; a nil limit allows
// MaxFramePayload for every type.
func readFrameLimit(r io.Reader, limit func(byte) uint32) (typ byte, payload []byte, err error) {
	var hdr [frameHeaderSize]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	max := uint32(MaxFramePayload)
	if limit != nil {
		max = min(max, limit(hdr[0]))
	}
	if n > max {
		return 0, nil, fmt.Errorf("%w: %q frame of %d bytes (at most %d)", ErrFrameTooLarge, hdr[0], n, max)
	}
	payload = make([]byte, n)
	if _, err := io.ReadFull(r, payload); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	return hdr[0], payload, nil
}

// findHandshake looks for the last complete line in buf that contains prefix
// followed by a valid nonce and a newline. It returns the nonce, the bytes
// after that line, and ok. When there is none, keep says how many trailing
// bytes of buf may still start a handshake line and must be kept.
func findHandshake(buf []byte, prefix string) (nonce string, rest []byte, keep int, ok bool) {
	p := []byte(prefix)
	// Scan every occurrence of prefix; remember the last one that forms a
	// complete, valid line.
	found := -1
	var foundNonce string
	var foundEnd int
	for i := 0; ; {
		j := bytes.Index(buf[i:], p)
		if j < 0 {
			break
		}
		start := i + j
		end := bytes.IndexByte(buf[start+len(p):], '\n')
		if end < 0 {
			if len(buf)-start <= len(p)+maxNonce {
				// An incomplete line at the end: keep from here.
				keep = len(buf) - start
				break
			}
			// Too long to be a handshake line; a later prefix may be.
			i = start + 1
			continue
		}
		n := buf[start+len(p) : start+len(p)+end]
		if validNonce(n) {
			found, foundNonce, foundEnd = start, string(n), start+len(p)+end+1
		}
		i = start + 1
	}
	if found >= 0 {
		return foundNonce, buf[foundEnd:], 0, true
	}
	if keep == 0 {
		// A prefix may be cut at the end of buf.
		keep = min(len(buf), len(p)-1)
	}
	return "", nil, keep, false
}

// validNonce reports whether n is an acceptable handshake nonce:
// 1 to maxNonce ASCII letters, digits, '-' or '_'.
func validNonce(n []byte) bool {
	if len(n) == 0 || len(n) > maxNonce {
		return false
	}
	for _, c := range n {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_':
		default:
			return false
		}
	}
	return true
}

// yamuxConfig is the session configuration for both ends: no keepalives
// (they break across snapshots, when one side is paused), large windows.
func yamuxConfig() *yamux.Config {
	c := yamux.DefaultConfig()
	c.EnableKeepAlive = false
	c.KeepAliveInterval = time.Hour // must be positive even when disabled
	c.MaxStreamWindowSize = 4 << 20
	c.ConnectionWriteTimeout = 30 * time.Second
	c.StreamCloseTimeout = time.Minute
	c.StreamOpenTimeout = time.Minute
	c.LogOutput = io.Discard
	return c
}
