// Package handlers answers the worker's NATS subjects: it decodes and
// validates a request, calls the runtime, and encodes the reply or an error
// reply (body {"error":{...}} plus the micro error headers). It knows nothing
// of QEMU or JetStream.
package handlers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/firkin-dev/firkin-worker/subjects"
)

// Sandboxes is the runtime's sandbox API.
type Sandboxes interface {
	Create(ctx context.Context, req subjects.CreateSandboxRequest) (subjects.Sandbox, error)
	List(ctx context.Context) ([]subjects.Sandbox, error)
	Get(ctx context.Context, id string) (subjects.Sandbox, error)
	Exec(ctx context.Context, id string, req subjects.ExecRequest) (subjects.ExecReply, error)
	Kill(ctx context.Context, id string) (subjects.KillReply, error)
	SetTimeout(ctx context.Context, id string, req subjects.TimeoutRequest) (subjects.Sandbox, error)
	Logs(ctx context.Context, id string, req subjects.LogsRequest) (subjects.LogsReply, error)
}

// Snapshots is the runtime's snapshot and template API.
type Snapshots interface {
	Snapshot(ctx context.Context, id string, req subjects.SnapshotRequest) (subjects.SnapshotRecord, error)
	BuildTemplate(ctx context.Context, req subjects.BuildTemplateRequest) (subjects.SnapshotRecord, error)
	ListSnapshots(ctx context.Context) ([]subjects.SnapshotRecord, error)
	GetSnapshot(ctx context.Context, sid string) (subjects.SnapshotRecord, error)
	DeleteSnapshot(ctx context.Context, sid string) (subjects.DeleteSnapshotReply, error)
}

// Pool is the runtime's warm pool API.
type Pool interface {
	PoolStatus() subjects.PoolStatusReply
	SetPool(ctx context.Context, req subjects.PoolSetRequest) (subjects.PoolStatusReply, error)
}

// Router exposes guest ports.
type Router interface {
	Route(ctx context.Context, id string, req subjects.RouteRequest) (subjects.RouteReply, error)
}

// StatusReporter answers firkin.worker.status.
type StatusReporter interface {
	Status() subjects.WorkerStatusReply
}

// Cluster is the worker's membership: the members, where a create goes,
// and drain. Optional: without it the worker acts alone.
type Cluster interface {
	// Members are the live workers.
	Members(ctx context.Context) ([]subjects.WorkerRecord, error)
	// Place says where a create goes: "" for this worker, or the id of
	// the worker to forward it to. pinned creates (forwarded ones, or sent
	// to this worker's own subject) stay. errdefs.ErrCapacity when this
	// worker takes no creates and none can go elsewhere.
	Place(ctx context.Context, req subjects.CreateSandboxRequest, pinned bool) (string, error)
	// Forward publishes a create's body, with the client's reply subject,
	// to the worker's own create subject (not through this connection:
	// the service connection publishes replies only).
	Forward(ctx context.Context, workerID, reply string, data []byte) error
	// Drain makes this worker a lame duck (see subjects.DrainRequest).
	Drain(ctx context.Context, req subjects.DrainRequest) (subjects.DrainReply, error)
	// Draining reports whether this worker is draining or drained.
	Draining() bool
}

// Runtime is everything the handlers call.
type Runtime interface {
	Sandboxes
	Snapshots
	Pool
	Router
}

// Config configures a Service.
type Config struct {
	Subjects subjects.Subjects
	WorkerID string
	Version  string
	Runtime  Runtime
	// Status, when set, answers firkin.worker.status and
	// firkin.worker.<id>.status.
	Status StatusReporter
	Logger *slog.Logger
	// MaxInFlight bounds requests handled at once (default 256).
	MaxInFlight int
	// Observe, when set, is told of every answered request: its endpoint
	// (the micro endpoint's name, or sandbox.<verb>), its reply code
	// (subjects.CodeOK or the error code) and how long it took.
	Observe func(endpoint string, code subjects.Code, d time.Duration)
	// Cluster is the worker's membership (nil: a worker on its own).
	Cluster Cluster
	// ReplyPrefixes are the subjects requests may ask replies on: the
	// clients' inboxes (default "_INBOX."). A request whose reply subject
	// is anything else is not answered, so nobody can make the worker
	// publish to a stream, KV bucket, event or another service's subject.
	ReplyPrefixes []string
}

// Service is the worker's NATS face: the micro service firkin-worker with the
// cluster-wide endpoints, plus one subscription per owned sandbox.
type Service struct {
	cfg  Config
	nc   *nats.Conn
	subj subjects.Subjects
	rt   Runtime
	log  *slog.Logger
	svc  micro.Service

	ctx    context.Context
	cancel context.CancelFunc
	sem    chan struct{}
	wg     sync.WaitGroup

	mu   sync.Mutex
	subs map[string]*nats.Subscription
	// serial are the per-process stdin queues (proc.go).
	serial serialQueues
	fs     fsState // transfers and watches of the file verbs
}

// New returns a Service; Start registers it.
func New(nc *nats.Conn, cfg Config) (*Service, error) {
	if cfg.Runtime == nil || nc == nil {
		return nil, errors.New("handlers: a NATS connection and a runtime are required")
	}
	if cfg.Subjects.Prefix == "" {
		cfg.Subjects = subjects.Default
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxInFlight == 0 {
		cfg.MaxInFlight = 256
	}
	if cfg.Version == "" {
		cfg.Version = "0.1.0"
	}
	if len(cfg.ReplyPrefixes) == 0 {
		cfg.ReplyPrefixes = []string{"_INBOX."}
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Service{cfg: cfg, nc: nc, subj: cfg.Subjects, rt: cfg.Runtime, log: cfg.Logger,
		ctx: ctx, cancel: cancel, sem: make(chan struct{}, cfg.MaxInFlight), subs: map[string]*nats.Subscription{}}, nil
}

// endpoint is one cluster-wide endpoint.
type endpoint struct {
	name, subject string
	handle        func(ctx context.Context, req micro.Request) (any, error)
	everyWorker   bool // no queue group: every worker answers
}

// Start registers the micro service and its endpoints.
func (s *Service) Start() error {
	svc, err := micro.AddService(s.nc, micro.Config{
		Name:        "firkin-worker",
		Version:     s.cfg.Version,
		Description: "firkin sandboxes as micro-VMs",
		Metadata:    map[string]string{"worker_id": s.cfg.WorkerID},
		ErrorHandler: func(_ micro.Service, e *micro.NATSError) {
			s.log.Warn("micro service error", "subject", e.Subject, "err", e.Description)
		},
	})
	if err != nil {
		return fmt.Errorf("handlers: register micro service: %w", err)
	}
	s.svc = svc
	for _, e := range s.endpoints() {
		opts := []micro.EndpointOpt{micro.WithEndpointSubject(e.subject)}
		if e.everyWorker {
			opts = append(opts, micro.WithEndpointQueueGroupDisabled())
		}
		if err := svc.AddEndpoint(e.name, s.async(e.name, e.handle), opts...); err != nil {
			_ = svc.Stop()
			return fmt.Errorf("handlers: endpoint %s: %w", e.name, err)
		}
	}
	// The subscriptions must reach the server before anyone is told the
	// worker is ready, or an early request sees no responders.
	if err := s.nc.Flush(); err != nil {
		return fmt.Errorf("handlers: flush subscriptions: %w", err)
	}
	return nil
}

func (s *Service) endpoints() []endpoint {
	var extra []endpoint
	if s.cfg.Status != nil {
		extra = append(extra,
			endpoint{name: "WorkerStatus", subject: s.subj.WorkerStatus(), handle: s.workerStatus, everyWorker: true},
			endpoint{name: "WorkerStatusOf", subject: s.subj.WorkerStatusOf(s.cfg.WorkerID), handle: s.workerStatus, everyWorker: true})
	}
	if s.cfg.Cluster != nil {
		extra = append(extra,
			endpoint{name: "ListWorkers", subject: s.subj.ListWorkers(), handle: s.listWorkers},
			endpoint{name: "WorkerCreateSandbox", subject: s.subj.WorkerCreate(s.cfg.WorkerID), handle: s.createSandbox, everyWorker: true},
			endpoint{name: "DrainWorker", subject: s.subj.WorkerDrain(s.cfg.WorkerID), handle: s.drainWorker, everyWorker: true},
			endpoint{name: "ResumeSandbox", subject: s.subj.ResumeSandbox(), handle: s.resumeElsewhere})
	}
	return append(extra, []endpoint{
		{name: "CreateSandbox", subject: s.subj.CreateSandbox(), handle: s.createSandbox},
		{name: "ListSandboxes", subject: s.subj.ListSandboxes(), handle: s.listSandboxes},
		{name: "SandboxLogs", subject: s.subj.SandboxVerbWildcard(subjects.VerbLogs), handle: s.sandboxLogs},
		{name: "BuildTemplate", subject: s.subj.BuildTemplate(), handle: s.buildTemplate},
		{name: "Snapshots", subject: s.subj.Prefix + ".snapshot.>", handle: s.snapshots},
		{name: "PoolStatus", subject: s.subj.PoolStatus(), handle: s.poolStatus, everyWorker: true},
		{name: "SetPool", subject: s.subj.SetPool(), handle: s.setPool, everyWorker: true},
	}...)
}

// Own starts answering the per-sandbox subjects of id (this worker owns it).
func (s *Service) Own(id string) {
	sub, err := s.nc.Subscribe(s.subj.SandboxAll(id), func(m *nats.Msg) {
		id, verb, err := s.subj.ParseSandbox(m.Subject)
		if err != nil || verb == subjects.VerbLogs {
			return // logs are answered by the queue-group endpoint
		}
		if s.fs.deliver(id, verb, m) {
			return // a transfer's chunk or ack, in order
		}
		s.dispatchSandbox(id, verb, &msgRequest{msg: m, nc: s.nc})
	})
	if err != nil {
		s.log.Error("subscribe sandbox subjects", "sandbox", id, "err", err)
		return
	}
	s.mu.Lock()
	if old, ok := s.subs[id]; ok {
		_ = old.Unsubscribe()
	}
	s.subs[id] = sub
	s.mu.Unlock()
	// The subscription must reach the server before the create reply does,
	// or a quick client could see no responders.
	if err := s.nc.Flush(); err != nil {
		s.log.Warn("flush after subscribe", "sandbox", id, "err", err)
	}
}

// Release stops answering the subjects of id.
func (s *Service) Release(id string) {
	s.mu.Lock()
	sub, ok := s.subs[id]
	delete(s.subs, id)
	s.mu.Unlock()
	if ok {
		_ = sub.Unsubscribe()
	}
	s.fs.release(id)
}

// Stop stops taking requests, waits (bounded by ctx) for those in flight to be
// answered, and unregisters the service.
func (s *Service) Stop(ctx context.Context) error {
	var err error
	if s.svc != nil {
		err = s.svc.Stop()
	}
	s.mu.Lock()
	for id, sub := range s.subs {
		_ = sub.Unsubscribe()
		delete(s.subs, id)
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		s.cancel() // give up on the stragglers
		<-done
	}
	s.cancel()
	return err
}

// async runs handle in its own goroutine (NATS delivers a subscription's
// messages one at a time; a long exec must not hold up the next), bounded by
// MaxInFlight, and replies with its result. endpoint names the request in
// Config.Observe.
func (s *Service) async(endpoint string, handle func(context.Context, micro.Request) (any, error)) micro.HandlerFunc {
	return func(req micro.Request) {
		start, ok := s.admit(endpoint, req)
		if !ok {
			return
		}
		// Answer from the goroutine through a request of our own: micro
		// reads its request's state once this handler returns.
		req = s.detach(req)
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() { <-s.sem }()
			var v any
			var err error
			defer func() {
				if p := recover(); p != nil {
					v, err = nil, fmt.Errorf("internal error: %v", p)
				}
				if errors.Is(err, errAnswered) {
					return // another worker answers it
				}
				s.reply(req, v, err)
				s.observe(endpoint, err, start)
			}()
			v, err = handle(s.ctx, req)
		}()
	}
}

// admit takes a slot of MaxInFlight for req, or answers it
// capacity_rejected; a request whose reply subject is not an inbox is
// ignored. It returns when the request arrived and whether it holds a slot
// (release it with <-s.sem once answered).
func (s *Service) admit(endpoint string, req micro.Request) (time.Time, bool) {
	if s.foreignReply(req.Reply()) {
		s.log.Warn("request ignored: its reply subject is not an inbox", "subject", req.Subject(), "reply", req.Reply())
		return time.Time{}, false
	}
	start := time.Now()
	select {
	case s.sem <- struct{}{}:
		return start, true
	default:
		err := capacityError("worker is handling too many requests")
		s.reply(req, nil, err)
		s.observe(endpoint, err, start)
		return start, false
	}
}

// observe tells Config.Observe of an answered request.
func (s *Service) observe(endpoint string, err error, start time.Time) {
	if s.cfg.Observe == nil {
		return
	}
	code := subjects.CodeOK
	if err != nil {
		code = subjects.CodeOf(err)
	}
	s.cfg.Observe(endpoint, code, time.Since(start))
}

// foreignReply reports whether a request's reply subject is outside the
// clients' inboxes (Config.ReplyPrefixes): a stream or KV subject, an event,
// the worker's own inbox, another service's subject. Answering there would
// make the worker publish what the requester may not (on the embedded
// server the service connection's permissions forbid it as well; this holds
// on any server). Such requests are not answered.
func (s *Service) foreignReply(reply string) bool {
	return reply != "" && !s.ReplyAllowed(reply)
}

// ReplyAllowed says whether the worker answers requests whose reply subject
// is reply (a client inbox; see Config.ReplyPrefixes). Other services of the
// worker (the job runner) use it for their own requests.
func (s *Service) ReplyAllowed(reply string) bool {
	for _, p := range s.cfg.ReplyPrefixes {
		if strings.HasPrefix(reply, p) && len(reply) > len(p) {
			return true
		}
	}
	return false
}

// reply sends v, or err as an error reply: the one error path of every
// endpoint.
func (s *Service) reply(req micro.Request, v any, err error) {
	if err == nil {
		if rerr := req.RespondJSON(v); rerr != nil {
			s.log.Warn("send reply", "subject", req.Subject(), "err", rerr)
		}
		return
	}
	code := subjects.CodeOf(err)
	msg := err.Error()
	if code.Status() >= 500 {
		errID := strconv.FormatInt(time.Now().UnixNano()%1e9, 36)
		s.log.Error("request failed", "subject", req.Subject(), "code", code, "error_id", errID, "err", err)
		msg = fmt.Sprintf("%s (error id %s)", msg, errID)
	} else {
		s.log.Debug("request refused", "subject", req.Subject(), "code", code, "err", err)
	}
	body, _ := json.Marshal(subjects.ErrorBody{Error: subjects.ErrorDetail{Code: code, Message: msg}})
	if rerr := req.Error(strconv.Itoa(code.Status()), msg, body, micro.WithHeaders(micro.Headers{"Firkin-Error-Code": []string{string(code)}})); rerr != nil {
		s.log.Warn("send error reply", "subject", req.Subject(), "err", rerr)
	}
}

// msgRequest adapts a plain NATS message to micro.Request, so every subject
// shares one reply path: per-sandbox subscriptions, and micro requests
// answered from another goroutine (detach).
type msgRequest struct {
	msg *nats.Msg
	nc  *nats.Conn // publishes the reply
}

// detach returns req as a msgRequest that replies through the service's
// connection, independent of micro's request (which micro reads after its
// handler returned).
func (s *Service) detach(req micro.Request) micro.Request {
	if r, ok := req.(*msgRequest); ok {
		return r
	}
	return &msgRequest{nc: s.nc, msg: &nats.Msg{Subject: req.Subject(), Reply: req.Reply(), Data: req.Data(), Header: nats.Header(req.Headers())}}
}

// send publishes m as the reply to r.
func (r *msgRequest) send(m *nats.Msg) error {
	if r.msg.Reply == "" {
		return nats.ErrMsgNoReply
	}
	m.Subject = r.msg.Reply
	return r.nc.PublishMsg(m)
}

func (r *msgRequest) Respond(data []byte, opts ...micro.RespondOpt) error {
	m := &nats.Msg{Data: data}
	for _, o := range opts {
		o(m)
	}
	return r.send(m)
}

func (r *msgRequest) RespondJSON(v any, opts ...micro.RespondOpt) error {
	data, err := json.Marshal(v)
	if err != nil {
		return micro.ErrMarshalResponse
	}
	return r.Respond(data, opts...)
}

func (r *msgRequest) Error(code, description string, data []byte, opts ...micro.RespondOpt) error {
	m := &nats.Msg{Data: data, Header: nats.Header{micro.ErrorHeader: {description}, micro.ErrorCodeHeader: {code}}}
	for _, o := range opts {
		o(m)
	}
	return r.send(m)
}

func (r *msgRequest) Data() []byte           { return r.msg.Data }
func (r *msgRequest) Headers() micro.Headers { return micro.Headers(r.msg.Header) }
func (r *msgRequest) Subject() string        { return r.msg.Subject }
func (r *msgRequest) Reply() string          { return r.msg.Reply }
