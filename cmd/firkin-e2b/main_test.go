package main

import (
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// TestLogURLHidesPassword: the ready line names the NATS server without
// the password a --nats-url may carry.
func TestLogURLHidesPassword(t *testing.T) {
	ns, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, Username: "e2b", Password: "s3cret-pass", NoLog: true, NoSigs: true})
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	t.Cleanup(ns.Shutdown)
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	u := strings.Replace(ns.ClientURL(), "nats://", "nats://e2b:s3cret-pass@", 1)
	nc, err := nats.Connect(u)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	if got := logURL(nc); strings.Contains(got, "s3cret-pass") || !strings.Contains(got, "127.0.0.1") {
		t.Fatalf("logged URL %q", got)
	}
}
