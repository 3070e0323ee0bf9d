package subjects

import "time"

// Cluster subjects, states and messages: membership (heartbeats in the
// firkin_workers KV bucket), firkin.workers.list, placement of creates and
// firkin.worker.<id>.drain.

// Session states besides running, stopping and stopped.
const (
	// StateCreating is the placeholder record that claims a requested
	// sandbox id while its create runs (client_id is the claiming worker).
	StateCreating = "creating"
	// StateLost marks the record of a sandbox whose worker has no live
	// heartbeat: its id is free to be claimed again.
	StateLost = "lost"
)

// EventLost is the lifecycle event kind of a sandbox marked lost.
const EventLost = "lost"

// Worker states in a heartbeat.
const (
	WorkerActive   = "active"   // takes creates and jobs
	WorkerDraining = "draining" // lame duck: takes nothing new, finishes what runs
	WorkerDrained  = "drained"  // nothing of its own left running but sandboxes
)

// ForwardedHeader marks a create one worker forwarded to another (its value
// is the forwarding worker's id): it is never forwarded again.
const ForwardedHeader = "Firkin-Forwarded"

// ListWorkers is <prefix>.workers.list (any one worker answers).
func (s Subjects) ListWorkers() string { return s.Prefix + ".workers.list" }

// WorkerCreate is <prefix>.worker.<id>.sandbox.create: a create for that
// worker only (placement forwards creates there).
func (s Subjects) WorkerCreate(workerID string) string {
	return s.Prefix + ".worker." + workerID + ".sandbox.create"
}

// WorkerDrain is <prefix>.worker.<id>.drain.
func (s Subjects) WorkerDrain(workerID string) string {
	return s.Prefix + ".worker." + workerID + ".drain"
}

// WorkerCapacity is what a worker admits at most.
type WorkerCapacity struct {
	VCPUs     int `json:"vcpus"`
	MemoryMB  int `json:"memory_mb"`
	Sandboxes int `json:"sandboxes"` // active sandboxes plus warm machines
	Jobs      int `json:"jobs"`      // jobs run at once
}

// WorkerLoad is what a worker uses now: the reservations of its active
// sandboxes (jobs' sandboxes included), its warm machines and running jobs.
type WorkerLoad struct {
	VCPUs     int `json:"vcpus"`
	MemoryMB  int `json:"memory_mb"`
	Sandboxes int `json:"sandboxes"`
	Warm      int `json:"warm"`
	Jobs      int `json:"jobs"`
}

// WorkerRecord is a worker's heartbeat: the value of its key (its id) in
// the firkin_workers bucket, and an item of firkin.workers.list.
type WorkerRecord struct {
	WorkerID    string         `json:"worker_id"`
	Version     string         `json:"version,omitempty"`
	Driver      string         `json:"driver,omitempty"`
	Accelerator string         `json:"accelerator,omitempty"`
	State       string         `json:"state"`
	Capacity    WorkerCapacity `json:"capacity"`
	Load        WorkerLoad     `json:"load"`
	StartedAt   time.Time      `json:"started_at"`
	UpdatedAt   time.Time      `json:"updated_at"`
}

// ListWorkersReply is the reply of firkin.workers.list.
type ListWorkersReply struct {
	Workers []WorkerRecord `json:"workers"`
}

// DrainRequest is the body of firkin.worker.<id>.drain.
type DrainRequest struct {
	// Wait answers only once the worker is drained (or TimeoutS passed).
	Wait bool `json:"wait,omitempty"`
	// TimeoutS is how long running jobs may go on before they are handed
	// back to the queue (default 300, at most 3600).
	TimeoutS int `json:"timeout_s,omitempty"`
}

// DrainReply is the reply of firkin.worker.<id>.drain.
type DrainReply struct {
	WorkerID string `json:"worker_id"`
	State    string `json:"state"`
	// JobsRunning are the jobs this worker still runs (0 once drained).
	JobsRunning int `json:"jobs_running"`
	// Sandboxes are the sandboxes that keep running on it until they end.
	Sandboxes int `json:"sandboxes"`
}
