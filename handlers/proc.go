package handlers

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/micro"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// Processes is the runtime's process API (firkin.sandbox.<id>.proc.…). It
// is optional: a runtime without it answers those verbs unsupported.
type Processes interface {
	StartProcess(ctx context.Context, id string, req subjects.ProcStartRequest) (subjects.ProcStartReply, error)
	ListProcesses(ctx context.Context, id string) (subjects.ProcListReply, error)
	ConnectProcess(ctx context.Context, id, cmdID string, req subjects.ProcConnectRequest) (subjects.ProcConnectReply, error)
	ProcessStdin(ctx context.Context, id, cmdID string, data []byte, close bool) (subjects.ProcStdinReply, error)
	SignalProcess(ctx context.Context, id, cmdID string, req subjects.ProcSignalRequest) (subjects.ProcSignalReply, error)
	ResizeProcess(ctx context.Context, id, cmdID string, req subjects.ProcResizeRequest) (subjects.ProcInfo, error)
}

// maxStdinQueue bounds the stdin writes waiting for one process.
const maxStdinQueue = 64

// procVerb answers firkin.sandbox.<id>.proc.… (verb is the part after the id).
func (s *Service) procVerb(ctx context.Context, req micro.Request, id, cmdID, op string) (any, error) {
	rt, ok := s.rt.(Processes)
	if !ok {
		return nil, errdefs.Wrap(errdefs.ErrUnsupported, errors.New("this worker runs no processes"))
	}
	ctx, cancel := context.WithTimeout(ctx, quickTimeout+10*time.Second)
	defer cancel()
	switch op {
	case "start":
		in, err := decode[subjects.ProcStartRequest](req)
		if err != nil {
			return nil, err
		}
		if err := s.checkLiveSubject("output_subject", in.OutputSubject); err != nil {
			return nil, err
		}
		return rt.StartProcess(ctx, id, in)
	case "list":
		if _, err := decode[struct{}](req); err != nil {
			return nil, err
		}
		return rt.ListProcesses(ctx, id)
	case subjects.ProcOpConnect:
		in, err := decode[subjects.ProcConnectRequest](req)
		if err != nil {
			return nil, err
		}
		if err := s.checkLiveSubject("output_subject", in.OutputSubject); err != nil {
			return nil, err
		}
		return rt.ConnectProcess(ctx, id, cmdID, in)
	case subjects.ProcOpStdin:
		data, closeIt, err := decodeStdin(req.Data())
		if err != nil {
			return nil, err
		}
		return rt.ProcessStdin(ctx, id, cmdID, data, closeIt)
	case subjects.ProcOpSignal:
		in, err := decode[subjects.ProcSignalRequest](req)
		if err != nil {
			return nil, err
		}
		return rt.SignalProcess(ctx, id, cmdID, in)
	case subjects.ProcOpResize:
		in, err := decode[subjects.ProcResizeRequest](req)
		if err != nil {
			return nil, err
		}
		return rt.ResizeProcess(ctx, id, cmdID, in)
	}
	return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("unknown process op %q", op))
}

// checkLiveSubject refuses a live output subject outside the clients'
// inboxes: nobody may make the worker publish anywhere else.
func (s *Service) checkLiveSubject(field, subject string) error {
	if subject == "" {
		return nil
	}
	if !s.ReplyAllowed(subject) || strings.ContainsAny(subject, "*> \t\r\n") || len(subject) > 256 {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("%s %q: want a subject under the client inbox prefix (%s), without wildcards", field, cutSubject(subject), strings.Join(s.cfg.ReplyPrefixes, ", ")))
	}
	return nil
}

func cutSubject(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}

// decodeStdin reads a stdin body: a JSON object of subjects.ProcStdinRequest
// (strict), or else the bytes as they are.
func decodeStdin(body []byte) ([]byte, bool, error) {
	trimmed := bytes.TrimSpace(body)
	if len(trimmed) > 0 && trimmed[0] == '{' {
		var in subjects.ProcStdinRequest
		dec := json.NewDecoder(bytes.NewReader(trimmed))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&in); err == nil && !dec.More() {
			if in.Data != "" && len(in.DataB64) > 0 {
				return nil, false, errdefs.Wrap(errdefs.ErrInvalidArgument, errors.New("stdin: data and data_b64 are exclusive"))
			}
			if in.Data != "" {
				return []byte(in.Data), in.Close, nil
			}
			return in.DataB64, in.Close, nil
		}
	}
	return body, false, nil
}

// sandboxEndpoint is the name under which a per-sandbox request is counted
// (Config.Observe): the verb without the command id, so that labels stay few.
// A verb the worker does not answer counts as "sandbox.unknown": the client
// chooses it, and every distinct label is a metric series kept for good.
func sandboxEndpoint(verb string) string {
	if _, op, ok, err := subjects.ParseProcVerb(verb); ok {
		if err != nil {
			return "sandbox.unknown"
		}
		return "sandbox.proc." + op
	}
	if slices.Contains(subjects.SandboxVerbs, verb) || slices.Contains(subjects.FSVerbs, verb) || verb == subjects.VerbMetrics {
		return "sandbox." + verb
	}
	return "sandbox.unknown"
}

// dispatchSandbox runs a per-sandbox request: stdin writes of one process
// one after another in the order they arrived (NATS delivers a
// subscription's messages in order; a goroutine per request would not keep
// it), everything else at once.
func (s *Service) dispatchSandbox(id, verb string, req micro.Request) {
	endpoint := sandboxEndpoint(verb)
	if cmd, op, ok, err := subjects.ParseProcVerb(verb); ok && err == nil && op == subjects.ProcOpStdin {
		s.ordered(id+"."+cmd, endpoint, req)
		return
	}
	s.async(endpoint, s.sandboxVerb)(req)
}

// serialQueues are the per-process stdin queues.
type serialQueues struct {
	mu sync.Mutex
	q  map[string][]micro.Request
}

// ordered queues req behind the others of key and runs the queue in one
// goroutine.
func (s *Service) ordered(key, endpoint string, req micro.Request) {
	// A queued write holds a slot of MaxInFlight until it is answered, as
	// any other request does: queues of many processes are bounded together.
	start, ok := s.admit(endpoint, req)
	if !ok {
		return
	}
	req = s.detach(req)
	s.serial.mu.Lock()
	if s.serial.q == nil {
		s.serial.q = map[string][]micro.Request{}
	}
	q, running := s.serial.q[key]
	if len(q) >= maxStdinQueue {
		s.serial.mu.Unlock()
		<-s.sem
		err := capacityError(fmt.Sprintf("%d stdin writes of this process are waiting", maxStdinQueue))
		s.reply(req, nil, err)
		s.observe(endpoint, err, start)
		return
	}
	s.serial.q[key] = append(q, req)
	s.serial.mu.Unlock()
	if running {
		return
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			s.serial.mu.Lock()
			q := s.serial.q[key]
			if len(q) == 0 {
				delete(s.serial.q, key)
				s.serial.mu.Unlock()
				return
			}
			next := q[0]
			s.serial.q[key] = q[1:]
			s.serial.mu.Unlock()
			s.runNow(endpoint, next)
			<-s.sem
		}
	}()
}

// runNow answers one per-sandbox request in this goroutine.
func (s *Service) runNow(endpoint string, req micro.Request) {
	start := time.Now()
	var v any
	var err error
	defer func() {
		if p := recover(); p != nil {
			v, err = nil, fmt.Errorf("internal error: %v", p)
		}
		s.reply(req, v, err)
		s.observe(endpoint, err, start)
	}()
	v, err = s.sandboxVerb(s.ctx, req)
}
