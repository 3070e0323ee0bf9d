package embedded_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	js "github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/firkin-dev/firkin-worker/embedded"
	"github.com/firkin-dev/firkin-worker/jetstream"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// TestDeployPermissionsExample loads deploy/nats/permissions.conf, runs a
// server with it, and checks that the worker user sets up and writes the
// streams and buckets but serves nothing, the worker-service user serves
// requests but may reply only into clients' inboxes, and the product
// service may create and use sandboxes and read logs but not administer the
// worker.
func TestDeployPermissionsExample(t *testing.T) {
	var seeds [2][]byte
	for i, env := range []string{"FIRKIN_WORKER_NKEY", "FIRKIN_WORKER_SERVICE_NKEY"} {
		kp, err := nkeys.CreateUser()
		if err != nil {
			t.Fatal(err)
		}
		pub, _ := kp.PublicKey()
		seeds[i], _ = kp.Seed()
		t.Setenv(env, pub)
	}
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
	// connect connects with the nkey seed and collects the connection's
	// asynchronous errors.
	connect := func(name string, seed []byte, opts ...nats.Option) (*nats.Conn, chan error) {
		t.Helper()
		kp, err := nkeys.FromSeed(seed)
		if err != nil {
			t.Fatal(err)
		}
		pub, _ := kp.PublicKey()
		errs := make(chan error, 64)
		nc, err := nats.Connect(ns.ClientURL(), append(opts, nats.Nkey(pub, kp.Sign),
			nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
				select {
				case errs <- err:
				default:
				}
			}))...)
		if err != nil {
			t.Fatalf("%s user: %v", name, err)
		}
		t.Cleanup(nc.Close)
		return nc, errs
	}
	// violation waits for a permissions violation naming want.
	violation := func(errs chan error, want, what string) {
		t.Helper()
		for deadline := time.After(3 * time.Second); ; {
			select {
			case err := <-errs:
				if errors.Is(err, nats.ErrPermissionViolation) && strings.Contains(err.Error(), want) {
					return
				}
			case <-deadline:
				t.Errorf("%s without a permissions violation", what)
				return
			}
		}
	}

	wnc, wErrs := connect("worker", seeds[0], nats.CustomInboxPrefix(embedded.WorkerInboxPrefix))
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
	// The store connection serves nothing.
	if _, err := wnc.Subscribe("firkin.sandbox.create", func(*nats.Msg) {}); err != nil {
		t.Fatal(err)
	}
	_ = wnc.Flush()
	violation(wErrs, `Permissions Violation for Subscription to "firkin.sandbox.create"`, "the worker user subscribed to firkin.sandbox.create")

	snc, sErrs := connect("worker-service", seeds[1])
	if _, err := snc.Subscribe("firkin.>", func(m *nats.Msg) { _ = m.Respond([]byte("ok")) }); err != nil {
		t.Fatal(err)
	}
	if _, err := snc.Subscribe("$SRV.>", func(m *nats.Msg) { _ = m.Respond([]byte("srv")) }); err != nil {
		t.Fatal(err)
	}
	if err := snc.Flush(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-sErrs:
		t.Fatalf("worker-service subscriptions: %v", err)
	default:
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
		"firkin.jobs.default", "firkin.jobs.status", "firkin.jobs.j1.cancel", "firkin.workers.list",
	} {
		if m, err := pnc.Request(subject, []byte("{}"), 3*time.Second); err != nil || string(m.Data) != "ok" {
			t.Errorf("product request %s: %v", subject, err)
		}
	}
	if m, err := pnc.Request("$SRV.PING.firkin-worker", nil, 3*time.Second); err != nil || string(m.Data) != "srv" {
		t.Errorf("product discovery through the service user: %v", err)
	}

	// Placement: the worker user forwards a create to another worker's own
	// subject with the product's reply subject, and that worker's service
	// user answers the product directly.
	fwd, err := pnc.SubscribeSync("_INBOX.forwarded")
	if err != nil {
		t.Fatal(err)
	}
	_ = pnc.Flush()
	if err := wnc.PublishMsg(&nats.Msg{Subject: "firkin.worker.w1.sandbox.create", Reply: "_INBOX.forwarded", Data: []byte("{}"),
		Header: nats.Header{subjects.ForwardedHeader: {"w2"}}}); err != nil {
		t.Fatal(err)
	}
	if m, err := fwd.NextMsg(3 * time.Second); err != nil || string(m.Data) != "ok" {
		t.Errorf("forwarded create answered to the product: %v", err)
	}
	select {
	case err := <-wErrs:
		t.Errorf("worker user forwards a create: %v", err)
	default:
	}

	// A request naming a KV record or an event subject as its reply subject
	// cannot make the service user write there, nor can it publish there.
	for _, subject := range []string{"$KV.firkin_snapshots.x", "firkin.events.x", "firkin.logs.sb1"} {
		if err := pnc.PublishRequest("firkin.sandbox.create", subject, []byte("{}")); err != nil {
			t.Fatal(err)
		}
		_ = pnc.Flush()
		violation(sErrs, `Permissions Violation for Publish to "`+subject+`"`, "the service user replied to "+subject)
		if err := snc.Publish(subject, []byte("{}")); err != nil {
			t.Fatal(err)
		}
		_ = snc.Flush()
		violation(sErrs, `Permissions Violation for Publish to "`+subject+`"`, "the service user published to "+subject)
	}
	if _, err := store.GetSnapshot(ctx, "x"); err == nil {
		t.Error("snapshot record x written through a reply subject")
	}

	// Job results, published by the worker user, reach the product live.
	results, err := pnc.SubscribeSync("firkin.results.>")
	if err != nil {
		t.Fatal(err)
	}
	_ = pnc.Flush()
	if err := wnc.Publish("firkin.results.j1", []byte(`{"job_id":"j1"}`)); err != nil {
		t.Fatal(err)
	}
	if _, err := results.NextMsg(3 * time.Second); err != nil {
		t.Errorf("product follows job results: %v", err)
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
		"firkin.results.j1", "firkin.jobs.dead.default", "$JS.API.CONSUMER.MSG.NEXT.FIRKIN_JOBS.jobs-default",
		"firkin.worker.w1.drain", "firkin.worker.w1.sandbox.create", "$KV.firkin_workers.w1",
	} {
		if err := pnc.Publish(subject, []byte("{}")); err != nil {
			t.Fatal(err)
		}
		_ = pnc.Flush()
		violation(violations, `Permissions Violation for Publish to "`+subject+`"`, "product published to "+subject)
	}
	if rec, err := store.GetSnapshot(ctx, "s1"); err != nil || rec.SnapshotID != "s1" {
		t.Errorf("snapshot record after the attempts: %+v %v", rec, err)
	}
}
