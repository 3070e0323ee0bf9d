package backend

import (
	"testing"

	"github.com/firkin-dev/firkin-worker/subjects"
)

// TestIsForkSnapshot: only a continuation named <its source>-fork-<6> or
// <its source>-forkmem-<6> is an intermediate fork snapshot (deleted once
// unused); a user's snapshot or template never is.
func TestIsForkSnapshot(t *testing.T) {
	cont := subjects.KindContinuation
	for _, tc := range []struct {
		sid, source, kind string
		want              bool
	}{
		{"sb1-fork-abc123", "sb1", cont, true},
		{"sb1-forkmem-abc123", "sb1", cont, true},
		{"sb1-fork-abc123", "sb2", cont, false},       // another sandbox's name
		{"sb1-fork-abc1234", "sb1", cont, false},      // not the worker's suffix
		{"sb1-fork-", "sb1", cont, false},             // no suffix
		{"sb1-pause-abc123", "sb1", cont, false},      // a pause snapshot
		{"sb1-fork-abc123", "sb1", "template", false}, // a template
		{"sb1-fork-abc123", "", cont, false},
		{"mysnap", "sb1", cont, false},
	} {
		rec := subjects.SnapshotRecord{SnapshotID: tc.sid, SourceSandboxID: tc.source, Kind: tc.kind}
		if got := isForkSnapshot(rec); got != tc.want {
			t.Errorf("isForkSnapshot(%q from %q, %s) = %v, want %v", tc.sid, tc.source, tc.kind, got, tc.want)
		}
	}
}
