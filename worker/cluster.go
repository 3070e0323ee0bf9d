package worker

import (
	"context"

	"github.com/firkin-dev/firkin-worker/cluster"
	"github.com/firkin-dev/firkin-worker/jetstream"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// joinCluster starts the worker's heartbeat (package cluster): its
// capacity and load from the runtime's admission and the job runner.
func (w *Worker) joinCluster(ctx context.Context, subj subjects.Subjects, driver string) error {
	m, err := cluster.Start(ctx, cluster.Config{
		Subjects: subj, WorkerID: w.id, Version: Version, Driver: driver, Conn: w.storeNC,
		Interval: w.cfg.HeartbeatInterval, SessionsBucket: jetstream.SessionsBucket, Replicas: w.replicas(),
		DrainTimeout: w.cfg.DrainTimeout, Status: w.clusterStatus,
		Jobs: clusterJobs{w}, Warm: w.backend, Rejoined: w.backend.Reconcile, Logger: w.log.With("component", "cluster"),
	})
	if err != nil {
		return err
	}
	w.cluster = m
	return nil
}

func (w *Worker) clusterStatus() cluster.Status {
	c, l := w.backend.Load()
	if r := w.jobsRef.Load(); r != nil {
		l.Jobs = r.Running()
	}
	c.Jobs = w.cfg.JobConcurrency
	if c.Jobs <= 0 {
		c.Jobs = 2
	}
	return cluster.Status{Accelerator: w.backend.Accelerator(), Capacity: c, Load: l}
}

// clusterJobs is the job runner as a drain sees it (it starts after the
// heartbeat).
type clusterJobs struct{ w *Worker }

func (j clusterJobs) Drain(ctx context.Context) error {
	if r := j.w.jobsRef.Load(); r != nil {
		return r.Drain(ctx)
	}
	return nil
}

func (j clusterJobs) Running() int {
	if r := j.w.jobsRef.Load(); r != nil {
		return r.Running()
	}
	return 0
}

// Cluster is the worker's membership (tests).
func (w *Worker) Cluster() *cluster.Membership { return w.cluster }
