package backend

import (
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/subjects"
)

func TestLogBudget(t *testing.T) {
	t0 := time.Unix(1000, 0)
	b := newLogBudget(1000, 10_000, t0) // 1000 B/s, bursts of 4000, 10000 in all
	if n, _ := b.take(3000, t0); n != 3000 {
		t.Fatalf("first 3000 bytes: %d pass", n)
	}
	n, why := b.take(3000, t0)
	if n != 1000 || !strings.Contains(why, "rate") {
		t.Fatalf("over the burst: %d pass (%q), want 1000 and a rate reason", n, why)
	}
	if n, _ := b.take(500, t0.Add(time.Second/2)); n != 500 {
		t.Fatalf("after half a second: %d of 500 pass", n)
	}
	// Refills never exceed the burst.
	if n, _ := b.take(10_000, t0.Add(time.Hour)); n != 4000 {
		t.Fatalf("after an hour: %d pass, want the burst of 4000", n)
	}
	// 3000+1000+500+4000 used; 1500 of the total left.
	n, why = b.take(4000, t0.Add(2*time.Hour))
	if n != 1500 || !strings.Contains(why, "10000 bytes in total") {
		t.Fatalf("at the total: %d pass (%q), want 1500", n, why)
	}
	if n, _ := b.take(1, t0.Add(3*time.Hour)); n != 0 {
		t.Fatalf("past the total: %d pass", n)
	}
	unlimited := newLogBudget(-1, -1, t0)
	if n, _ := unlimited.take(1<<30, t0); n != 1<<30 {
		t.Fatalf("no limit: %d pass", n)
	}
}

func TestFitReply(t *testing.T) {
	const max = 64 << 10
	bad := strings.Repeat("\x01<", 20<<10) // 40 KiB that encodes to 240 KiB
	for _, tc := range []struct {
		name string
		r    subjects.ExecReply
	}{
		{"escaped stdout", subjects.ExecReply{Stdout: bad, CommandID: "c"}},
		{"both streams", subjects.ExecReply{Stdout: bad, Stderr: bad}},
		{"base64 and small stderr", subjects.ExecReply{StdoutB64: base64.StdEncoding.EncodeToString([]byte(strings.Repeat("\xff", 100<<10))), Stderr: "tiny"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := tc.r
			fitReply(&r, max)
			b, err := json.Marshal(r)
			if err != nil {
				t.Fatal(err)
			}
			if len(b) > max {
				t.Errorf("reply encodes to %d bytes, bound %d", len(b), max)
			}
			if len(b) < max/2 {
				t.Errorf("reply cut to %d bytes, more than half the room wasted", len(b))
			}
			if !r.Truncated {
				t.Error("a cut reply does not say so")
			}
			if !strings.HasPrefix(tc.r.Stdout, r.Stdout) || !strings.HasPrefix(tc.r.StdoutB64, r.StdoutB64) || len(r.StdoutB64)%4 != 0 {
				t.Error("stdout is not the head of the output")
			}
			if tc.r.Stderr == "tiny" && r.Stderr != "tiny" {
				t.Errorf("small stderr cut to %q", r.Stderr)
			}
		})
	}
	small := subjects.ExecReply{Stdout: "hello", Stderr: "x"}
	fitReply(&small, max)
	if small.Truncated || small.Stdout != "hello" {
		t.Errorf("a small reply changed: %+v", small)
	}
}
