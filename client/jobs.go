package client

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	js "github.com/nats-io/nats.go/jetstream"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/jobs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// Names of the JetStream streams and buckets the job methods read (they do
// not change with the subject prefix).
const (
	logStream      = "FIRKIN_LOGS"
	sessionsBucket = "firkin_sessions"
)

// resultRecheck is how often a waiter reads the results bucket again while
// it waits for the live result message: a backstop for a message missed
// while the subscription's interest was still spreading over a cluster.
const resultRecheck = 2 * time.Second

// Submitted is what SubmitJob returns once the job is stored.
type Submitted struct {
	JobID string `json:"job_id"`
	Queue string `json:"queue"`
	// Stream and Seq are the job's place in FIRKIN_JOBS.
	Stream string `json:"stream"`
	Seq    uint64 `json:"seq"`
	// Duplicate is set when a job with the same id was submitted within the
	// stream's duplicate window (10 min): this one was not stored again.
	Duplicate bool `json:"duplicate,omitempty"`
}

// pubAck is the JetStream server's answer to a publish sent as a request.
type pubAck struct {
	Stream    string `json:"stream"`
	Seq       uint64 `json:"seq"`
	Duplicate bool   `json:"duplicate"`
	Error     *struct {
		Code        int    `json:"code"`
		ErrCode     int    `json:"err_code"`
		Description string `json:"description"`
	} `json:"error"`
}

// NewJobID returns a fresh job id ("job_" and 24 hex digits).
func NewJobID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return "job_" + hex.EncodeToString(b[:])
}

func (c *Client) jobsSubject(rest string) string { return c.subj.Prefix + ".jobs." + rest }

// SubmitJob stores job in the work queue queue ("" is jobs.DefaultQueue) by
// publishing it to <prefix>.jobs.<queue> as a request, which the JetStream
// server answers once the job is stored (no worker is involved). A job
// without a job_id gets one from NewJobID; the id is also sent as the
// Nats-Msg-Id header, so submitting the same job again within 10 minutes
// stores it once (Submitted.Duplicate), and later a worker finds its result
// and does not run it again.
//
// The job is validated first (an invalid job is an *Error with code
// invalid_request). A queue no worker consumes is not stored: the error
// matches ErrNoResponders (code invalid_request).
func (c *Client) SubmitJob(ctx context.Context, queue string, job jobs.Job) (Submitted, error) {
	if queue == "" {
		queue = jobs.DefaultQueue
	}
	if err := jobs.ValidateQueue(queue); err != nil {
		return Submitted{}, err
	}
	if job.JobID == "" {
		job.JobID = NewJobID()
	}
	if err := job.Validate(); err != nil {
		return Submitted{}, err
	}
	data, err := json.Marshal(job)
	if err != nil {
		return Submitted{}, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("encode job: %w", err))
	}
	subject := c.jobsSubject(queue)
	m := nats.NewMsg(subject)
	m.Data = data
	m.Header.Set(nats.MsgIdHdr, job.JobID)
	reply, err := c.nc.RequestMsgWithContext(ctx, m)
	if errors.Is(err, nats.ErrNoResponders) {
		return Submitted{}, &Error{Subject: subject, Code: subjects.CodeInvalidRequest, NoResponders: true,
			Message: fmt.Sprintf("no stream stores %s (no responders): no worker consumes queue %q; the job was not stored", subject, queue)}
	}
	if err != nil {
		return Submitted{}, fmt.Errorf("%s: %w", subject, err)
	}
	var ack pubAck
	if err := json.Unmarshal(reply.Data, &ack); err != nil {
		return Submitted{}, fmt.Errorf("%s: decode PubAck %q: %w", subject, cut(string(reply.Data), 200), err)
	}
	if ack.Error != nil {
		code := subjects.CodeRuntimeFailed
		if strings.Contains(ack.Error.Description, "maximum") {
			code = subjects.CodeCapacityRejected // the stream is full (it refuses new jobs)
		}
		return Submitted{}, &Error{Subject: subject, Code: code,
			Message: fmt.Sprintf("job not stored: %s (JetStream %d/%d)", ack.Error.Description, ack.Error.Code, ack.Error.ErrCode)}
	}
	if ack.Stream != jobs.Stream {
		return Submitted{}, &Error{Subject: subject, Code: subjects.CodeRuntimeFailed,
			Message: fmt.Sprintf("stored in stream %q, not %s: the subject belongs to another stream", ack.Stream, jobs.Stream)}
	}
	return Submitted{JobID: job.JobID, Queue: queue, Stream: ack.Stream, Seq: ack.Seq, Duplicate: ack.Duplicate}, nil
}

// SubmitJobAndWait submits job (see SubmitJob) and waits for its result
// (see WaitJob).
func (c *Client) SubmitJobAndWait(ctx context.Context, queue string, job jobs.Job) (jobs.Result, error) {
	sub, err := c.SubmitJob(ctx, queue, job)
	if err != nil {
		return jobs.Result{}, err
	}
	return c.WaitJob(ctx, sub.JobID)
}

// WaitJob waits until the job has a result and returns it. It subscribes to
// <prefix>.results.<job id> first and then reads the KV bucket
// firkin_results, so a result stored before the call (a late reader) or
// while it sets up is not missed; while waiting it reads the bucket again
// every 2 s. The error is about waiting only (ctx, transport): a job that
// failed is a Result with Status jobs.StatusFailed (see ResultErr).
func (c *Client) WaitJob(ctx context.Context, jobID string) (jobs.Result, error) {
	w, err := c.awaitResult(ctx, jobID)
	if err != nil {
		return jobs.Result{}, err
	}
	defer w.close()
	if w.res != nil {
		return *w.res, nil
	}
	for {
		select {
		case <-ctx.Done():
			return jobs.Result{}, fmt.Errorf("wait for job %s: %w", jobID, ctx.Err())
		case res := <-w.next():
			return res, nil
		}
	}
}

// ResultErr is nil for a succeeded job and an *Error for any other status:
// its code is the result's code when it has one (runtime_failed for dead
// jobs without one, invalid_request for invalid ones), its message the
// status and the reason. A command that exited non-zero has no code and
// gives "failed: a command failed" with code runtime_failed.
func ResultErr(res jobs.Result) error {
	if res.Status == jobs.StatusSucceeded {
		return nil
	}
	code := res.Code
	if code == "" {
		code = subjects.CodeRuntimeFailed
		if res.Status == jobs.StatusInvalid {
			code = subjects.CodeInvalidRequest
		}
	}
	return &Error{Code: code, Message: fmt.Sprintf("job %s %s: %s", res.JobID, res.Status, res.Error)}
}

// resultWait is a subscription to a job's result message plus the first
// read of the bucket.
type resultWait struct {
	c    *Client
	id   string
	sub  *nats.Subscription
	msgs chan *nats.Msg
	out  chan jobs.Result
	stop chan struct{}
	done chan struct{}
	res  *jobs.Result // found by the first read
	kv   js.KeyValue
}

// awaitResult subscribes to the job's result subject, then reads the
// bucket. When the result is not there yet, a goroutine delivers it (from
// the message or a later read) on next().
func (c *Client) awaitResult(ctx context.Context, id string) (*resultWait, error) {
	if err := jobs.ValidateJobID(id); err != nil {
		return nil, err
	}
	kv, err := c.resultsBucket(ctx)
	if err != nil {
		return nil, err
	}
	w := &resultWait{c: c, id: id, kv: kv, msgs: make(chan *nats.Msg, 8), out: make(chan jobs.Result, 1),
		stop: make(chan struct{}), done: make(chan struct{})}
	subject := c.subj.Prefix + ".results." + id
	if w.sub, err = c.nc.ChanSubscribe(subject, w.msgs); err != nil {
		return nil, fmt.Errorf("subscribe %s: %w", subject, err)
	}
	// The subscription is in place on the server before the bucket is read.
	if err := c.flush(ctx); err != nil {
		_ = w.sub.Unsubscribe()
		return nil, fmt.Errorf("subscribe %s: %w", subject, err)
	}
	res, err := c.readResult(ctx, kv, id)
	if err != nil {
		_ = w.sub.Unsubscribe()
		return nil, err
	}
	if res != nil {
		w.res = res
		close(w.done)
		return w, nil
	}
	go w.run()
	return w, nil
}

func (w *resultWait) run() {
	defer close(w.done)
	tick := time.NewTicker(resultRecheck)
	defer tick.Stop()
	for {
		var res *jobs.Result
		select {
		case <-w.stop:
			return
		case m := <-w.msgs:
			if r, err := decodeResult(m.Data, w.id); err == nil {
				res = &r
			}
		case <-tick.C:
			ctx, cancel := context.WithTimeout(context.Background(), resultRecheck)
			res, _ = w.c.readResult(ctx, w.kv, w.id)
			cancel()
		}
		if res != nil {
			w.out <- *res
			return
		}
	}
}

// next delivers the result once it arrives.
func (w *resultWait) next() <-chan jobs.Result { return w.out }

func (w *resultWait) close() {
	_ = w.sub.Unsubscribe()
	select {
	case <-w.done:
	default:
		close(w.stop)
		<-w.done
	}
}

// flush waits for the server to have processed what was sent (at most 10 s
// when ctx has no deadline).
func (c *Client) flush(ctx context.Context) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
	}
	return c.nc.FlushWithContext(ctx)
}

// resultsBucket binds the firkin_results bucket once.
func (c *Client) resultsBucket(ctx context.Context) (js.KeyValue, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.results != nil {
		return c.results, nil
	}
	j, err := c.jetStream()
	if err != nil {
		return nil, err
	}
	kv, err := j.KeyValue(ctx, jobs.ResultsBucket)
	if err != nil {
		return nil, fmt.Errorf("bucket %s (no worker has started jobs yet?): %w", jobs.ResultsBucket, err)
	}
	c.results = kv
	return kv, nil
}

// jetStream returns the JetStream handle; c.mu is held.
func (c *Client) jetStream() (js.JetStream, error) {
	if c.js == nil {
		j, err := js.New(c.nc)
		if err != nil {
			return nil, fmt.Errorf("jetstream: %w", err)
		}
		c.js = j
	}
	return c.js, nil
}

// readResult reads the job's result from the bucket: nil when there is none
// yet.
func (c *Client) readResult(ctx context.Context, kv js.KeyValue, id string) (*jobs.Result, error) {
	e, err := kv.Get(ctx, id)
	if errors.Is(err, js.ErrKeyNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read result of job %s: %w", id, err)
	}
	res, err := decodeResult(e.Value(), id)
	if err != nil {
		return nil, err
	}
	return &res, nil
}

// decodeResult decodes a stored or published result (untrusted: its id
// must be the one asked for).
func decodeResult(data []byte, id string) (jobs.Result, error) {
	var res jobs.Result
	if err := json.Unmarshal(data, &res); err != nil {
		return res, errdefs.Wrap(errdefs.ErrProtocol, fmt.Errorf("result of job %s: %w", id, err))
	}
	if res.JobID != id || res.Status == "" {
		return res, errdefs.Wrap(errdefs.ErrProtocol, fmt.Errorf("result of job %s: names job %q, status %q", id, cut(res.JobID, 64), cut(res.Status, 32)))
	}
	return res, nil
}

// CancelJob asks the workers to cancel a job (<prefix>.jobs.<job id>.cancel):
// a waiting job is finished as canceled when a worker takes it, a running
// one is stopped within about a second. The reply's Status is the job's
// final status when it already has a result, else "cancel_requested".
func (c *Client) CancelJob(ctx context.Context, jobID string) (jobs.CancelReply, error) {
	if err := jobs.ValidateJobID(jobID); err != nil {
		return jobs.CancelReply{}, err
	}
	var r jobs.CancelReply
	err := c.Request(ctx, c.jobsSubject(jobID+".cancel"), struct{}{}, &r)
	return r, err
}

// JobsStatus asks every worker for its view of the job queues
// (<prefix>.jobs.status) and returns the replies heard until none came for
// 250 ms (or ctx ended after at least one). Waiting and Running are the
// cluster's; sum the other counts over the replies.
func (c *Client) JobsStatus(ctx context.Context) ([]jobs.StatusReply, error) {
	return gather[jobs.StatusReply](ctx, c, c.jobsSubject("status"))
}

// LogHandler receives the log events of a watched job, in order, from one
// goroutine.
type LogHandler func(subjects.LogEvent)

// WatchJob follows a job's output live and returns its result. The job's
// commands run in a sandbox whose session record (KV firkin_sessions) has
// metadata job_id; WatchJob watches that bucket for it and reads the
// sandbox's log subject <prefix>.logs.<sandbox id> in FIRKIN_LOGS with an
// ordered consumer from the start, calling fn for each event (stdout,
// stderr and system events, the job's file writes included). A retried job
// runs in a new sandbox, which WatchJob follows in turn. When the result
// arrives, the events stored up to then are delivered before WatchJob
// returns. A job that already has a result has its last sandbox's events
// replayed. fn must not block for long. The result is returned even when
// reading the last events failed (the error says so).
//
// The client needs read access to FIRKIN_LOGS and KV_firkin_sessions (the
// embedded server's client identity and deploy/'s product user have it).
func (c *Client) WatchJob(ctx context.Context, jobID string, fn LogHandler) (jobs.Result, error) {
	w, err := c.awaitResult(ctx, jobID)
	if err != nil {
		return jobs.Result{}, err
	}
	defer w.close()
	c.mu.Lock()
	j, err := c.jetStream()
	c.mu.Unlock()
	if err != nil {
		return jobs.Result{}, err
	}
	lw := &logWatch{c: c, j: j, fn: fn}
	defer lw.stop()
	if w.res != nil {
		return *w.res, lw.finish(ctx, w.res.SandboxID)
	}
	sessions, err := j.KeyValue(ctx, sessionsBucket)
	if err != nil {
		return jobs.Result{}, fmt.Errorf("bucket %s: %w", sessionsBucket, err)
	}
	watcher, err := sessions.WatchAll(ctx, js.IgnoreDeletes())
	if err != nil {
		return jobs.Result{}, fmt.Errorf("watch %s: %w", sessionsBucket, err)
	}
	defer func() { _ = watcher.Stop() }()
	updates := watcher.Updates()
	for {
		select {
		case <-ctx.Done():
			return jobs.Result{}, fmt.Errorf("watch job %s: %w", jobID, ctx.Err())
		case e, ok := <-updates:
			if !ok {
				updates = nil // the watcher ended; the result still comes
				continue
			}
			if e == nil || e.Operation() != js.KeyValuePut {
				continue
			}
			var sb subjects.Sandbox
			if json.Unmarshal(e.Value(), &sb) != nil || sb.Metadata["job_id"] != jobID ||
				sb.SandboxID != e.Key() || subjects.ValidateSandboxID(sb.SandboxID) != nil {
				continue
			}
			if err := lw.follow(ctx, sb.SandboxID); err != nil {
				return jobs.Result{}, err
			}
		case m := <-lw.msgs():
			lw.deliver(m)
		case res := <-w.next():
			return res, lw.finish(ctx, res.SandboxID)
		}
	}
}

// logWatch reads one sandbox's log subject at a time.
type logWatch struct {
	c  *Client
	j  js.JetStream
	fn LogHandler
	f  *logFeed
}

// logFeed is an ordered consumer on one sandbox's log subject.
type logFeed struct {
	sandbox string
	subject string
	cc      js.ConsumeContext
	ch      chan js.Msg
	quit    chan struct{}
	seq     uint64 // the stream sequence last delivered
}

// msgs is the current feed's channel (nil, never ready, without one).
func (lw *logWatch) msgs() <-chan js.Msg {
	if lw.f == nil {
		return nil
	}
	return lw.f.ch
}

// follow switches to a sandbox's log subject, first delivering what the
// previous sandbox stored.
func (lw *logWatch) follow(ctx context.Context, sandbox string) error {
	if lw.f != nil && lw.f.sandbox == sandbox {
		return nil
	}
	if lw.f != nil {
		if err := lw.drain(ctx); err != nil {
			return err
		}
		lw.stop()
	}
	subject := lw.c.subj.Logs(sandbox)
	cons, err := lw.j.OrderedConsumer(ctx, logStream, js.OrderedConsumerConfig{
		FilterSubjects: []string{subject}, DeliverPolicy: js.DeliverAllPolicy,
	})
	if err != nil {
		return fmt.Errorf("follow %s: %w", subject, err)
	}
	f := &logFeed{sandbox: sandbox, subject: subject, ch: make(chan js.Msg, 256), quit: make(chan struct{})}
	f.cc, err = cons.Consume(func(m js.Msg) {
		select {
		case f.ch <- m:
		case <-f.quit:
		}
	})
	if err != nil {
		return fmt.Errorf("follow %s: %w", subject, err)
	}
	lw.f = f
	return nil
}

func (lw *logWatch) deliver(m js.Msg) {
	if md, err := m.Metadata(); err == nil {
		lw.f.seq = md.Sequence.Stream
	}
	var ev subjects.LogEvent
	if err := json.Unmarshal(m.Data(), &ev); err != nil {
		return // not a log event: skipped
	}
	lw.fn(ev)
}

// drain delivers the current feed's events up to the last one its subject
// holds now.
func (lw *logWatch) drain(ctx context.Context) error {
	s, err := lw.j.Stream(ctx, logStream)
	if err != nil {
		return fmt.Errorf("stream %s: %w", logStream, err)
	}
	last, err := s.GetLastMsgForSubject(ctx, lw.f.subject)
	if errors.Is(err, js.ErrMsgNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("last event of %s: %w", lw.f.subject, err)
	}
	for lw.f.seq < last.Sequence {
		select {
		case m := <-lw.f.ch:
			lw.deliver(m)
		case <-ctx.Done():
			return fmt.Errorf("read %s: %w", lw.f.subject, ctx.Err())
		}
	}
	return nil
}

// finish delivers the rest of the result's sandbox's events.
func (lw *logWatch) finish(ctx context.Context, sandbox string) error {
	if sandbox == "" || subjects.ValidateSandboxID(sandbox) != nil {
		return nil // the job never had a sandbox (canceled while waiting, invalid)
	}
	if err := lw.follow(ctx, sandbox); err != nil {
		return err
	}
	return lw.drain(ctx)
}

func (lw *logWatch) stop() {
	if lw.f == nil {
		return
	}
	close(lw.f.quit)
	lw.f.cc.Stop()
	lw.f = nil
}

func cut(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
