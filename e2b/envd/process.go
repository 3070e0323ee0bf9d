package envd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"connectrpc.com/connect"
	"github.com/nats-io/nats.go"

	pb "github.com/firkin-dev/firkin-worker/e2b/envd/gen/process"
	"github.com/firkin-dev/firkin-worker/e2b/envd/gen/process/processconnect"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// Bounds of the process service.
const (
	// outputBuffer bounds the live output messages a stream holds for a
	// slow client (each at most subjects.MaxLiveChunk: 16 MiB a stream,
	// and a sandbox has at most the proxy's 64 requests in flight); beyond
	// it NATS drops messages for this subscriber (the stored copy in
	// FIRKIN_LOGS keeps them). A channel subscription takes no pending
	// limits (nats.go refuses SetPendingLimits on it): the channel's
	// capacity is the only bound. It was 1024 (64 MiB a stream, 4 GiB a
	// sandbox whose client held 64 streams of a noisy process unread).
	outputBuffer = 256
	// maxStreamBuffer is what one stream's buffer may hold at most.
	maxStreamBuffer = 16 << 20
	// exitPoll is how often a stream with no output checks whether its
	// process ended (in case the exit message was dropped).
	exitPoll = 5 * time.Second
	// maxInputBytes bounds one input message.
	maxInputBytes = 1 << 20
	// maxLifetime is the longest process lifetime proc.start takes with
	// background (the worker's bound on timeouts, 24 h); a longer one
	// asked for runs the process without one.
	maxLifetime = 24 * time.Hour
)

// lifetimeMS is proc.start's timeout_ms of a Start whose context ends at
// deadline: envd makes the request's timeout (the SDK's timeoutMs, sent as
// Connect-Timeout-Ms) the process's lifetime and kills it then, whether or
// not the client still follows it; no deadline (timeoutMs 0) is no limit.
func lifetimeMS(deadline time.Time, ok bool, now time.Time) int {
	if !ok {
		return 0
	}
	d := deadline.Sub(now)
	if d > maxLifetime {
		return 0
	}
	return int(max(d.Milliseconds(), 1))
}

// bashWrapper runs the SDK's /bin/bash where the guest has one, else
// /bin/sh with the same arguments (firkin's images are busybox).
const bashWrapper = `[ -x /bin/bash ] && exec /bin/bash "$@"; exec /bin/sh "$@"`

type processService struct{ s *Server }

var _ processconnect.ProcessHandler = (*processService)(nil)

// startRequest translates the SDK's Start to proc.start.
func startRequest(req *pb.StartRequest, user string) (subjects.ProcStartRequest, error) {
	p := req.GetProcess()
	if p == nil || p.GetCmd() == "" {
		return subjects.ProcStartRequest{}, connect.NewError(connect.CodeInvalidArgument, errors.New("process.cmd is required"))
	}
	out := subjects.ProcStartRequest{Command: p.GetCmd(), Args: p.GetArgs(), Env: p.GetEnvs(), User: user, Tag: req.GetTag(), Background: true}
	if out.Args == nil {
		out.Args = []string{}
	}
	if p.GetCmd() == "/bin/bash" || p.GetCmd() == "bash" {
		out.Command, out.Args = "/bin/sh", append([]string{"-c", bashWrapper, "sh"}, p.GetArgs()...)
	}
	if p.Cwd != nil {
		cwd, err := guestPath(p.GetCwd(), user)
		if err != nil {
			return out, connect.NewError(connect.CodeInvalidArgument, err)
		}
		out.Cwd = cwd
	} else {
		out.Cwd = homeOf(user)
	}
	if req.Pty != nil {
		sz := req.GetPty().GetSize()
		out.PTY = &subjects.PTYSize{Cols: int(sz.GetCols()), Rows: int(sz.GetRows())}
		if err := out.PTY.Validate(); err != nil {
			return out, connect.NewError(connect.CodeInvalidArgument, err)
		}
	}
	return out, nil
}

// unwrapCommand undoes the bash wrapper for List.
func unwrapCommand(cmd string, args []string) (string, []string) {
	if cmd == "/bin/sh" && len(args) >= 3 && args[0] == "-c" && args[1] == bashWrapper {
		return "/bin/bash", args[3:]
	}
	return cmd, args
}

// Start starts a process and streams its start, output and end.
func (p *processService) Start(ctx context.Context, req *connect.Request[pb.StartRequest], stream *connect.ServerStream[pb.StartResponse]) error {
	user, err := p.s.connectUser(req.Header())
	if err != nil {
		return err
	}
	preq, err := startRequest(req.Msg, user)
	if err != nil {
		return err
	}
	dl, ok := ctx.Deadline()
	preq.TimeoutMS = lifetimeMS(dl, ok, time.Now())
	id := sandboxOf(ctx)
	out, err := p.s.subscribeOutput()
	if err != nil {
		return connectError(err)
	}
	defer out.close()
	preq.OutputSubject = out.subject
	// A bare proc.start: the output comes live on our subject, so the
	// client's look-up of the log stream is not needed.
	var r subjects.ProcStartReply
	if err := p.s.cfg.Client.Request(ctx, p.s.subjects().Sandbox(id, subjects.VerbProcStart), preq, &r); err != nil {
		return connectError(err)
	}
	if subjects.ValidateCommandID(r.CommandID) != nil {
		return connect.NewError(connect.CodeInternal, errors.New("proc.start: bad command id in the reply"))
	}
	if req.Msg.Stdin != nil && !req.Msg.GetStdin() && preq.PTY == nil {
		if err := p.s.closeStdin(ctx, id, r.CommandID); err != nil {
			p.s.log.Debug("close stdin", "sandbox", id, "err", err)
		}
	}
	send := func(ev *pb.ProcessEvent) error { return stream.Send(&pb.StartResponse{Event: ev}) }
	return p.s.follow(ctx, id, r.CommandID, r.PID, preq.PTY != nil, nil, out, keepaliveEvery(req.Header()), send)
}

// Connect streams a running process's output from now on and its end.
func (p *processService) Connect(ctx context.Context, req *connect.Request[pb.ConnectRequest], stream *connect.ServerStream[pb.ConnectResponse]) error {
	id := sandboxOf(ctx)
	info, err := p.s.findProcess(ctx, id, req.Msg.GetProcess())
	if err != nil {
		return err
	}
	out, err := p.s.subscribeOutput()
	if err != nil {
		return connectError(err)
	}
	defer out.close()
	var r subjects.ProcConnectReply
	verb := subjects.ProcVerb(info.CommandID, subjects.ProcOpConnect)
	if err := p.s.cfg.Client.Request(ctx, p.s.subjects().Sandbox(id, verb), subjects.ProcConnectRequest{OutputSubject: out.subject}, &r); err != nil {
		return connectError(err)
	}
	send := func(ev *pb.ProcessEvent) error { return stream.Send(&pb.ConnectResponse{Event: ev}) }
	return p.s.follow(ctx, id, info.CommandID, r.PID, r.PTY, r.Exit, out, keepaliveEvery(req.Header()), send)
}

// List lists the running processes.
func (p *processService) List(ctx context.Context, _ *connect.Request[pb.ListRequest]) (*connect.Response[pb.ListResponse], error) {
	list, err := p.s.cfg.Client.ListProcesses(ctx, sandboxOf(ctx))
	if err != nil {
		return nil, connectError(err)
	}
	res := &pb.ListResponse{}
	for _, info := range list {
		if info.State != "running" {
			continue
		}
		cmd, args := unwrapCommand(info.Command, info.Args)
		pi := &pb.ProcessInfo{Config: &pb.ProcessConfig{Cmd: cmd, Args: args, Envs: map[string]string{}}, Pid: uint32(info.PID)}
		if info.Tag != "" {
			pi.Tag = &info.Tag
		}
		res.Processes = append(res.Processes, pi)
	}
	return connect.NewResponse(res), nil
}

// Update resizes a process's PTY.
func (p *processService) Update(ctx context.Context, req *connect.Request[pb.UpdateRequest]) (*connect.Response[pb.UpdateResponse], error) {
	id := sandboxOf(ctx)
	info, err := p.s.findRunning(ctx, id, req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	if req.Msg.Pty != nil {
		sz := req.Msg.GetPty().GetSize()
		rs := subjects.ProcResizeRequest{Cols: int(sz.GetCols()), Rows: int(sz.GetRows())}
		verb := subjects.ProcVerb(info.CommandID, subjects.ProcOpResize)
		if err := p.s.cfg.Client.Request(ctx, p.s.subjects().Sandbox(id, verb), rs, nil); err != nil {
			return nil, p.s.processError(ctx, id, info.CommandID, err)
		}
	}
	return connect.NewResponse(&pb.UpdateResponse{}), nil
}

// SendInput writes to a process's stdin (or its PTY).
func (p *processService) SendInput(ctx context.Context, req *connect.Request[pb.SendInputRequest]) (*connect.Response[pb.SendInputResponse], error) {
	id := sandboxOf(ctx)
	info, err := p.s.findRunning(ctx, id, req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	if err := p.s.writeInput(ctx, id, info.CommandID, req.Msg.GetInput()); err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.SendInputResponse{}), nil
}

// StreamInput writes a stream of inputs, in order, to one process.
func (p *processService) StreamInput(ctx context.Context, stream *connect.ClientStream[pb.StreamInputRequest]) (*connect.Response[pb.StreamInputResponse], error) {
	id := sandboxOf(ctx)
	cmd := ""
	for stream.Receive() {
		m := stream.Msg()
		switch ev := m.GetEvent().(type) {
		case *pb.StreamInputRequest_Start:
			if cmd != "" {
				return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("a second start event"))
			}
			info, err := p.s.findRunning(ctx, id, ev.Start.GetProcess())
			if err != nil {
				return nil, err
			}
			cmd = info.CommandID
		case *pb.StreamInputRequest_Data:
			if cmd == "" {
				return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("data before the start event"))
			}
			if err := p.s.writeInput(ctx, id, cmd, ev.Data.GetInput()); err != nil {
				return nil, err
			}
		}
	}
	if err := stream.Err(); err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.StreamInputResponse{}), nil
}

// SendSignal signals a process (SIGTERM or SIGKILL).
func (p *processService) SendSignal(ctx context.Context, req *connect.Request[pb.SendSignalRequest]) (*connect.Response[pb.SendSignalResponse], error) {
	id := sandboxOf(ctx)
	sig := ""
	switch req.Msg.GetSignal() {
	case pb.Signal_SIGNAL_SIGTERM:
		sig = "TERM"
	case pb.Signal_SIGNAL_SIGKILL:
		sig = "KILL"
	default:
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("signal: want SIGTERM or SIGKILL"))
	}
	info, err := p.s.findRunning(ctx, id, req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	verb := subjects.ProcVerb(info.CommandID, subjects.ProcOpSignal)
	if err := p.s.cfg.Client.Request(ctx, p.s.subjects().Sandbox(id, verb), subjects.ProcSignalRequest{Signal: sig}, nil); err != nil {
		return nil, p.s.processError(ctx, id, info.CommandID, err)
	}
	return connect.NewResponse(&pb.SendSignalResponse{}), nil
}

// CloseStdin closes a process's stdin.
func (p *processService) CloseStdin(ctx context.Context, req *connect.Request[pb.CloseStdinRequest]) (*connect.Response[pb.CloseStdinResponse], error) {
	id := sandboxOf(ctx)
	info, err := p.s.findRunning(ctx, id, req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	if err := p.s.closeStdin(ctx, id, info.CommandID); err != nil {
		return nil, p.s.processError(ctx, id, info.CommandID, err)
	}
	return connect.NewResponse(&pb.CloseStdinResponse{}), nil
}

// subjects are the subjects of the client's prefix.
func (s *Server) subjects() subjects.Subjects { return s.cfg.Client.Subjects() }

// closeStdin closes a process's stdin.
func (s *Server) closeStdin(ctx context.Context, id, cmd string) error {
	verb := subjects.ProcVerb(cmd, subjects.ProcOpStdin)
	return s.cfg.Client.Request(ctx, s.subjects().Sandbox(id, verb), subjects.ProcStdinRequest{Close: true}, nil)
}

// writeInput writes one input to a process.
func (s *Server) writeInput(ctx context.Context, id, cmd string, in *pb.ProcessInput) error {
	var data []byte
	switch v := in.GetInput().(type) {
	case *pb.ProcessInput_Stdin:
		data = v.Stdin
	case *pb.ProcessInput_Pty:
		data = v.Pty
	}
	if len(data) > maxInputBytes {
		return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("input of %d bytes: at most %d", len(data), maxInputBytes))
	}
	for len(data) > 0 {
		n := min(len(data), 64<<10)
		var r subjects.ProcStdinReply
		verb := subjects.ProcVerb(cmd, subjects.ProcOpStdin)
		if err := s.cfg.Client.Request(ctx, s.subjects().Sandbox(id, verb), subjects.ProcStdinRequest{DataB64: data[:n]}, &r); err != nil {
			return s.processError(ctx, id, cmd, err)
		}
		data = data[n:]
	}
	return nil
}

// findRunning is findProcess of a running process: envd forgets a
// process when it ends, so signalling, writing to or resizing an ended one
// is NotFound (the SDK's kill then answers false).
func (s *Server) findRunning(ctx context.Context, id string, sel *pb.ProcessSelector) (subjects.ProcInfo, error) {
	info, err := s.findProcess(ctx, id, sel)
	if err == nil && info.State != "running" {
		return info, connect.NewError(connect.CodeNotFound, fmt.Errorf("process with pid %d has ended", info.PID))
	}
	return info, err
}

// processError is the Connect error of a failed request to process cmd:
// NotFound when the process ended since it was looked up (the guest
// refuses a request to an ended process as invalid), else connectError.
func (s *Server) processError(ctx context.Context, id, cmd string, err error) error {
	if codeOf(err) != subjects.CodeInvalidRequest {
		return connectError(err)
	}
	list, lerr := s.cfg.Client.ListProcesses(ctx, id)
	if lerr != nil {
		return connectError(err)
	}
	for _, info := range list {
		if info.CommandID == cmd && info.State != "running" {
			return connect.NewError(connect.CodeNotFound, fmt.Errorf("process with pid %d has ended", info.PID))
		}
	}
	return connectError(err)
}

// findProcess finds the process a selector names: by pid (a running one
// first) or by tag.
func (s *Server) findProcess(ctx context.Context, id string, sel *pb.ProcessSelector) (subjects.ProcInfo, error) {
	if sel == nil || sel.GetSelector() == nil {
		return subjects.ProcInfo{}, connect.NewError(connect.CodeInvalidArgument, errors.New("process selector is required"))
	}
	list, err := s.cfg.Client.ListProcesses(ctx, id)
	if err != nil {
		return subjects.ProcInfo{}, connectError(err)
	}
	var found *subjects.ProcInfo
	for i := range list {
		info := &list[i]
		match := false
		switch v := sel.GetSelector().(type) {
		case *pb.ProcessSelector_Pid:
			match = uint32(info.PID) == v.Pid
		case *pb.ProcessSelector_Tag:
			match = info.Tag != "" && info.Tag == v.Tag
		}
		if match && (found == nil || info.State == "running") {
			found = info
		}
	}
	if found == nil {
		what := ""
		switch v := sel.GetSelector().(type) {
		case *pb.ProcessSelector_Pid:
			what = "pid " + strconv.FormatUint(uint64(v.Pid), 10)
		case *pb.ProcessSelector_Tag:
			what = "tag " + strconv.Quote(v.Tag)
		}
		return subjects.ProcInfo{}, connect.NewError(connect.CodeNotFound, fmt.Errorf("process with %s not found", what))
	}
	return *found, nil
}

// output is a subscription to live process output on an inbox of the
// client's connection.
type output struct {
	subject string
	sub     *nats.Subscription
	ch      chan *nats.Msg
}

func (o *output) close() { _ = o.sub.Unsubscribe() }

// subscribeOutput subscribes to a new inbox for a process's live output.
func (s *Server) subscribeOutput() (*output, error) {
	nc := s.cfg.Client.Conn()
	o := &output{subject: nc.NewInbox(), ch: make(chan *nats.Msg, outputBuffer)}
	sub, err := nc.ChanSubscribe(o.subject, o.ch)
	if err != nil {
		return nil, fmt.Errorf("subscribe to output: %w", err)
	}
	o.sub = sub
	return o, nil
}

// follow sends the start event, then the output and the end of a process
// until it ends or the client goes, with keepalives between.
func (s *Server) follow(ctx context.Context, id, cmd string, pid int, pty bool, exited *subjects.ProcExit, out *output,
	keepalive time.Duration, send func(*pb.ProcessEvent) error) error {
	if err := send(&pb.ProcessEvent{Event: &pb.ProcessEvent_Start{Start: &pb.ProcessEvent_StartEvent{Pid: uint32(pid)}}}); err != nil {
		return err
	}
	if exited != nil {
		return send(endEvent(*exited))
	}
	ka := time.NewTicker(keepalive)
	defer ka.Stop()
	poll := time.NewTicker(exitPoll)
	defer poll.Stop()
	var lastSeen time.Time
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case m := <-out.ch:
			lastSeen = time.Now()
			switch m.Header.Get("Firkin-Proc-Stream") {
			case "exit":
				var ex subjects.ProcExit
				if err := json.Unmarshal(m.Data, &ex); err != nil {
					return connect.NewError(connect.CodeInternal, fmt.Errorf("bad exit message: %w", err))
				}
				return send(endEvent(ex))
			case "stderr":
				if err := send(dataEvent(m.Data, false, pty)); err != nil {
					return err
				}
			case "stdout":
				if err := send(dataEvent(m.Data, true, pty)); err != nil {
					return err
				}
			}
		case <-ka.C:
			if err := send(&pb.ProcessEvent{Event: &pb.ProcessEvent_Keepalive{Keepalive: &pb.ProcessEvent_KeepAlive{}}}); err != nil {
				return err
			}
		case <-poll.C:
			// The live exit message may have been dropped: the process
			// table knows. Output still in flight gets a poll's time.
			if time.Since(lastSeen) < exitPoll {
				continue
			}
			list, err := s.cfg.Client.ListProcesses(ctx, id)
			if err != nil {
				if codeOf(err) == subjects.CodeSandboxNotFound {
					return connect.NewError(connect.CodeUnavailable, err)
				}
				continue
			}
			for _, info := range list {
				if info.CommandID == cmd && info.State != "running" && info.Exit != nil {
					return send(endEvent(*info.Exit))
				}
			}
		}
	}
}

func dataEvent(b []byte, stdout, pty bool) *pb.ProcessEvent {
	d := &pb.ProcessEvent_DataEvent{}
	switch {
	case pty:
		d.Output = &pb.ProcessEvent_DataEvent_Pty{Pty: b}
	case stdout:
		d.Output = &pb.ProcessEvent_DataEvent_Stdout{Stdout: b}
	default:
		d.Output = &pb.ProcessEvent_DataEvent_Stderr{Stderr: b}
	}
	return &pb.ProcessEvent{Event: &pb.ProcessEvent_Data{Data: d}}
}

// signalNames are Go's ProcessState texts of the signals that end
// processes (envd reports them the same way).
var signalNames = map[string]string{"TERM": "terminated", "KILL": "killed", "INT": "interrupt", "HUP": "hangup",
	"QUIT": "quit", "PIPE": "broken pipe", "ALRM": "alarm clock", "USR1": "user defined signal 1", "USR2": "user defined signal 2"}

// endEvent is envd's end event of an exit: a process ended by a signal
// has exit code -1, exited false and status "signal: killed", as Go's
// os.ProcessState says. Like envd (the text of cmd.Wait's error), every
// end but a clean exit also has error set to the status: the SDK's
// CommandExitError takes it as its message.
func endEvent(ex subjects.ProcExit) *pb.ProcessEvent {
	end := &pb.ProcessEvent_EndEvent{ExitCode: int32(ex.ExitCode), Exited: true, Status: "exit status " + strconv.Itoa(ex.ExitCode)}
	switch {
	case ex.Lost:
		msg := "the process was lost (the sandbox ended or the guest no longer knows it)"
		end.ExitCode, end.Exited, end.Status, end.Error = -1, false, "lost", &msg
	case ex.Signal != "":
		name := signalNames[ex.Signal]
		if name == "" {
			name = "SIG" + ex.Signal
		}
		end.ExitCode, end.Exited, end.Status = -1, false, "signal: "+name
		end.Error = &end.Status
	case ex.ExitCode != 0:
		end.Error = &end.Status
	}
	return &pb.ProcessEvent{Event: &pb.ProcessEvent_End{End: end}}
}
