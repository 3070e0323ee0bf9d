package backend

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/firkin-dev/firkin-worker/agent"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// Exec runs a command in a sandbox. Output is published to the sandbox's log
// stream as it is produced and the reply carries up to ReplyOutputCap bytes of
// each stream. A command that outlives its timeout is killed and the call
// fails with errdefs.ErrTimeout.
func (b *Backend) Exec(ctx context.Context, id string, req subjects.ExecRequest) (subjects.ExecReply, error) {
	if req.Command == "" {
		return subjects.ExecReply{}, invalid("command is required")
	}
	timeout := b.cfg.ExecDefaultTimeout
	if req.TimeoutMS < 0 || time.Duration(req.TimeoutMS)*time.Millisecond > b.cfg.ExecMaxTimeout {
		return subjects.ExecReply{}, invalid("timeout_ms %d: want 0..%d", req.TimeoutMS, b.cfg.ExecMaxTimeout.Milliseconds())
	} else if req.TimeoutMS > 0 {
		timeout = time.Duration(req.TimeoutMS) * time.Millisecond
	}
	s, err := b.lookup(id)
	if err != nil {
		return subjects.ExecReply{}, err
	}
	cmdID := NewID(12)
	logs := b.cfg.Store.Logs(id)
	out := newOutputCollector(b.cfg.ReplyOutputCap, func(stream agent.Stream, data []byte) {
		logs.Publish(subjects.NewLogEvent(string(stream), id, cmdID, data))
	})

	// The guest kills the command at timeout; the host waits a little longer
	// so the guest's answer (with TimedOut) normally arrives first.
	ctx, cancel := context.WithTimeout(ctx, timeout+5*time.Second)
	defer cancel()
	start := time.Now()
	res, err := s.machine.Exec(ctx, agent.ExecRequest{
		Command: req.Command,
		Env:     req.Env,
		Cwd:     req.Cwd,
		User:    req.User,
		Stdin:   []byte(req.Stdin),
		Timeout: timeout,
	}, out.write)
	elapsed := time.Since(start)
	flushCtx, flushCancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer flushCancel()
	if ferr := logs.Flush(flushCtx); ferr != nil {
		b.log.Warn("flush exec logs", "sandbox", id, "command", cmdID, "err", ferr)
	}
	switch {
	case errors.Is(err, context.DeadlineExceeded) || (err == nil && res.TimedOut):
		return subjects.ExecReply{}, errdefs.Wrap(errdefs.ErrTimeout, fmt.Errorf("command %s timed out after %s and was killed (output so far is in the log stream)", cmdID, timeout))
	case err != nil:
		return subjects.ExecReply{}, fmt.Errorf("exec in sandbox %s: %w", id, err)
	}
	reply := subjects.ExecReply{ExitCode: res.ExitCode, Signal: res.Signal, DurationMS: elapsed.Milliseconds(), CommandID: cmdID}
	reply.Truncated = out.truncated
	reply.Stdout, reply.StdoutB64 = encodeOutput(out.stdout, out.truncated)
	reply.Stderr, reply.StderrB64 = encodeOutput(out.stderr, out.truncated)
	return reply, nil
}

// outputCollector keeps the first cap bytes of each stream for the reply and
// forwards every chunk to the log stream.
type outputCollector struct {
	mu             sync.Mutex
	cap            int
	stdout, stderr []byte
	truncated      bool
	forward        agent.OutputFunc
}

func newOutputCollector(cap int, forward agent.OutputFunc) *outputCollector {
	return &outputCollector{cap: cap, forward: forward}
}

func (c *outputCollector) write(stream agent.Stream, data []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	buf := &c.stdout
	if stream == agent.Stderr {
		buf = &c.stderr
	}
	room := c.cap - len(*buf)
	if room < len(data) {
		c.truncated = true
	}
	if room > 0 {
		*buf = append(*buf, data[:min(room, len(data))]...)
	}
	c.forward(stream, data)
}

// encodeOutput returns the output as text, or as base64 when it is not valid
// UTF-8. When the reply cap cut the last rune in two, the partial rune is
// dropped rather than turning the whole output into base64.
func encodeOutput(b []byte, truncated bool) (text, b64 string) {
	if utf8.Valid(b) {
		return string(b), ""
	}
	for cut := 1; truncated && cut <= 3 && cut < len(b); cut++ {
		if head := b[:len(b)-cut]; utf8.Valid(head) && !utf8.FullRune(b[len(b)-cut:]) {
			return string(head), ""
		}
	}
	return "", base64.StdEncoding.EncodeToString(b)
}
