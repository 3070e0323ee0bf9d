package embedded_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	js "github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"github.com/nats-io/nkeys"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/embedded"
	"github.com/firkin-dev/firkin-worker/jetstream"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// authEnv is an embedded server with the worker's two users, the worker's
// streams and buckets set up through the worker identity, and a client
// connected with the client identity.
type authEnv struct {
	url        string
	dir        string
	worker     *nats.Conn // the store connection's identity
	service    *nats.Conn // the service connection's identity
	store      *jetstream.Store
	client     *nats.Conn
	violations chan error // the client's asynchronous permission errors
}

func startAuth(t *testing.T) *authEnv {
	t.Helper()
	dir := t.TempDir()
	wk, err := embedded.LoadOrCreateSeed(filepath.Join(dir, "worker.nk"))
	if err != nil {
		t.Fatal(err)
	}
	ck, err := embedded.LoadOrCreateSeed(filepath.Join(dir, "client.nk"))
	if err != nil {
		t.Fatal(err)
	}
	sk, err := embedded.LoadOrCreateSeed(filepath.Join(dir, "service.nk"))
	if err != nil {
		t.Fatal(err)
	}
	wpub, _ := wk.PublicKey()
	spub, _ := sk.PublicKey()
	cpub, _ := ck.PublicKey()
	access := embedded.Access{Prefix: "firkin", ReadStreams: jetstream.ReadableStreams()}
	srv, err := embedded.Start(embedded.Config{Listen: "127.0.0.1:-1", StoreDir: filepath.Join(dir, "nats"), Users: access.Users(wpub, spub, cpub)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Shutdown)
	e := &authEnv{url: srv.ClientURL(), dir: dir, violations: make(chan error, 64)}
	e.worker, err = nats.Connect(e.url, nats.Nkey(wpub, wk.Sign), nats.CustomInboxPrefix(embedded.WorkerInboxPrefix))
	if err != nil {
		t.Fatalf("worker identity refused: %v", err)
	}
	t.Cleanup(e.worker.Close)
	e.service, err = nats.Connect(e.url, nats.Nkey(spub, sk.Sign))
	if err != nil {
		t.Fatalf("service identity refused: %v", err)
	}
	t.Cleanup(e.service.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if e.store, err = jetstream.Open(ctx, e.worker, jetstream.Config{Subjects: subjects.Default}); err != nil {
		t.Fatalf("worker sets up streams and buckets: %v", err)
	}
	e.client, err = nats.Connect(e.url, client.NkeyFile(filepath.Join(dir, "client.nk")),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			select {
			case e.violations <- err:
			default:
			}
		}))
	if err != nil {
		t.Fatalf("client identity refused: %v", err)
	}
	t.Cleanup(e.client.Close)
	return e
}

// wantViolation waits for the server's permissions violation naming subject.
func (e *authEnv) wantViolation(t *testing.T, kind, subject string) {
	t.Helper()
	want := `Permissions Violation for ` + kind + ` to "` + subject + `"`
	deadline := time.After(3 * time.Second)
	for {
		select {
		case err := <-e.violations:
			if errors.Is(err, nats.ErrPermissionViolation) && strings.Contains(err.Error(), want) {
				return
			}
		case <-deadline:
			t.Errorf("no %q from the server", want)
			return
		}
	}
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestAuthRefusesAnonymousAndStrangers(t *testing.T) {
	e := startAuth(t)
	if nc, err := nats.Connect(e.url); !errors.Is(err, nats.ErrAuthorization) {
		if nc != nil {
			nc.Close()
		}
		t.Errorf("anonymous connect: %v, want an authorization violation", err)
	}
	stranger, _ := nkeys.CreateUser()
	pub, _ := stranger.PublicKey()
	if nc, err := nats.Connect(e.url, nats.Nkey(pub, stranger.Sign)); !errors.Is(err, nats.ErrAuthorization) {
		if nc != nil {
			nc.Close()
		}
		t.Errorf("unknown nkey: %v, want an authorization violation", err)
	}
	missing := filepath.Join(e.dir, "missing.nk")
	if nc, err := nats.Connect(e.url, client.NkeyFile(missing)); err == nil || !strings.Contains(err.Error(), missing) {
		if nc != nil {
			nc.Close()
		}
		t.Errorf("client.NkeyFile of a missing file: %v", err)
	}
}

// TestClientMayUseTheAPIAndReadState: requests to firkin.*, micro discovery,
// KV reads and watches, and an ordered consumer on the log stream all work
// with the client identity.
func TestClientMayUseTheAPIAndReadState(t *testing.T) {
	e := startAuth(t)
	svc, err := micro.AddService(e.service, micro.Config{Name: "firkin-worker", Version: "0.1.0"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = svc.Stop() })
	if err := svc.AddEndpoint("create", micro.HandlerFunc(func(r micro.Request) { _ = r.Respond([]byte(`{"ok":true}`)) }),
		micro.WithEndpointSubject(subjects.Default.CreateSandbox())); err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t, 20*time.Second)
	if err := e.store.PutSession(ctx, subjects.Sandbox{SandboxID: "sb1", State: subjects.StateRunning}); err != nil {
		t.Fatalf("worker writes KV: %v", err)
	}
	if err := e.store.CreateSnapshot(ctx, subjects.SnapshotRecord{SnapshotID: "snap1", Kind: subjects.KindTemplate}); err != nil {
		t.Fatalf("worker writes KV: %v", err)
	}
	logs := e.store.Logs("sb1")
	logs.Publish(subjects.LogEvent{SandboxID: "sb1", Message: "hello"})
	if err := logs.Flush(ctx); err != nil {
		t.Fatalf("worker publishes logs: %v", err)
	}
	if err := e.store.PublishEvent(ctx, subjects.LifecycleEvent{Kind: "created", SandboxID: "sb1"}); err != nil {
		t.Fatalf("worker publishes events: %v", err)
	}
	if r, err := e.store.ReadLogs(ctx, "sb1", 0, 10); err != nil || len(r.Events) != 1 {
		t.Fatalf("worker reads logs: %+v %v", r, err)
	}

	msg, err := e.client.RequestWithContext(ctx, subjects.Default.CreateSandbox(), []byte(`{"template_id":"tiny"}`))
	if err != nil || string(msg.Data) != `{"ok":true}` {
		t.Fatalf("client request firkin.sandbox.create: %v %v", msg, err)
	}
	if msg, err = e.client.RequestWithContext(ctx, "$SRV.PING", nil); err != nil || !strings.Contains(string(msg.Data), "firkin-worker") {
		t.Fatalf("client $SRV.PING: %v %v", msg, err)
	}

	j, err := js.New(e.client)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := j.KeyValue(ctx, jetstream.SnapshotsBucket)
	if err != nil {
		t.Fatalf("client binds KV: %v", err)
	}
	entry, err := kv.Get(ctx, "snap1")
	if err != nil || !strings.Contains(string(entry.Value()), "snap1") {
		t.Fatalf("client KV Get: %v %v", entry, err)
	}
	keys, err := kv.Keys(ctx) // a watch: ordered push consumer with flow control
	if err != nil || len(keys) != 1 || keys[0] != "snap1" {
		t.Fatalf("client KV Keys: %v %v", keys, err)
	}
	sessions, err := j.KeyValue(ctx, jetstream.SessionsBucket)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sessions.Get(ctx, "sb1"); err != nil {
		t.Fatalf("client reads sessions: %v", err)
	}
	names := j.StreamNames(ctx) // nats kv ls / stream ls
	n := 0
	for range names.Name() {
		n++
	}
	if names.Err() != nil || n != 6 { // logs, events, metrics, the sessions and snapshots buckets, the config bucket
		t.Fatalf("client lists streams: %d %v", n, names.Err())
	}

	for _, stream := range []string{jetstream.LogStream, jetstream.EventStream} {
		cons, err := j.OrderedConsumer(ctx, stream, js.OrderedConsumerConfig{})
		if err != nil {
			t.Fatalf("client ordered consumer on %s: %v", stream, err)
		}
		batch, err := cons.Fetch(1, js.FetchMaxWait(3*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		got := 0
		for range batch.Messages() {
			got++
		}
		if got != 1 || batch.Error() != nil {
			t.Fatalf("client reads %s: %d messages, %v", stream, got, batch.Error())
		}
	}
	// Live logs over core NATS.
	sub, err := e.client.SubscribeSync(subjects.Default.LogsAll())
	if err != nil {
		t.Fatal(err)
	}
	if err := e.client.Flush(); err != nil { // the subscription is in place before the publish
		t.Fatal(err)
	}
	logs.Publish(subjects.LogEvent{SandboxID: "sb1", Message: "live"})
	if err := logs.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := sub.NextMsg(3 * time.Second); err != nil {
		t.Fatalf("client follows logs live: %v", err)
	}
	// Job results and dead letters, published by the worker, live.
	for _, subject := range []string{"firkin.results.job-1", "firkin.jobs.dead.default"} {
		live, err := e.client.SubscribeSync(subject)
		if err != nil {
			t.Fatal(err)
		}
		if err := e.client.Flush(); err != nil {
			t.Fatal(err)
		}
		if err := e.worker.Publish(subject, []byte(`{"job_id":"job-1"}`)); err != nil {
			t.Fatal(err)
		}
		if _, err := live.NextMsg(3 * time.Second); err != nil {
			t.Fatalf("client follows %s: %v", subject, err)
		}
	}
	select {
	case err := <-e.violations:
		t.Fatalf("unexpected permissions error: %v", err)
	default:
	}
}

// TestClientMayNotWrite: the client identity cannot publish logs, events or
// results, write KV records, purge, delete or change streams, read the
// worker's replies, serve the API, or consume a stream it may not read.
func TestClientMayNotWrite(t *testing.T) {
	e := startAuth(t)
	ctx := ctxT(t, 30*time.Second)
	if err := e.store.CreateSnapshot(ctx, subjects.SnapshotRecord{SnapshotID: "snap1", Kind: subjects.KindTemplate}); err != nil {
		t.Fatal(err)
	}
	logs := e.store.Logs("sb1")
	logs.Publish(subjects.LogEvent{SandboxID: "sb1", Message: "kept"})
	if err := logs.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	// A stream holding the worker's own work (as jobs will): clients may
	// not consume it.
	wj, _ := js.New(e.worker)
	if _, err := wj.CreateStream(ctx, js.StreamConfig{Name: "FIRKIN_JOBS", Subjects: []string{"firkin.jobs.>"}, Retention: js.WorkQueuePolicy}); err != nil {
		t.Fatal(err)
	}

	for _, subject := range []string{
		"firkin.logs.sb1", "firkin.logs.build.tiny", "firkin.events.created.sb1", "firkin.results.x", "firkin.jobs.dead.default",
		"$KV.firkin_snapshots.snap1", "$KV.firkin_sessions.sb1",
		"$JS.API.STREAM.PURGE.FIRKIN_LOGS", "$JS.API.STREAM.DELETE.KV_firkin_snapshots",
		"$JS.API.STREAM.MSG.DELETE.FIRKIN_LOGS", "$JS.API.STREAM.UPDATE.FIRKIN_LOGS",
		"$JS.API.STREAM.CREATE.EVIL", "$JS.API.CONSUMER.CREATE.FIRKIN_JOBS",
		"$JS.API.CONSUMER.CREATE.FIRKIN_JOBS.c.firkin.jobs.x", "$JS.API.CONSUMER.DURABLE.CREATE.FIRKIN_JOBS.workers",
		"$JS.API.CONSUMER.MSG.NEXT.FIRKIN_JOBS.workers", "$JS.ACK.FIRKIN_JOBS.workers.1.1.1.1.0",
		"_INBOX.forged", embedded.WorkerInboxPrefix + ".forged",
		"$O.firkin_artifacts.M.x", "$O.firkin_artifacts.C.x",
		"$JS.API.STREAM.INFO.OBJ_firkin_artifacts", "$JS.API.DIRECT.GET.OBJ_firkin_artifacts",
		"$JS.API.CONSUMER.CREATE.OBJ_firkin_artifacts",
	} {
		t.Run("publish "+subject, func(t *testing.T) {
			if err := e.client.Publish(subject, []byte(`{"forged":true}`)); err != nil {
				t.Fatal(err)
			}
			if err := e.client.Flush(); err != nil {
				t.Fatal(err)
			}
			e.wantViolation(t, "Publish", subject)
		})
	}
	// The jetstream package's own calls fail too.
	j, _ := js.New(e.client)
	kv, err := j.KeyValue(ctx, jetstream.SnapshotsBucket)
	if err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, err := kv.Put(short, "snap1", []byte(`{"snapshot_id":"snap1","location":"/etc"}`)); err == nil {
		t.Error("client KV Put succeeded")
	}
	if err := j.DeleteStream(short, jetstream.LogStream); err == nil {
		t.Error("client deleted the log stream")
	}
	if _, err := j.OrderedConsumer(short, "FIRKIN_JOBS", js.OrderedConsumerConfig{}); err == nil {
		t.Error("client consumed the worker's work stream")
	}
	// The snapshot artifacts' object store is the workers' alone.
	wobs, err := wj.CreateOrUpdateObjectStore(ctx, js.ObjectStoreConfig{Bucket: "firkin_artifacts"})
	if err != nil {
		t.Fatalf("worker sets up the object store: %v", err)
	}
	if _, err := wobs.PutString(ctx, "s/g/mem", "guest memory"); err != nil {
		t.Fatalf("worker puts an object: %v", err)
	}
	if got, err := wobs.GetString(ctx, "s/g/mem"); err != nil || got != "guest memory" {
		t.Fatalf("worker gets its object: %q %v", got, err)
	}
	if obs, err := j.ObjectStore(short, "firkin_artifacts"); err == nil {
		if _, err := obs.GetString(short, "s/g/mem"); err == nil {
			t.Error("client read an object")
		}
		if _, err := obs.PutString(short, "s/g/mem", "forged"); err == nil {
			t.Error("client put an object")
		}
	}
	if got, err := wobs.GetString(ctx, "s/g/mem"); err != nil || got != "guest memory" {
		t.Fatalf("object after the client's attempts: %q %v", got, err)
	}
	// Nothing changed.
	entry, err := e.store.GetSnapshot(ctx, "snap1")
	if err != nil || entry.SnapshotID != "snap1" {
		t.Fatalf("snapshot record after the attempts: %+v %v", entry, err)
	}
	if r, err := e.store.ReadLogs(ctx, "sb1", 0, 10); err != nil || len(r.Events) != 1 || r.Events[0].Message != "kept" {
		t.Fatalf("log stream after the attempts: %+v %v", r, err)
	}

	for _, subject := range []string{"firkin.sandbox.create", "firkin.>", "$SRV.>", embedded.WorkerInboxPrefix + ".>", "$KV.>"} {
		t.Run("subscribe "+subject, func(t *testing.T) {
			if _, err := e.client.SubscribeSync(subject); err != nil {
				t.Fatal(err)
			}
			if err := e.client.Flush(); err != nil {
				t.Fatal(err)
			}
			e.wantViolation(t, "Subscription", subject)
		})
	}
}

func TestLoadOrCreateSeed(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "client.nk")
	kp, err := embedded.LoadOrCreateSeed(path)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("seed file: %v %v, want mode 0600", fi.Mode(), err)
	}
	data, _ := os.ReadFile(path)
	if !strings.HasPrefix(string(data), "SU") {
		t.Errorf("seed file holds %q, want a bare user seed", data)
	}
	again, err := embedded.LoadOrCreateSeed(path)
	if err != nil {
		t.Fatal(err)
	}
	p1, _ := kp.PublicKey()
	p2, _ := again.PublicKey()
	if p1 != p2 {
		t.Errorf("second start made a new identity: %s, %s", p1, p2)
	}
	if leftovers, _ := filepath.Glob(filepath.Join(dir, ".*tmp*")); len(leftovers) > 0 {
		t.Errorf("temporary files left: %v", leftovers)
	}
	// nats.go reads it as it is (what `nats --nkey` does).
	if _, err := nats.NkeyOptionFromSeed(path); err != nil {
		t.Errorf("nats.go cannot read the seed file: %v", err)
	}

	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := embedded.LoadOrCreateSeed(path); err == nil || !strings.Contains(err.Error(), "others may read it") {
		t.Errorf("world-readable seed: %v", err)
	}
	if err := os.Chmod(path, 0o640); err != nil {
		t.Fatal(err)
	}
	if _, err := embedded.LoadOrCreateSeed(path); err == nil {
		t.Error("group-readable seed accepted")
	}

	account, _ := nkeys.CreateAccount()
	aseed, _ := account.Seed()
	pub, _ := account.PublicKey()
	for name, content := range map[string]string{
		"garbage":      "not a seed\n",
		"account seed": string(aseed) + "\n",
		"public key":   pub + "\n",
		"empty":        "",
	} {
		p := filepath.Join(dir, strings.ReplaceAll(name, " ", "-")+".nk")
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := embedded.LoadOrCreateSeed(p); err == nil {
			t.Errorf("%s accepted as a user seed", name)
		}
	}
	if _, err := embedded.LoadOrCreateSeed(filepath.Join(dir, "missing-dir", "x.nk")); err == nil {
		t.Error("seed in a missing directory: no error")
	}
}

func TestStartNeedsUsersOrAnonymous(t *testing.T) {
	if _, err := embedded.Start(embedded.Config{Listen: "127.0.0.1:-1", StoreDir: t.TempDir()}); err == nil {
		t.Error("a server with no users and no Anonymous started")
	}
	kp, _ := nkeys.CreateUser()
	pub, _ := kp.PublicKey()
	users := embedded.Access{Prefix: "firkin"}.Users(pub, pub, pub)
	if _, err := embedded.Start(embedded.Config{Listen: "127.0.0.1:-1", StoreDir: t.TempDir(), Users: users, Anonymous: true}); err == nil {
		t.Error("Users with Anonymous started")
	}
}

// TestRepliesCannotWriteState: a client that names a stream, KV or event
// subject as the reply of a request gets nothing written there: the service
// connection may publish only into _INBOX.>, and micro's own discovery
// endpoints answer through it too.
func TestRepliesCannotWriteState(t *testing.T) {
	e := startAuth(t)
	svc, err := micro.AddService(e.service, micro.Config{Name: "firkin-worker", Version: "0.1.0"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = svc.Stop() })
	if err := svc.AddEndpoint("status", micro.HandlerFunc(func(r micro.Request) { _ = r.Respond([]byte(`{"forged":true}`)) }),
		micro.WithEndpointSubject("firkin.pool.status")); err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t, 20*time.Second)
	if err := e.store.CreateSnapshot(ctx, subjects.SnapshotRecord{SnapshotID: "snap1", Kind: subjects.KindTemplate}); err != nil {
		t.Fatal(err)
	}
	events, err := e.client.SubscribeSync("firkin.events.>")
	if err != nil {
		t.Fatal(err)
	}
	for _, req := range []struct{ subject, reply string }{
		{"firkin.pool.status", "$KV.firkin_snapshots.snap1"},
		{"firkin.pool.status", "firkin.events.killed.sb1"},
		{"$SRV.PING", "$KV.firkin_snapshots.snap1"},
		{"$SRV.INFO.firkin-worker", "$JS.API.STREAM.PURGE.FIRKIN_LOGS"},
	} {
		if err := e.client.PublishRequest(req.subject, req.reply, nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.client.Flush(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // the service's replies, if any
	rec, err := e.store.GetSnapshot(ctx, "snap1")
	if err != nil || rec.SnapshotID != "snap1" || rec.Kind != subjects.KindTemplate {
		t.Errorf("a reply overwrote the KV record: %+v, %v", rec, err)
	}
	if m, err := events.NextMsg(200 * time.Millisecond); err == nil {
		t.Errorf("a reply was published as an event: %s %q", m.Subject, m.Data)
	}
}
