package vz_test

import (
	"os"
	"testing"

	"github.com/firkin-dev/firkin-worker/jail"
)

// TestMain lets the jail processes of the QEMU machines these tests start
// (re-executions of the test binary) do their work before any test runs.
func TestMain(m *testing.M) {
	jail.Main()
	os.Exit(m.Run())
}
