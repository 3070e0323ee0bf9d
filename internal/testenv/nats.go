package testenv

import (
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/embedded"
)

// NATS starts an in-process nats-server with JetStream on a free loopback
// port and returns a connection to it; both end with the test.
func NATS(t testing.TB) *nats.Conn {
	t.Helper()
	srv, err := embedded.Start(embedded.Config{Listen: "127.0.0.1:-1", StoreDir: t.TempDir(), Anonymous: true})
	if err != nil {
		t.Fatalf("testenv: embedded nats: %v", err)
	}
	t.Cleanup(srv.Shutdown)
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		t.Fatalf("testenv: connect: %v", err)
	}
	t.Cleanup(nc.Close)
	return nc
}
