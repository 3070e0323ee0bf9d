package subjects

import "time"

// VerbMetrics is firkin.sandbox.<id>.metrics: the sandbox's latest resource
// sample and a short history.
const VerbMetrics = "metrics"

// Metrics is <prefix>.metrics.<id>, where a sandbox's resource samples are
// published (stream FIRKIN_METRICS, short retention).
func (s Subjects) Metrics(id string) string { return s.Prefix + ".metrics." + id }

// MetricsAll is <prefix>.metrics.>, the subjects of the metrics stream.
func (s Subjects) MetricsAll() string { return s.Prefix + ".metrics.>" }

// SandboxMetrics is one resource sample of a sandbox. The host_ fields are
// measured on the host (the machine's hypervisor process and overlay); the
// guest_ fields are what the guest's kernel reports (untrusted, for
// information; bounded). Rates are over interval_ms, since the previous
// sample; counters are cumulative since the guest booted.
type SandboxMetrics struct {
	SandboxID  string    `json:"sandbox_id"`
	At         time.Time `json:"at"`
	IntervalMS int64     `json:"interval_ms,omitempty"`
	// HostCPUPercent is the hypervisor process's CPU use (100 = one host
	// core busy), -1 when unknown.
	HostCPUPercent float64 `json:"host_cpu_percent"`
	// HostRSSBytes is the hypervisor process's resident memory.
	HostRSSBytes uint64 `json:"host_rss_bytes"`
	// HostDiskBytes is the space the sandbox's disk overlay takes on the
	// host.
	HostDiskBytes uint64 `json:"host_disk_bytes"`
	// GuestCPUPercent is the busy share of the guest's CPUs (100 = all
	// busy), -1 when unknown.
	GuestCPUPercent float64 `json:"guest_cpu_percent"`
	GuestMemTotal   uint64  `json:"guest_mem_total_bytes"`
	GuestMemUsed    uint64  `json:"guest_mem_used_bytes"`
	GuestDiskTotal  uint64  `json:"guest_disk_total_bytes"`
	GuestDiskUsed   uint64  `json:"guest_disk_used_bytes"`
	GuestNetRxBytes uint64  `json:"guest_net_rx_bytes"`
	GuestNetTxBytes uint64  `json:"guest_net_tx_bytes"`
	// GuestAt is when the guest_ figures were read from the guest: a
	// quiet sandbox's guest is asked at most once a minute, and the
	// samples between carry its last answer (zero when there is none).
	GuestAt time.Time `json:"guest_at,omitzero"`
	// Error says why the guest's part is missing (the agent did not answer
	// in time).
	Error string `json:"error,omitempty"`
}

// MetricsReply answers firkin.sandbox.<id>.metrics: the latest sample (nil
// before the first) and the history, oldest first.
type MetricsReply struct {
	Latest  *SandboxMetrics  `json:"latest"`
	History []SandboxMetrics `json:"history"`
}
