package embedded_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	js "github.com/nats-io/nats.go/jetstream"

	"github.com/firkin-dev/firkin-worker/embedded"
	"github.com/firkin-dev/firkin-worker/jetstream"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// TestDeployPermissionsExample loads deploy/nats/permissions.conf, runs a
// server with it, and checks that the product service may create and use
// sandboxes and read logs but not administer the worker.
func TestDeployPermissionsExample(t *testing.T) {
	t.Setenv("FIRKIN_WORKER_PASSWORD", "worker-pw")
	t.Setenv("FIRKIN_PRODUCT_PASSWORD", "product-pw")
	opts, err := server.ProcessConfigFile("../deploy/nats/permissions.conf")
	if err != nil {
		t.Fatalf("deploy/nats/permissions.conf: %v", err)
	}
	opts.Host, opts.Port, opts.StoreDir, opts.NoSigs = "127.0.0.1", -1, t.TempDir(), true
	ns, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}

	wnc, err := nats.Connect(ns.ClientURL(), nats.UserInfo("worker", "worker-pw"), nats.CustomInboxPrefix(embedded.WorkerInboxPrefix))
	if err != nil {
		t.Fatalf("worker user: %v", err)
	}
	t.Cleanup(wnc.Close)
	ctx := ctxT(t, 30*time.Second)
	store, err := jetstream.Open(ctx, wnc, jetstream.Config{Subjects: subjects.Default})
	if err != nil {
		t.Fatalf("worker sets up streams and buckets: %v", err)
	}
	logs := store.Logs("sb1")
	logs.Publish(subjects.LogEvent{SandboxID: "sb1", Message: "hello"})
	if err := logs.Flush(ctx); err != nil {
		t.Fatalf("worker publishes logs: %v", err)
	}
	if err := store.CreateSnapshot(ctx, subjects.SnapshotRecord{SnapshotID: "s1", Kind: subjects.KindTemplate}); err != nil {
		t.Fatalf("worker writes KV: %v", err)
	}
	if _, err := wnc.Subscribe("firkin.>", func(m *nats.Msg) { _ = m.Respond([]byte("ok")) }); err != nil {
		t.Fatal(err)
	}
	if err := wnc.Flush(); err != nil {
		t.Fatal(err)
	}

	violations := make(chan error, 64)
	pnc, err := nats.Connect(ns.ClientURL(), nats.UserInfo("product", "product-pw"),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			select {
			case violations <- err:
			default:
			}
		}))
	if err != nil {
		t.Fatalf("product user: %v", err)
	}
	t.Cleanup(pnc.Close)
	if nc, err := nats.Connect(ns.ClientURL()); !errors.Is(err, nats.ErrAuthorization) {
		if nc != nil {
			nc.Close()
		}
		t.Errorf("anonymous client: %v", err)
	}

	for _, subject := range []string{
		"firkin.sandbox.create", "firkin.sandbox.list", "firkin.sandbox.sb1.get", "firkin.sandbox.sb1.exec",
		"firkin.sandbox.sb1.kill", "firkin.sandbox.sb1.snapshot", "firkin.sandbox.sb1.route",
		"firkin.sandbox.sb1.timeout", "firkin.sandbox.sb1.logs", "firkin.snapshot.list",
		"firkin.snapshot.s1.get", "firkin.snapshot.work.v2.get", "firkin.pool.status",
	} {
		if m, err := pnc.Request(subject, []byte("{}"), 3*time.Second); err != nil || string(m.Data) != "ok" {
			t.Errorf("product request %s: %v", subject, err)
		}
	}
	j, _ := js.New(pnc)
	cons, err := j.OrderedConsumer(ctx, jetstream.LogStream, js.OrderedConsumerConfig{})
	if err != nil {
		t.Fatalf("product reads logs: %v", err)
	}
	if m, err := cons.Next(js.FetchMaxWait(3 * time.Second)); err != nil || !strings.Contains(string(m.Data()), "hello") {
		t.Fatalf("product reads logs: %v", err)
	}

	for _, subject := range []string{
		"firkin.pool.set", "firkin.template.build", "firkin.snapshot.s1.delete", "firkin.snapshot.work.v2.delete",
		"firkin.logs.sb1", "firkin.events.created.sb1", "$KV.firkin_snapshots.s1",
		"$JS.API.STREAM.PURGE.FIRKIN_LOGS", "$JS.API.STREAM.DELETE.KV_firkin_snapshots",
		"$JS.API.DIRECT.GET.KV_firkin_sessions", "$JS.API.CONSUMER.CREATE.KV_firkin_sessions",
	} {
		if err := pnc.Publish(subject, []byte("{}")); err != nil {
			t.Fatal(err)
		}
		_ = pnc.Flush()
		want := `Permissions Violation for Publish to "` + subject + `"`
		got := false
		for deadline := time.After(3 * time.Second); !got; {
			select {
			case err := <-violations:
				got = errors.Is(err, nats.ErrPermissionViolation) && strings.Contains(err.Error(), want)
			case <-deadline:
				t.Errorf("product published to %s without a permissions violation", subject)
				got = true
			}
		}
	}
	if rec, err := store.GetSnapshot(ctx, "s1"); err != nil || rec.SnapshotID != "s1" {
		t.Errorf("snapshot record after the attempts: %+v %v", rec, err)
	}
}
