package backend

import (
	"testing"
	"time"
)

// TestGuestQuiet: only a sandbox whose hypervisor process stayed under the
// quiet share of a core, with a guest answer younger than guestQuietEvery,
// carries the last answer; an unknown host figure always asks the guest.
func TestGuestQuiet(t *testing.T) {
	for _, c := range []struct {
		host float64
		age  time.Duration
		want bool
	}{
		{0.2, 5 * time.Second, true},
		{0, 0, true},
		{quietHostCPUPercent, 5 * time.Second, false},
		{50, 5 * time.Second, false},
		{-1, 5 * time.Second, false}, // first sample, or the process changed
		{0.2, guestQuietEvery, false},
		{0.2, -time.Second, false}, // the clock went back
	} {
		if got := guestQuiet(c.host, c.age); got != c.want {
			t.Errorf("guestQuiet(%v, %v) = %v, want %v", c.host, c.age, got, c.want)
		}
	}
}
