package cluster

import (
	"fmt"

	"github.com/firkin-dev/firkin-worker/subjects"
)

// Placement. Creates reach the workers through a queue group, which hands
// each request to a random member. The member that receives one runs this
// placement step on the heartbeats it last read: it keeps the create when
// it is active and has room, unless another active worker has clearly more
// room (its utilization after the create is lower by at least the margin);
// when it is draining or full it hands the create to the active worker with
// the most room. A handed-over create is published once to that worker's
// own subject (<prefix>.worker.<id>.sandbox.create) with the client's reply
// subject, so the target answers the client directly; it carries
// subjects.ForwardedHeader and is never forwarded again (at most one hop).

// DefaultMargin is the utilization difference (0..1) that counts as
// "clearly more room".
const DefaultMargin = 0.2

// Need is what a create asks of a worker.
type Need struct {
	VCPUs, MemoryMB int
}

// fits reports whether w admits one more sandbox of need (warm machines do
// not count: a create evicts them).
func fits(w subjects.WorkerRecord, need Need) bool {
	c, l := w.Capacity, w.Load
	return l.Sandboxes+1 <= c.Sandboxes && l.VCPUs+need.VCPUs <= c.VCPUs && l.MemoryMB+need.MemoryMB <= c.MemoryMB
}

// utilization is w's highest fraction of sandboxes, vCPUs or memory in use
// once it runs one more sandbox of need.
func utilization(w subjects.WorkerRecord, need Need) float64 {
	c, l := w.Capacity, w.Load
	frac := func(used, capacity int) float64 {
		if capacity <= 0 {
			return 1
		}
		return float64(used) / float64(capacity)
	}
	return max(frac(l.Sandboxes+1, c.Sandboxes), frac(l.VCPUs+need.VCPUs, c.VCPUs), frac(l.MemoryMB+need.MemoryMB, c.MemoryMB))
}

// Choose picks the worker a create of need goes to: "" keeps it on self.
// members are the live heartbeats (self's among them or not; self is the
// receiving worker's own current record). why says what decided.
func Choose(self subjects.WorkerRecord, members []subjects.WorkerRecord, need Need, margin float64) (target, why string) {
	var best *subjects.WorkerRecord
	var bestU float64
	for i := range members {
		m := &members[i]
		if m.WorkerID == self.WorkerID || m.State != subjects.WorkerActive || !fits(*m, need) {
			continue
		}
		u := utilization(*m, need)
		if best == nil || u < bestU || u == bestU && m.WorkerID < best.WorkerID {
			best, bestU = m, u
		}
	}
	selfActive := self.State == subjects.WorkerActive
	switch {
	case best == nil:
		return "", "no other active worker has room"
	case !selfActive:
		return best.WorkerID, fmt.Sprintf("this worker is %s", self.State)
	case !fits(self, need):
		return best.WorkerID, "this worker is full"
	}
	if selfU := utilization(self, need); selfU-bestU >= margin {
		return best.WorkerID, fmt.Sprintf("worker %s has clearly more room (utilization %.2f against %.2f here)", best.WorkerID, bestU, selfU)
	}
	return "", "this worker has room"
}
