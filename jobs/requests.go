package jobs

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	js "github.com/nats-io/nats.go/jetstream"

	"github.com/firkin-dev/firkin-worker/subjects"
)

// subscribe serves <prefix>.jobs.<id>.cancel (queue group: one worker
// records the cancel) and <prefix>.jobs.status (every worker answers) on
// the service connection.
func (r *Runner) subscribe() error {
	p := r.cfg.Subjects.Prefix
	sub, err := r.cfg.Service.QueueSubscribe(p+".jobs.*.cancel", "q", r.onCancel)
	if err != nil {
		return err
	}
	r.subs = append(r.subs, sub)
	if sub, err = r.cfg.Service.Subscribe(p+".jobs.status", r.onStatus); err != nil {
		return err
	}
	r.subs = append(r.subs, sub)
	return r.cfg.Service.Flush()
}

func (r *Runner) unsubscribe() {
	for _, s := range r.subs {
		_ = s.Unsubscribe()
	}
	r.subs = nil
}

// onCancel answers <prefix>.jobs.<job id>.cancel: a job with a result
// answers its status; otherwise a cancel marker is stored in the results
// bucket, so a waiting job is skipped (status canceled) when fetched and a
// running one is stopped by its worker, which polls the marker.
func (r *Runner) onCancel(m *nats.Msg) {
	if r.foreign(m.Reply) {
		return
	}
	id := strings.TrimSuffix(strings.TrimPrefix(m.Subject, r.cfg.Subjects.Prefix+".jobs."), ".cancel")
	if err := ValidateJobID(id); err != nil {
		r.replyError(m, err)
		return
	}
	if len(strings.TrimSpace(string(m.Data))) > 0 {
		var empty struct{}
		if err := subjects.Decode(m.Data, &empty); err != nil {
			r.replyError(m, err)
			return
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if e, err := r.results.Get(ctx, id); err == nil {
		var res Result
		_ = json.Unmarshal(e.Value(), &res)
		r.reply(m, CancelReply{JobID: id, Status: res.Status})
		return
	}
	if _, err := r.results.Put(ctx, cancelKey(id), []byte(time.Now().UTC().Format(time.RFC3339Nano))); err != nil {
		r.replyError(m, err)
		return
	}
	r.reply(m, CancelReply{JobID: id, Status: "cancel_requested"})
}

// onStatus answers <prefix>.jobs.status with this worker's view.
func (r *Runner) onStatus(m *nats.Msg) {
	if r.foreign(m.Reply) {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	reply := StatusReply{WorkerID: r.cfg.WorkerID, Concurrency: r.cfg.Concurrency, Queues: []QueueStatus{}}
	for _, q := range r.cfg.Queues {
		st := QueueStatus{Queue: q}
		if info, err := r.cons[q].Info(ctx); err == nil {
			st.Waiting, st.Running, st.Redelivered = info.NumPending, info.NumAckPending, info.NumRedelivered
		} else {
			st.Error = err.Error()
		}
		r.mu.Lock()
		st.RunningHere = r.running[q]
		r.mu.Unlock()
		c := r.counters[q]
		st.Succeeded, st.Failed, st.Invalid, st.Canceled, st.Dead = c.succeeded.Load(), c.failed.Load(), c.invalid.Load(), c.canceled.Load(), c.dead.Load()
		reply.Queues = append(reply.Queues, st)
	}
	r.reply(m, reply)
}

// foreign reports whether a reply subject names anything but a client
// inbox (the worker never answers into streams, KV or its own subjects).
func (r *Runner) foreign(reply string) bool {
	return reply == "" || !r.cfg.ReplyAllowed(reply)
}

func (r *Runner) reply(m *nats.Msg, v any) {
	data, err := json.Marshal(v)
	if err != nil {
		r.replyError(m, err)
		return
	}
	if err := m.Respond(data); err != nil {
		r.log.Warn("reply", "subject", m.Subject, "err", err)
	}
}

// replyError answers with the contract's error body and headers.
func (r *Runner) replyError(m *nats.Msg, err error) {
	code := subjects.CodeOf(err)
	msg := err.Error()
	if errors.Is(err, js.ErrKeyNotFound) {
		msg = "not found"
	}
	body, _ := json.Marshal(subjects.ErrorBody{Error: subjects.ErrorDetail{Code: code, Message: msg}})
	out := nats.NewMsg(m.Reply)
	out.Data = body
	out.Header.Set("Nats-Service-Error-Code", strconv.Itoa(code.Status()))
	out.Header.Set("Nats-Service-Error", msg)
	out.Header.Set("Firkin-Error-Code", string(code))
	if err := m.RespondMsg(out); err != nil {
		r.log.Warn("reply", "subject", m.Subject, "err", err)
	}
}
