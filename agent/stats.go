package agent

import (
	"context"
	"encoding/json"
)

// opStats asks the guest for its resource counters.
const opStats = "stats"

// GuestStats are the guest's own resource counters, as its kernel reports
// them. They are untrusted: the host bounds them (Client.Stats) and uses
// them for reporting only.
type GuestStats struct {
	// CPUBusy and CPUTotal are cumulative clock ticks of all CPUs (from
	// /proc/stat: busy is everything but idle and iowait).
	CPUBusy  uint64 `json:"cpu_busy"`
	CPUTotal uint64 `json:"cpu_total"`
	// MemTotal and MemAvailable are bytes (from /proc/meminfo).
	MemTotal     uint64 `json:"mem_total"`
	MemAvailable uint64 `json:"mem_available"`
	// DiskTotal and DiskUsed are bytes of the root file system.
	DiskTotal uint64 `json:"disk_total"`
	DiskUsed  uint64 `json:"disk_used"`
	// NetRx and NetTx are cumulative bytes of every interface but lo.
	NetRx uint64 `json:"net_rx"`
	NetTx uint64 `json:"net_tx"`
}

// maxGuestCounter bounds every counter the guest reports (2^62: far
// beyond any real value, small enough to add and convert safely).
const maxGuestCounter = 1 << 62

// Stats returns the guest's resource counters, each clamped to 0..2^62.
func (c *Client) Stats(ctx context.Context) (GuestStats, error) {
	reply, err := c.call(ctx, request{Op: opStats}, nil)
	if err != nil {
		return GuestStats{}, err
	}
	var st GuestStats
	if err := json.Unmarshal(reply, &st); err != nil {
		return GuestStats{}, protocolError("stats: bad reply: %w", err)
	}
	for _, p := range []*uint64{&st.CPUBusy, &st.CPUTotal, &st.MemTotal, &st.MemAvailable, &st.DiskTotal, &st.DiskUsed, &st.NetRx, &st.NetTx} {
		*p = min(*p, maxGuestCounter)
	}
	st.CPUBusy = min(st.CPUBusy, st.CPUTotal)
	st.MemAvailable = min(st.MemAvailable, st.MemTotal)
	st.DiskUsed = min(st.DiskUsed, st.DiskTotal)
	return st, nil
}
