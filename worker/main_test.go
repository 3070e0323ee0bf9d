package worker

import (
	"os"
	"testing"

	"github.com/firkin-dev/firkin-worker/jail"
)

// TestMain lets the jail processes of the QEMU machines these tests start
// (re-executions of the test binary) do their work before any test runs.
func TestMain(m *testing.M) {
	jail.Main()
	if dir := os.Getenv(NATSChildEnv); dir != "" {
		os.Exit(natsChild(dir))
	}
	code := m.Run()
	for _, fn := range AfterTests {
		fn()
	}
	os.Exit(code)
}
