package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// Process operations. Processes live in the guest's process table, not in a
// stream or a session: they outlive the request that started them, the
// session (a snapshot's quiesce) and the host (a restarted worker).
//
//	proc_start   R{op, proc:{id, start}}                 → O{pid} | E
//	proc_wait    R{op, proc:{id}}                         → S (1|2)* X | E
//	proc_stdin   R{op, proc:{id, close}} D* F             → O{written} | E
//	proc_signal  R{op, proc:{id, signal}}                 → O | E
//	proc_resize  R{op, proc:{id, cols, rows}}             → O | E
//	proc_list    R{op}                                    → D* O (one ProcInfo per D)
//
// Output waits in the guest (the process blocks on a full pipe) until a
// proc_wait stream takes it. One waiter at a time: a new proc_wait replaces
// the old one, whose stream then ends. A chunk whose write to a broken
// waiter failed goes to the next waiter, so a session that ends (quiesce,
// lost host) loses no output. X comes after the last output.
const (
	opProcStart  = "proc_start"
	opProcWait   = "proc_wait"
	opProcStdin  = "proc_stdin"
	opProcSignal = "proc_signal"
	opProcResize = "proc_resize"
	opProcList   = "proc_list"
)

// Bounds of the process table and of what the host reads about it.
const (
	// MaxProcs bounds the guest's process table (running and exited).
	MaxProcs = 128
	// maxRunningProcs bounds the processes running at once.
	maxRunningProcs = 64
	// maxProcID bounds a process id (the host's command id).
	maxProcID = 32
	// maxProcInfoField bounds the command and tag in a ProcInfo.
	maxProcInfoField = 4 << 10
	// stdinChunk is the largest data frame of a proc_stdin stream.
	stdinChunk = 64 << 10
)

// ProcStartRequest starts a process in the guest's process table.
type ProcStartRequest struct {
	// ID names the process (the host's command id): 1..32 of [a-z0-9].
	ID string `json:"id"`
	// Command is run with /bin/sh -lc, or, with Args, as the program
	// (found in PATH) with those arguments.
	Command string            `json:"command"`
	Args    []string          `json:"args,omitempty"`
	Env     map[string]string `json:"env,omitempty"`
	Cwd     string            `json:"cwd,omitempty"`
	User    string            `json:"user,omitempty"`
	// Timeout, when positive, kills the process group after this long.
	Timeout time.Duration `json:"timeout,omitempty"`
	// PTY, when set, runs the process on a new terminal of this size
	// (its session leader and controlling terminal); output is stdout.
	PTY *PTYSize `json:"pty,omitempty"`
	Tag string   `json:"tag,omitempty"`
}

// PTYSize is a terminal's size in characters.
type PTYSize struct {
	Cols uint16 `json:"cols"`
	Rows uint16 `json:"rows"`
}

// ProcInfo is one entry of the guest's process table.
type ProcInfo struct {
	ID        string      `json:"id"`
	PID       int         `json:"pid"`
	Command   string      `json:"command"`
	Tag       string      `json:"tag,omitempty"`
	PTY       bool        `json:"pty,omitempty"`
	StartedAt time.Time   `json:"started_at"`
	Running   bool        `json:"running"`
	Exit      *ExecResult `json:"exit,omitempty"`
}

// procRequest is the proc member of a request frame.
type procRequest struct {
	ID     string            `json:"id,omitempty"`
	Start  *ProcStartRequest `json:"start,omitempty"`
	Signal string            `json:"signal,omitempty"`
	Cols   uint16            `json:"cols,omitempty"`
	Rows   uint16            `json:"rows,omitempty"`
	Close  bool              `json:"close,omitempty"`
	// From (proc_wait) is how much output the host has: what it lacks of
	// the output the guest still keeps is sent again.
	From *ProcOffsets `json:"from,omitempty"`
}

// ProcOffsets counts a process's output bytes per stream.
type ProcOffsets struct {
	Stdout int64 `json:"stdout"`
	Stderr int64 `json:"stderr"`
}

// ProcCursor is how much of a process's output a host has had. The zero
// value knows nothing yet: the first wait takes the output from where the
// guest is and learns where that is.
type ProcCursor struct {
	ProcOffsets
	Known bool
	// Lost counts bytes a wait found gone: the guest no longer kept them
	// (its retention is bounded) when the cursor asked for them again.
	Lost int64
}

// procStdinReply is the O payload of proc_stdin.
type procStdinReply struct {
	Written int `json:"written"`
}

// validProcID reports whether id is 1..maxProcID of [a-z0-9].
func validProcID(id string) bool {
	if id == "" || len(id) > maxProcID {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

// procSignals are the signals proc_signal sends, by name.
var procSignals = map[string]int{
	"HUP": 1, "INT": 2, "QUIT": 3, "KILL": 9, "USR1": 10, "USR2": 12, "PIPE": 13,
	"ALRM": 14, "TERM": 15, "CONT": 18, "STOP": 19, "TSTP": 20, "WINCH": 28,
}

// ProcStart starts a process in the guest's process table and returns its
// pid. The process is not tied to this session: read its output and exit
// with ProcWait.
func (c *Client) ProcStart(ctx context.Context, req ProcStartRequest) (int, error) {
	if !validProcID(req.ID) {
		return 0, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("agent: proc_start: bad id %q", req.ID))
	}
	reply, err := c.call(ctx, request{Op: opProcStart, Proc: &procRequest{ID: req.ID, Start: &req}}, nil)
	if err != nil {
		return 0, err
	}
	var m startedMsg
	if err := json.Unmarshal(reply, &m); err != nil || m.PID <= 0 {
		return 0, protocolError("agent: proc_start: bad reply %q", cutText(reply))
	}
	return m.PID, nil
}

// ProcWait takes the output of process id (to out, from one goroutine, in
// order) until it exits, and returns how it ended. Output the process made
// while nobody waited comes first. When ctx ends, ProcWait returns ctx's
// error and the process goes on; output not yet taken waits for the next
// ProcWait. Only one ProcWait per process is served at a time: a new one
// ends an older one (which then fails with errdefs.ErrProtocol).
func (c *Client) ProcWait(ctx context.Context, id string, out OutputFunc) (ExecResult, error) {
	return c.ProcWaitFrom(ctx, id, nil, out)
}

// ProcWaitFrom is ProcWait that keeps cur, the caller's place in the
// output, across waits: each wait moves it by what it passes to out, and a
// wait with a known cursor first gets again what the caller lacks of the
// output the guest still keeps (the last 2 MiB sent), such as frames in
// flight when an earlier wait broke. A nil cur is ProcWait.
func (c *Client) ProcWaitFrom(ctx context.Context, id string, cur *ProcCursor, out OutputFunc) (ExecResult, error) {
	req := &procRequest{ID: id}
	if cur != nil && cur.Known {
		from := cur.ProcOffsets
		req.From = &from
	}
	st, stop, err := c.open(ctx, request{Op: opProcWait, Proc: req})
	if err != nil {
		return ExecResult{}, err
	}
	defer stop()
	defer st.Close()
	var res ExecResult
	for {
		typ, payload, err := readFrameLimit(st, frameLimit)
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return res, c.sessionError("agent: proc_wait", ctx, err)
		}
		switch typ {
		case frameStdout, frameStderr:
			s := Stdout
			if typ == frameStderr {
				s = Stderr
			}
			if cur != nil {
				if s == Stderr {
					cur.Stderr += int64(len(payload))
				} else {
					cur.Stdout += int64(len(payload))
				}
			}
			if out != nil {
				out(s, payload)
			}
		case frameStarted:
			var m startedMsg
			if err := json.Unmarshal(payload, &m); err == nil {
				res.PID = m.PID
				if cur != nil && m.At != nil && m.At.Stdout >= 0 && m.At.Stderr >= 0 {
					if cur.Known {
						cur.Lost += max(m.At.Stdout-cur.Stdout, 0) + max(m.At.Stderr-cur.Stderr, 0)
					}
					cur.ProcOffsets, cur.Known = *m.At, true
				}
			}
		case frameExit:
			pid := res.PID
			if err := json.Unmarshal(payload, &res); err != nil {
				return res, protocolError("agent: proc_wait: bad exit frame: %w", err)
			}
			if len(res.Signal) > maxSignalName {
				return ExecResult{}, protocolError("agent: proc_wait: signal name longer than %d bytes", maxSignalName)
			}
			if res.PID == 0 {
				res.PID = pid
			}
			return res, nil
		case frameError:
			return res, c.sessionError("agent: proc_wait", ctx, decodeRemoteError(payload))
		default:
			return res, protocolError("agent: proc_wait: unexpected frame %q", typ)
		}
	}
}

// ProcStdin writes data to the stdin of process id (its terminal, for a
// PTY) and, when close is set, closes it afterwards (a PTY gets an EOF
// character, ^D, instead). It returns once the guest wrote the bytes; a
// process that does not read stdin makes it fail after a while (the guest
// gives up a write after 30 s).
func (c *Client) ProcStdin(ctx context.Context, id string, data []byte, close bool) (int, error) {
	st, stop, err := c.open(ctx, request{Op: opProcStdin, Proc: &procRequest{ID: id, Close: close}})
	if err != nil {
		return 0, err
	}
	defer stop()
	defer st.Close()
	var wmu sync.Mutex
	send := func(typ byte, p []byte) error {
		wmu.Lock()
		defer wmu.Unlock()
		return writeFrame(st, typ, p)
	}
	sent := make(chan error, 1)
	go func() {
		for rest := data; len(rest) > 0; {
			n := min(len(rest), stdinChunk)
			if err := send(frameData, rest[:n]); err != nil {
				sent <- err
				return
			}
			rest = rest[n:]
		}
		sent <- send(frameEOF, nil)
	}()
	reply, rerr := readReply(st, nil)
	if rerr != nil {
		return 0, c.sessionError("agent: proc_stdin", ctx, rerr)
	}
	if err := <-sent; err != nil {
		return 0, c.sessionError("agent: proc_stdin", ctx, err)
	}
	var r procStdinReply
	if err := json.Unmarshal(reply, &r); err != nil || r.Written < 0 || r.Written > len(data) {
		return 0, protocolError("agent: proc_stdin: bad reply %q", cutText(reply))
	}
	return r.Written, nil
}

// ProcSignal sends a signal (a name: TERM, KILL, INT, …) to the process
// group of process id.
func (c *Client) ProcSignal(ctx context.Context, id, signal string) error {
	if _, ok := procSignals[signal]; !ok {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("agent: proc_signal: unknown signal %q", signal))
	}
	_, err := c.call(ctx, request{Op: opProcSignal, Proc: &procRequest{ID: id, Signal: signal}}, nil)
	return err
}

// ProcResize sets the terminal size of process id (a PTY process).
func (c *Client) ProcResize(ctx context.Context, id string, size PTYSize) error {
	_, err := c.call(ctx, request{Op: opProcResize, Proc: &procRequest{ID: id, Cols: size.Cols, Rows: size.Rows}}, nil)
	return err
}

// ProcList returns the guest's process table (at most MaxProcs entries,
// each bounded).
func (c *Client) ProcList(ctx context.Context) ([]ProcInfo, error) {
	var list []ProcInfo
	_, err := c.call(ctx, request{Op: opProcList}, func(b []byte) error {
		if len(list) >= MaxProcs {
			return protocolError("agent: proc_list: more than %d processes", MaxProcs)
		}
		if len(b) > maxControlPayload {
			return protocolError("agent: proc_list: entry of %d bytes", len(b))
		}
		var pi ProcInfo
		if err := json.Unmarshal(b, &pi); err != nil {
			return protocolError("agent: proc_list: bad entry: %w", err)
		}
		if !validProcID(pi.ID) || len(pi.Command) > maxProcInfoField || len(pi.Tag) > maxProcInfoField ||
			(pi.Exit != nil && len(pi.Exit.Signal) > maxSignalName) {
			return protocolError("agent: proc_list: entry out of bounds")
		}
		list = append(list, pi)
		return nil
	})
	return list, err
}

// cutText is b as text for an error message, cut to 64 bytes.
func cutText(b []byte) string {
	if len(b) > 64 {
		b = b[:64]
	}
	if !utf8.Valid(b) {
		return fmt.Sprintf("%x", b)
	}
	return string(b)
}
