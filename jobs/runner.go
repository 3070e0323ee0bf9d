package jobs

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	js "github.com/nats-io/nats.go/jetstream"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// Stream, bucket and consumer names (independent of the subject prefix).
const (
	Stream        = "FIRKIN_JOBS"
	DeadStream    = "FIRKIN_JOBS_DEAD"
	ResultsBucket = "firkin_results"
	// DefaultQueue is always consumed.
	DefaultQueue = "default"
	// DuplicateWindow is how long the stream remembers Nats-Msg-Id headers.
	DuplicateWindow = 10 * time.Minute
)

// ConsumerName is the durable pull consumer of a queue.
func ConsumerName(queue string) string { return "jobs-" + queue }

// Subject names under the prefix.
func queueSubject(s subjects.Subjects, q string) string { return s.Prefix + ".jobs." + q }
func deadSubject(s subjects.Subjects, q string) string  { return s.Prefix + ".jobs.dead." + q }
func resultSubject(s subjects.Subjects, id string) string {
	return s.Prefix + ".results." + id
}

// Runtime is what the runner needs of the worker's runtime (the backend).
type Runtime interface {
	Create(ctx context.Context, req subjects.CreateSandboxRequest) (subjects.Sandbox, error)
	Exec(ctx context.Context, id string, req subjects.ExecRequest) (subjects.ExecReply, error)
	Snapshot(ctx context.Context, id string, req subjects.SnapshotRequest) (subjects.SnapshotRecord, error)
	Kill(ctx context.Context, id string) (subjects.KillReply, error)
}

// Config configures a Runner.
type Config struct {
	Subjects subjects.Subjects
	WorkerID string
	Runtime  Runtime
	// Store is the worker's store connection: the stream, the bucket, the
	// consumers, results and dead letters.
	Store *nats.Conn
	// Service is the worker's service connection: it answers cancel and
	// status requests (replies only).
	Service *nats.Conn
	// Queues consumed besides DefaultQueue.
	Queues []string
	// Concurrency is the most jobs this worker runs at once (default 2).
	Concurrency int
	// AckWait (30 s) is how long a delivered job may go without an ack or
	// progress ack before it is redelivered; running jobs send progress
	// acks every AckWait/3.
	AckWait time.Duration
	// MaxDeliver (5) bounds the attempts of a job.
	MaxDeliver int
	// Backoff (2 s) is the delay before the first retry after an
	// infrastructure failure; it doubles per attempt up to 1 min.
	Backoff time.Duration
	// ResultTTL is how long results stay in the bucket (7 days).
	ResultTTL time.Duration
	// Replicas of the stream and buckets (1).
	Replicas int
	// ReplyAllowed says whether a cancel or status request's reply subject
	// is a client inbox the worker answers on (default: "_INBOX." subjects).
	ReplyAllowed func(reply string) bool
	Logger       *slog.Logger
}

// Runner consumes jobs. Start it with Start; Stop hands back the jobs it
// runs (they are redelivered to another worker at once).
type Runner struct {
	cfg     Config
	log     *slog.Logger
	js      js.JetStream
	results js.KeyValue
	cons    map[string]js.Consumer
	sem     chan struct{}
	subs    []*nats.Subscription

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	running  map[string]int // per queue
	counters map[string]*counters

	// paused is closed by Pause: the consumers stop pulling.
	paused    chan struct{}
	pauseOnce sync.Once
	// handlers counts the jobs being handled (Drain waits for them).
	handlers sync.WaitGroup
}

type counters struct{ succeeded, failed, invalid, canceled, dead atomic.Int64 }

var errCanceled = errors.New("job canceled")

// Start sets up the stream, the bucket and the consumers, and starts
// consuming.
func Start(ctx context.Context, cfg Config) (*Runner, error) {
	if cfg.Runtime == nil || cfg.Store == nil || cfg.Service == nil || cfg.WorkerID == "" {
		return nil, errors.New("jobs: runtime, connections and worker id are required")
	}
	if cfg.Subjects.Prefix == "" {
		cfg.Subjects = subjects.Default
	}
	queues := []string{DefaultQueue}
	for _, q := range cfg.Queues {
		if err := ValidateQueue(q); err != nil {
			return nil, fmt.Errorf("jobs: %w", err)
		}
		if !slices.Contains(queues, q) {
			queues = append(queues, q)
		}
	}
	cfg.Queues = queues
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = 2
	}
	if cfg.AckWait <= 0 {
		cfg.AckWait = 30 * time.Second
	}
	if cfg.MaxDeliver <= 0 {
		cfg.MaxDeliver = 5
	}
	if cfg.Backoff <= 0 {
		cfg.Backoff = 2 * time.Second
	}
	if cfg.ResultTTL <= 0 {
		cfg.ResultTTL = 7 * 24 * time.Hour
	}
	if cfg.Replicas <= 0 {
		cfg.Replicas = 1
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.ReplyAllowed == nil {
		cfg.ReplyAllowed = func(reply string) bool { return strings.HasPrefix(reply, "_INBOX.") }
	}
	j, err := js.New(cfg.Store)
	if err != nil {
		return nil, fmt.Errorf("jobs: %w", err)
	}
	r := &Runner{cfg: cfg, log: cfg.Logger, js: j, cons: map[string]js.Consumer{}, sem: make(chan struct{}, cfg.Concurrency),
		running: map[string]int{}, counters: map[string]*counters{}, paused: make(chan struct{})}
	if err := r.setup(ctx); err != nil {
		return nil, err
	}
	for _, q := range queues {
		r.counters[q] = &counters{}
	}
	if err := r.subscribe(); err != nil {
		r.unsubscribe()
		return nil, err
	}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	for _, q := range queues {
		r.wg.Add(1)
		go r.consume(q)
	}
	r.log.Info("job runner started", "queues", queues, "concurrency", cfg.Concurrency)
	return r, nil
}

// setup creates or updates the work-queue stream (adding this worker's
// queue subjects to those of the others), the dead-letter stream, the
// results bucket and one durable consumer per queue.
func (r *Runner) setup(ctx context.Context) error {
	want := make([]string, 0, len(r.cfg.Queues))
	for _, q := range r.cfg.Queues {
		want = append(want, queueSubject(r.cfg.Subjects, q))
	}
	// Workers of a cluster may consume different queues: the stream's
	// subjects are the union. Two workers updating at once may drop each
	// other's subject, so check and retry.
	for attempt := 0; ; attempt++ {
		subs := slices.Clone(want)
		if info, err := r.js.Stream(ctx, Stream); err == nil {
			for _, s := range info.CachedInfo().Config.Subjects {
				if !slices.Contains(subs, s) {
					subs = append(subs, s)
				}
			}
		}
		slices.Sort(subs)
		_, err := r.js.CreateOrUpdateStream(ctx, js.StreamConfig{
			Name:        Stream,
			Description: "firkin jobs (work queue)",
			Subjects:    subs,
			Retention:   js.WorkQueuePolicy,
			Discard:     js.DiscardNew,
			MaxMsgs:     1_000_000,
			MaxMsgSize:  8 << 20,
			Duplicates:  DuplicateWindow,
			Replicas:    r.cfg.Replicas,
		})
		if err != nil {
			return fmt.Errorf("jobs: stream %s: %w", Stream, err)
		}
		s, err := r.js.Stream(ctx, Stream)
		if err != nil {
			return fmt.Errorf("jobs: stream %s: %w", Stream, err)
		}
		have := s.CachedInfo().Config.Subjects
		if !slices.ContainsFunc(want, func(w string) bool { return !slices.Contains(have, w) }) {
			break
		}
		if attempt == 4 {
			return fmt.Errorf("jobs: stream %s: subjects %v did not stick", Stream, want)
		}
	}
	if _, err := r.js.CreateOrUpdateStream(ctx, js.StreamConfig{
		Name:        DeadStream,
		Description: "firkin dead-lettered jobs",
		Subjects:    []string{r.cfg.Subjects.Prefix + ".jobs.dead.>"},
		MaxAge:      r.cfg.ResultTTL,
		MaxMsgs:     100_000,
		Discard:     js.DiscardOld,
		Replicas:    r.cfg.Replicas,
	}); err != nil {
		return fmt.Errorf("jobs: stream %s: %w", DeadStream, err)
	}
	var err error
	if r.results, err = r.js.CreateOrUpdateKeyValue(ctx, js.KeyValueConfig{
		Bucket: ResultsBucket, Description: "firkin job results and cancel markers", TTL: r.cfg.ResultTTL, Replicas: r.cfg.Replicas,
	}); err != nil {
		return fmt.Errorf("jobs: bucket %s: %w", ResultsBucket, err)
	}
	for _, q := range r.cfg.Queues {
		c, err := r.js.CreateOrUpdateConsumer(ctx, Stream, js.ConsumerConfig{
			Durable:       ConsumerName(q),
			Description:   "firkin workers taking jobs of queue " + q,
			FilterSubject: queueSubject(r.cfg.Subjects, q),
			AckPolicy:     js.AckExplicitPolicy,
			AckWait:       r.cfg.AckWait,
			MaxDeliver:    r.cfg.MaxDeliver,
			DeliverPolicy: js.DeliverAllPolicy,
		})
		if err != nil {
			return fmt.Errorf("jobs: consumer %s: %w", ConsumerName(q), err)
		}
		r.cons[q] = c
	}
	return nil
}

// Stop stops taking jobs, hands back the running ones (Nak: redelivered at
// once, to any worker) and waits for them.
func (r *Runner) Stop(ctx context.Context) error {
	r.unsubscribe()
	r.cancel()
	done := make(chan struct{})
	go func() { r.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("jobs: stop: %w", ctx.Err())
	}
}

// Pause stops taking jobs (a draining worker): the consumers stop pulling,
// and a job fetched meanwhile is handed back at once. Running jobs go on.
// There is no resume: a paused worker is on its way out.
func (r *Runner) Pause() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pauseOnce.Do(func() { close(r.paused) })
}

func (r *Runner) isPaused() bool {
	select {
	case <-r.paused:
		return true
	default:
		return false
	}
}

// Drain pauses the runner and waits for the running jobs to finish; when
// ctx ends first, it hands them back (Nak: another worker takes them at
// once) and returns when they are.
func (r *Runner) Drain(ctx context.Context) error {
	r.Pause()
	done := make(chan struct{})
	go func() { r.handlers.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	r.log.Info("drain timeout: handing running jobs back", "running", r.Running())
	r.cancel()
	<-done
	return nil
}

// Running is the number of jobs running now.
func (r *Runner) Running() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, c := range r.running {
		n += c
	}
	return n
}

// consume takes jobs of one queue while this worker has room.
func (r *Runner) consume(q string) {
	defer r.wg.Done()
	cons := r.cons[q]
	for {
		select {
		case r.sem <- struct{}{}:
		case <-r.ctx.Done():
			return
		case <-r.paused:
			return
		}
		msg, err := cons.Next(js.FetchMaxWait(time.Second))
		if r.ctx.Err() != nil || r.isPaused() {
			if msg != nil {
				_ = msg.Nak()
			}
			<-r.sem
			return
		}
		if err != nil {
			<-r.sem
			if !errors.Is(err, nats.ErrTimeout) && !errors.Is(err, js.ErrNoMessages) {
				r.log.Warn("fetch job", "queue", q, "err", err)
				select {
				case <-time.After(time.Second):
				case <-r.ctx.Done():
					return
				}
			}
			continue
		}
		// Counted under the lock Pause takes: once paused, Drain's wait
		// sees every job that will run.
		r.mu.Lock()
		if r.isPaused() {
			r.mu.Unlock()
			_ = msg.Nak()
			<-r.sem
			return
		}
		r.handlers.Add(1)
		r.mu.Unlock()
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			defer r.handlers.Done()
			defer func() { <-r.sem }()
			r.handle(q, msg)
		}()
	}
}

// attempt is one delivery of a job.
type attempt struct {
	queue    string
	msg      js.Msg
	id       string
	job      Job
	decodeEr error
	meta     *js.MsgMetadata
	started  time.Time
}

func (r *Runner) handle(q string, msg js.Msg) {
	a := &attempt{queue: q, msg: msg, started: time.Now().UTC()}
	meta, err := msg.Metadata()
	if err != nil {
		r.log.Warn("job message without metadata", "queue", q, "err", err)
		_ = msg.Term()
		return
	}
	a.meta = meta
	a.job, a.decodeEr = Decode(msg.Data())
	a.id = a.job.JobID
	if ValidateJobID(a.id) != nil {
		a.id = ""
	}
	if a.id == "" {
		if h := msg.Headers().Get(nats.MsgIdHdr); h != "" {
			if err := ValidateJobID(h); err == nil {
				a.id = h
			} else if a.decodeEr == nil {
				a.decodeEr = fmt.Errorf("Nats-Msg-Id header: %w", err)
			}
		}
	}
	if a.id == "" {
		a.id = "job-" + strconv.FormatUint(meta.Sequence.Stream, 10)
	}
	log := r.log.With("job", a.id, "queue", q, "attempt", meta.NumDelivered)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Exactly one effect: a job that has a result is done (a duplicate).
	if e, err := r.results.Get(ctx, a.id); err == nil {
		var prev Result
		_ = json.Unmarshal(e.Value(), &prev)
		log.Info("job already has a result; acking the duplicate", "status", prev.Status)
		if err := msg.DoubleAck(ctx); err != nil {
			log.Warn("ack duplicate job", "err", err)
		}
		return
	}
	res := r.newResult(a)
	if _, err := r.results.Get(ctx, cancelKey(a.id)); err == nil {
		res.Status, res.Error = StatusCanceled, "canceled before it ran"
		r.finish(a, res, log)
		return
	}
	if a.decodeEr != nil {
		res.Status, res.Code, res.Error = StatusInvalid, subjects.CodeOf(a.decodeEr), a.decodeEr.Error()
		r.finish(a, res, log)
		return
	}
	r.track(q, 1)
	infra := r.run(a, &res, log)
	r.track(q, -1)
	if infra != nil {
		if r.ctx.Err() != nil {
			// Shutting down: hand it back at once.
			log.Info("worker stopping; job handed back", "err", infra)
			_ = msg.Nak()
			return
		}
		if int(meta.NumDelivered) < r.cfg.MaxDeliver {
			delay := r.backoff(int(meta.NumDelivered))
			log.Warn("job failed on infrastructure; retrying", "err", infra, "retry_in", delay)
			_ = msg.NakWithDelay(delay)
			return
		}
		res.Status, res.Code, res.Error = StatusDead, subjects.CodeOf(infra), fmt.Sprintf("infrastructure failure on every one of %d attempts; last: %v", meta.NumDelivered, infra)
	}
	r.finish(a, res, log)
}

func (r *Runner) backoff(n int) time.Duration {
	d := r.cfg.Backoff
	for i := 1; i < n && d < time.Minute; i++ {
		d *= 2
	}
	return min(d, time.Minute)
}

func (r *Runner) track(q string, d int) {
	r.mu.Lock()
	r.running[q] += d
	r.mu.Unlock()
}

func cancelKey(id string) string { return "cancel." + id }

func (r *Runner) newResult(a *attempt) Result {
	return Result{
		JobID: a.id, Queue: a.queue, WorkerID: r.cfg.WorkerID, Attempts: int(a.meta.NumDelivered),
		StreamSeq: a.meta.Sequence.Stream, SubmittedAt: a.meta.Timestamp.UTC(), StartedAt: a.started,
		QueuedMS: a.started.Sub(a.meta.Timestamp).Milliseconds(), Commands: []CommandResult{},
	}
}

// finish stores the result, publishes it, dead-letters invalid and dead
// jobs, and acks the message.
func (r *Runner) finish(a *attempt, res Result, log *slog.Logger) {
	res.FinishedAt = time.Now().UTC()
	res.DurationMS = res.FinishedAt.Sub(res.StartedAt).Milliseconds()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	data, err := encodeResult(res)
	if err != nil {
		log.Error("encode job result", "err", err)
		return
	}
	if _, err := r.results.Put(ctx, a.id, data); err != nil {
		// Not acked: redelivered after the ack wait, and tried again.
		log.Error("store job result; the job will be redelivered", "err", err)
		return
	}
	if err := r.cfg.Store.Publish(resultSubject(r.cfg.Subjects, a.id), data); err != nil {
		log.Warn("publish job result", "err", err)
	}
	if res.Status == StatusInvalid || res.Status == StatusDead {
		r.deadLetter(ctx, a, res, log)
	}
	if err := a.msg.DoubleAck(ctx); err != nil {
		log.Warn("ack job", "err", err)
	}
	if c := r.counters[a.queue]; c != nil {
		switch res.Status {
		case StatusSucceeded:
			c.succeeded.Add(1)
		case StatusFailed:
			c.failed.Add(1)
		case StatusInvalid:
			c.invalid.Add(1)
		case StatusCanceled:
			c.canceled.Add(1)
		case StatusDead:
			c.dead.Add(1)
		}
	}
	log.Info("job finished", "status", res.Status, "error", res.Error, "duration_ms", res.DurationMS, "queued_ms", res.QueuedMS)
}

func (r *Runner) deadLetter(ctx context.Context, a *attempt, res Result, log *slog.Logger) {
	dl := DeadLetter{JobID: a.id, Queue: a.queue, Status: res.Status, Code: res.Code, Reason: res.Error,
		Attempts: res.Attempts, WorkerID: r.cfg.WorkerID, Time: res.FinishedAt}
	if body := a.msg.Data(); json.Valid(body) {
		dl.Job = body
	} else {
		dl.JobB64 = base64.StdEncoding.EncodeToString(body)
	}
	data, err := json.Marshal(dl)
	if err == nil {
		_, err = r.js.Publish(ctx, deadSubject(r.cfg.Subjects, a.queue), data)
	}
	if err != nil {
		log.Warn("dead-letter job", "err", err)
	}
}

// infraClass reports whether err is the infrastructure's fault (retried)
// rather than the job's (a result).
func infraClass(err error) bool {
	switch subjects.CodeOf(err) {
	case subjects.CodeInvalidRequest, subjects.CodeSnapshotNotFound:
		return false
	}
	return true
}

// run runs one attempt. It fills res and returns an infrastructure error
// when the attempt should be retried.
func (r *Runner) run(a *attempt, res *Result, log *slog.Logger) error {
	job := a.job
	timeout := time.Duration(job.TimeoutS) * time.Second
	if timeout == 0 {
		timeout = DefaultTimeoutS * time.Second
	}
	base, cancelCause := context.WithCancelCause(r.ctx)
	defer cancelCause(nil)
	ctx, cancel := context.WithTimeout(base, timeout)
	defer cancel()
	stopWatch := r.watch(ctx, a, cancelCause, log)
	defer stopWatch()

	// outcome turns an error of a step into the attempt's outcome.
	outcome := func(what string, err error) error {
		switch {
		case errors.Is(context.Cause(base), errCanceled):
			res.Status, res.Error = StatusCanceled, "canceled while running"
			return nil
		case r.ctx.Err() != nil:
			return fmt.Errorf("%s: %w", what, err)
		case ctx.Err() != nil:
			res.Status, res.Code, res.Error = StatusFailed, subjects.CodeTimeout, fmt.Sprintf("job timed out after %s (%s)", timeout, what)
			return nil
		case infraClass(err):
			return fmt.Errorf("%s: %w", what, err)
		}
		res.Status, res.Code, res.Error = StatusFailed, subjects.CodeOf(err), fmt.Sprintf("%s: %v", what, err)
		return nil
	}

	sb, err := r.cfg.Runtime.Create(ctx, subjects.CreateSandboxRequest{
		TemplateID: job.TemplateID, SnapshotID: job.SnapshotID, Resources: job.Resources,
		TimeoutS: int(timeout/time.Second) + 120, Env: job.Env,
		Metadata: map[string]string{"job_id": a.id, "job_queue": a.queue},
	})
	if err != nil {
		if !infraClass(err) && r.ctx.Err() == nil && context.Cause(base) == nil {
			res.Status, res.Code, res.Error = StatusInvalid, subjects.CodeOf(err), "create sandbox: "+err.Error()
			return nil
		}
		return outcome("create sandbox", err)
	}
	res.SandboxID = sb.SandboxID
	defer func() {
		kctx, kcancel := context.WithTimeout(context.Background(), time.Minute)
		defer kcancel()
		if _, err := r.cfg.Runtime.Kill(kctx, sb.SandboxID); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			log.Warn("kill job sandbox", "sandbox", sb.SandboxID, "err", err)
		}
	}()
	for i, f := range job.Files {
		rep, err := r.cfg.Runtime.Exec(ctx, sb.SandboxID, subjects.ExecRequest{
			Command: `mkdir -p -- "$(dirname -- "$FIRKIN_FILE")" && cat > "$FIRKIN_FILE" && chmod "$FIRKIN_MODE" "$FIRKIN_FILE"`,
			Env:     map[string]string{"FIRKIN_FILE": f.Path, "FIRKIN_MODE": strconv.FormatInt(f.mode, 8)},
			Stdin:   string(f.data),
		})
		what := fmt.Sprintf("files[%d] %s", i, f.Path)
		if err != nil {
			return outcome(what, err)
		}
		if rep.ExitCode != 0 {
			res.Status, res.Error = StatusFailed, fmt.Sprintf("%s: exit %d: %s", what, rep.ExitCode, cut(strings.TrimSpace(rep.Stderr), 512))
			return nil
		}
	}
	failed := false
	for i, c := range job.Commands {
		t0 := time.Now()
		rep, err := r.cfg.Runtime.Exec(ctx, sb.SandboxID, subjects.ExecRequest{
			Command: c.Command, Env: c.Env, Cwd: c.Cwd, User: c.User, Stdin: c.Stdin, TimeoutMS: c.TimeoutMS,
		})
		cr := CommandResult{Command: c.Command, DurationMS: time.Since(t0).Milliseconds()}
		if err != nil {
			// The job's own deadline, a cancel or shutdown, or an
			// infrastructure failure end the attempt; a command that
			// timed out or was refused is the command's result.
			if ctx.Err() != nil || infraClass(err) && !errors.Is(err, errdefs.ErrTimeout) {
				return outcome(fmt.Sprintf("commands[%d]", i), err)
			}
			cr.ExitCode, cr.Error = -1, err.Error()
			cr.TimedOut = errors.Is(err, errdefs.ErrTimeout)
			res.Commands = append(res.Commands, cr)
			failed = true
			if !job.KeepGoing {
				break
			}
			continue
		}
		cr.ExitCode, cr.Signal, cr.CommandID, cr.DurationMS = rep.ExitCode, rep.Signal, rep.CommandID, rep.DurationMS
		cr.LogsDroppedBytes = rep.LogsDroppedBytes
		var t1, t2 bool
		cr.Stdout, cr.StdoutB64, t1 = head(rep.Stdout, rep.StdoutB64)
		cr.Stderr, cr.StderrB64, t2 = head(rep.Stderr, rep.StderrB64)
		cr.Truncated = rep.Truncated || t1 || t2
		res.Commands = append(res.Commands, cr)
		if rep.ExitCode != 0 {
			failed = true
			if !job.KeepGoing {
				break
			}
		}
	}
	if failed {
		res.Status, res.Error = StatusFailed, "a command failed"
		return nil
	}
	if job.Snapshot != nil {
		rec, err := r.cfg.Runtime.Snapshot(ctx, sb.SandboxID, subjects.SnapshotRequest{Name: job.Snapshot.Name})
		if err != nil {
			if errors.Is(err, errdefs.ErrConflict) && context.Cause(base) == nil {
				res.Status, res.Code, res.Error = StatusFailed, subjects.CodeConflict, "snapshot: "+err.Error()
				return nil
			}
			return outcome("snapshot", err)
		}
		res.SnapshotID = rec.SnapshotID
	}
	res.Status = StatusSucceeded
	return nil
}

// watch sends progress acks while an attempt runs and cancels it when a
// cancel marker appears for the job.
func (r *Runner) watch(ctx context.Context, a *attempt, cancel context.CancelCauseFunc, log *slog.Logger) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		progress := time.NewTicker(max(r.cfg.AckWait/3, 100*time.Millisecond))
		defer progress.Stop()
		poll := time.NewTicker(500 * time.Millisecond)
		defer poll.Stop()
		for {
			select {
			case <-done:
				return
			case <-ctx.Done():
				return
			case <-progress.C:
				if err := a.msg.InProgress(); err != nil {
					log.Warn("progress ack", "err", err)
				}
			case <-poll.C:
				gctx, gcancel := context.WithTimeout(ctx, 5*time.Second)
				_, err := r.results.Get(gctx, cancelKey(a.id))
				gcancel()
				if err == nil {
					log.Info("job canceled while running")
					cancel(errCanceled)
					return
				}
			}
		}
	}()
	return func() { close(done); wg.Wait() }
}
