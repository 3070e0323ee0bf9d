package main

import (
	"os"
	"testing"
	"time"
)

func TestParseLevels(t *testing.T) {
	got, err := parseLevels("8, 16,32,64")
	if err != nil || len(got) != 4 || got[0] != 8 || got[3] != 64 {
		t.Fatalf("parseLevels = %v, %v", got, err)
	}
	for _, bad := range []string{"8,4", "0", "x", "8,8", "1000"} {
		if _, err := parseLevels(bad); err == nil {
			t.Errorf("parseLevels(%q) accepted", bad)
		}
	}
}

func TestCPUTicksCountsThisProcess(t *testing.T) {
	pid := os.Getpid()
	before, err := cpuTicks([]int{pid})
	if err != nil {
		t.Fatal(err)
	}
	// Spin for a bounded 300 ms: at least some ticks must be charged.
	end := time.Now().Add(300 * time.Millisecond)
	x := 0
	for time.Now().Before(end) {
		x++
	}
	after, err := cpuTicks([]int{pid})
	if err != nil {
		t.Fatal(err)
	}
	if after <= before {
		t.Fatalf("cpu ticks did not grow after 300 ms of spinning: %d -> %d (%d loops)", before, after, x)
	}
	if _, err := cpuTicks([]int{1 << 30}); err == nil {
		t.Fatal("cpuTicks of a process that does not exist did not fail")
	}
}
