//go:build !darwin

package vz

import (
	"errors"
	"testing"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// TestNewNeedsMacOS: --driver vz fails at start, with a message that says
// what to do.
func TestNewNeedsMacOS(t *testing.T) {
	d, err := New(Config{})
	if d != nil || !errors.Is(err, errdefs.ErrUnsupported) {
		t.Fatalf("New: %v, %v; want ErrUnsupported", d, err)
	}
	if got, want := err.Error(), "the vz driver needs macOS; use --driver qemu"; got != want {
		t.Fatalf("New: %q, want %q", got, want)
	}
}
