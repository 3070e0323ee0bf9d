package main

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/backend"
	"github.com/firkin-dev/firkin-worker/jobs"
)

// jobBurst is the number of jobs in one burst of (k).
const jobBurst = 20

// submitEcho publishes one `echo` job on the default queue (the request
// form: answered once stored) and returns a subscription that receives its
// result.
func (b *bench) submitEcho(id string) (*nats.Subscription, error) {
	sub, err := b.nc.SubscribeSync("firkin.results." + id)
	if err != nil {
		return nil, err
	}
	body := fmt.Sprintf(`{"job_id":%q,"template_id":"tiny","commands":["echo %s"]}`, id, id)
	if _, err := b.nc.Request("firkin.jobs.default", []byte(body), 10*time.Second); err != nil {
		_ = sub.Unsubscribe()
		return nil, fmt.Errorf("submit job %s: %w", id, err)
	}
	return sub, nil
}

// waitResult waits for a job's result on sub and checks it succeeded.
func waitResult(sub *nats.Subscription, id string, timeout time.Duration) error {
	defer sub.Unsubscribe()
	m, err := sub.NextMsg(timeout)
	if err != nil {
		return fmt.Errorf("result of job %s: %w", id, err)
	}
	var res jobs.Result
	if err := json.Unmarshal(m.Data, &res); err != nil {
		return fmt.Errorf("result of job %s: %w", id, err)
	}
	if res.Status != jobs.StatusSucceeded || len(res.Commands) != 1 || res.Commands[0].Stdout != id+"\n" {
		return fmt.Errorf("job %s: %+v", id, res)
	}
	return nil
}

// jobLatency is (j): one job (`tiny`, one echo, pool on) from publish to its
// result, one job at a time.
func (b *bench) jobLatency() (Result, error) {
	if _, err := b.c.SetPool(b.ctx, "tiny", 2); err != nil {
		return Result{}, err
	}
	var samples []float64
	for range b.n {
		if err := b.waitPool("tiny", 2); err != nil {
			return Result{}, err
		}
		id := "bench-" + backend.NewID(10)
		start := time.Now()
		sub, err := b.submitEcho(id)
		if err != nil {
			return Result{}, err
		}
		if err := waitResult(sub, id, 2*time.Minute); err != nil {
			return Result{}, err
		}
		samples = append(samples, ms(time.Since(start)))
	}
	return summarize("(j) job publish -> result (one echo, pool on)", "ms", samples, "", nil), nil
}

// jobThroughput is (k): a burst of echo jobs submitted at once and run by
// one worker (its --job-concurrency, pool on), as jobs per minute; each
// sample is one burst.
func (b *bench) jobThroughput() (Result, error) {
	if _, err := b.c.SetPool(b.ctx, "tiny", 2); err != nil {
		return Result{}, err
	}
	var samples []float64
	for range 3 {
		if err := b.waitPool("tiny", 2); err != nil {
			return Result{}, err
		}
		start := time.Now()
		ids := make([]string, jobBurst)
		subs := make([]*nats.Subscription, jobBurst)
		for i := range ids {
			ids[i] = "bench-" + backend.NewID(10)
			sub, err := b.submitEcho(ids[i])
			if err != nil {
				return Result{}, err
			}
			subs[i] = sub
		}
		for i, sub := range subs {
			if err := waitResult(sub, ids[i], 5*time.Minute); err != nil {
				return Result{}, err
			}
		}
		samples = append(samples, jobBurst/time.Since(start).Minutes())
	}
	return summarize(fmt.Sprintf("(k) jobs per minute (bursts of %d echo jobs, pool on)", jobBurst), "jobs/min", samples, "", nil), nil
}
