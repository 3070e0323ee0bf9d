package embedded_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
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
	t.Setenv("FIRKIN_ADMIN_PASSWORD", "admin-pw")
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

	// The product may read and watch session records (client.WatchJob
	// finds a job's sandbox there), but not write them (below).
	sessions, err := j.KeyValue(ctx, jetstream.SessionsBucket)
	if err != nil {
		t.Fatalf("product binds firkin_sessions: %v", err)
	}
	if _, err := sessions.Get(ctx, "sb1"); !errors.Is(err, js.ErrKeyNotFound) {
		t.Errorf("product reads a session record: %v, want key not found", err)
	}
	w, err := sessions.WatchAll(ctx)
	if err != nil {
		t.Fatalf("product watches firkin_sessions: %v", err)
	}
	select {
	case e := <-w.Updates():
		if e != nil {
			t.Errorf("watch of an empty bucket gave %q", e.Key())
		}
	case <-time.After(5 * time.Second):
		t.Error("product's watch of firkin_sessions gave no initial marker")
	}
	_ = w.Stop()

	for _, subject := range []string{
		"firkin.pool.set", "firkin.template.build", "firkin.snapshot.s1.delete", "firkin.snapshot.work.v2.delete",
		"firkin.logs.sb1", "firkin.events.created.sb1", "$KV.firkin_snapshots.s1",
		"$JS.API.STREAM.PURGE.FIRKIN_LOGS", "$JS.API.STREAM.DELETE.KV_firkin_snapshots",
		"$JS.API.DIRECT.GET.KV_firkin_snapshots", "$JS.API.CONSUMER.CREATE.KV_firkin_snapshots",
		"$KV.firkin_sessions.sb1", "$O.firkin_artifacts.x", "firkin.worker.w1.drain", "firkin.worker.w1.sandbox.create",
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

// TestDeployNATSCluster loads deploy/nats/cluster/n1.conf … n3.conf with
// nats-server's own config loader, checks what they say, moves their ports
// and store directories to free and temporary ones (keeping the topology
// the files give), starts them as a real three-node cluster on 127.0.0.1
// and checks that JetStream gets a meta leader, the worker user makes
// streams, KV buckets and the object store with three replicas, and the
// product user can submit a job but cannot write a KV record or an object.
func TestDeployNATSCluster(t *testing.T) {
	var workerSeed []byte
	for i, env := range []string{"FIRKIN_WORKER_NKEY", "FIRKIN_WORKER_SERVICE_NKEY"} {
		kp, err := nkeys.CreateUser()
		if err != nil {
			t.Fatal(err)
		}
		pub, _ := kp.PublicKey()
		if i == 0 {
			workerSeed, _ = kp.Seed()
		}
		t.Setenv(env, pub)
	}
	t.Setenv("FIRKIN_PRODUCT_PASSWORD", "product-pw")
	t.Setenv("FIRKIN_ADMIN_PASSWORD", "admin-pw")

	const n = 3
	var all [n]*server.Options
	clusterPort := map[int]int{} // configured route port -> free port
	for i := range n {
		name := fmt.Sprintf("n%d", i+1)
		opts, err := server.ProcessConfigFile(fmt.Sprintf("../deploy/nats/cluster/%s.conf", name))
		if err != nil {
			t.Fatalf("deploy/nats/cluster/%s.conf: %v", name, err)
		}
		// What the file says: a one-host trial on loopback.
		if opts.ServerName != name || opts.Cluster.Name != "firkin" || !opts.JetStream ||
			opts.Host != "127.0.0.1" || opts.Port != 4222+i || opts.Cluster.Host != "127.0.0.1" || opts.Cluster.Port != 6222+i ||
			opts.HTTPPort != 8222+i || opts.StoreDir != "/var/lib/nats/"+name || len(opts.Routes) != n-1 {
			t.Fatalf("%s.conf: name %q cluster %q js %v client %s:%d routes %s:%d http %d store %q routes %v",
				name, opts.ServerName, opts.Cluster.Name, opts.JetStream, opts.Host, opts.Port, opts.Cluster.Host, opts.Cluster.Port,
				opts.HTTPPort, opts.StoreDir, opts.Routes)
		}
		for _, r := range opts.Routes {
			p, _ := strconv.Atoi(r.Port())
			if r.Hostname() != "127.0.0.1" || p < 6222 || p >= 6222+n || p == opts.Cluster.Port {
				t.Fatalf("%s.conf: route %s is not another node's route port", name, r)
			}
		}
		var product, admin bool
		for _, u := range opts.Users {
			product = product || u.Username == "product" && u.Account != nil && u.Account.Name == "FIRKIN"
			admin = admin || u.Username == "admin" && u.Account != nil && u.Account.Name == "FIRKIN"
		}
		if !product || !admin || len(opts.Nkeys) != 2 {
			t.Fatalf("%s.conf: users product %v admin %v, %d nkey users", name, product, admin, len(opts.Nkeys))
		}
		clusterPort[opts.Cluster.Port] = freePort(t)
		all[i] = opts
	}
	// The same cluster on free ports and in temporary directories.
	dir := t.TempDir()
	var servers [n]*server.Server
	for i, opts := range all {
		for _, r := range opts.Routes {
			p, _ := strconv.Atoi(r.Port())
			r.Host = fmt.Sprintf("127.0.0.1:%d", clusterPort[p])
		}
		opts.Port, opts.Cluster.Port = -1, clusterPort[opts.Cluster.Port]
		opts.HTTPPort, opts.StoreDir = 0, filepath.Join(dir, opts.ServerName)
		opts.NoSigs, opts.NoLog = true, true
		s, err := server.NewServer(opts)
		if err != nil {
			t.Fatalf("%s: %v", opts.ServerName, err)
		}
		go s.Start()
		t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
		servers[i] = s
	}
	for _, s := range servers {
		if !s.ReadyForConnections(20 * time.Second) {
			t.Fatalf("%s not ready", s.Name())
		}
	}

	violations := make(chan error, 64)
	pnc, err := nats.Connect(servers[0].ClientURL(), nats.UserInfo("product", "product-pw"),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			select {
			case violations <- err:
			default:
			}
		}))
	if err != nil {
		t.Fatalf("product user on n1: %v", err)
	}
	t.Cleanup(pnc.Close)
	pj, _ := js.New(pnc)
	ctx := ctxT(t, 2*time.Minute)
	deadline := time.Now().Add(time.Minute)
	for {
		actx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := pj.AccountInfo(actx)
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no JetStream meta leader after a minute: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	leader := ""
	for _, s := range servers {
		if s.JetStreamIsLeader() {
			leader = s.Name()
		}
		if got := s.NumRoutes(); got < n-1 {
			t.Errorf("%s has %d routes, want at least %d", s.Name(), got, n-1)
		}
	}
	if leader == "" {
		t.Error("no server says it is the JetStream meta leader")
	}

	// The worker user, on n2, sets up what workers set up, with 3 replicas.
	kp, _ := nkeys.FromSeed(workerSeed)
	pub, _ := kp.PublicKey()
	wnc, err := nats.Connect(servers[1].ClientURL(), nats.Nkey(pub, kp.Sign), nats.CustomInboxPrefix(embedded.WorkerInboxPrefix))
	if err != nil {
		t.Fatalf("worker user on n2: %v", err)
	}
	t.Cleanup(wnc.Close)
	wj, _ := js.New(wnc)
	jobsStream, err := wj.CreateOrUpdateStream(ctx, js.StreamConfig{Name: "FIRKIN_JOBS", Subjects: []string{"firkin.jobs.default"},
		Retention: js.WorkQueuePolicy, Duplicates: 10 * time.Minute, Replicas: n})
	if err != nil {
		t.Fatalf("worker creates FIRKIN_JOBS with %d replicas: %v", n, err)
	}
	if got := jobsStream.CachedInfo().Config.Replicas; got != n {
		t.Errorf("FIRKIN_JOBS replicas %d, want %d", got, n)
	}
	sessions, err := wj.CreateOrUpdateKeyValue(ctx, js.KeyValueConfig{Bucket: jetstream.SessionsBucket, Replicas: n})
	if err != nil {
		t.Fatalf("worker creates firkin_sessions with %d replicas: %v", n, err)
	}
	if _, err := sessions.Put(ctx, "sb1", []byte(`{"sandbox_id":"sb1"}`)); err != nil {
		t.Fatalf("worker writes a session record: %v", err)
	}
	objects, err := wj.CreateOrUpdateObjectStore(ctx, js.ObjectStoreConfig{Bucket: "firkin_artifacts", Replicas: n})
	if err != nil {
		t.Fatalf("worker creates the object store firkin_artifacts with %d replicas: %v", n, err)
	}
	if _, err := objects.PutBytes(ctx, "snap/disk", []byte("artifact")); err != nil {
		t.Fatalf("worker puts an artifact: %v", err)
	}

	// The product user, on n1, submits a job: the stream answers with its
	// PubAck once the job is stored on a quorum.
	m := nats.NewMsg("firkin.jobs.default")
	m.Data = []byte(`{"template_id":"tiny","commands":["echo hi"]}`)
	m.Header.Set(nats.MsgIdHdr, "order-1")
	reply, err := pnc.RequestMsgWithContext(ctx, m)
	if err != nil {
		t.Fatalf("product submits a job: %v", err)
	}
	var ack struct {
		Stream string `json:"stream"`
		Seq    uint64 `json:"seq"`
		Error  any    `json:"error"`
	}
	if err := json.Unmarshal(reply.Data, &ack); err != nil || ack.Stream != "FIRKIN_JOBS" || ack.Seq != 1 || ack.Error != nil {
		t.Fatalf("product submits a job: PubAck %s (%v)", reply.Data, err)
	}
	// It reads session records, but cannot put one, nor an object.
	psessions, err := pj.KeyValue(ctx, jetstream.SessionsBucket)
	if err != nil {
		t.Fatalf("product binds firkin_sessions: %v", err)
	}
	if e, err := psessions.Get(ctx, "sb1"); err != nil || !strings.Contains(string(e.Value()), "sb1") {
		t.Errorf("product reads a session record: %v", err)
	}
	for _, subject := range []string{"$KV.firkin_sessions.sb2", "$O.firkin_artifacts.C.x"} {
		if err := pnc.Publish(subject, []byte(`{"forged":true}`)); err != nil {
			t.Fatal(err)
		}
		if err := pnc.Flush(); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-violations:
			if !errors.Is(err, nats.ErrPermissionViolation) || !strings.Contains(err.Error(), subject) {
				t.Errorf("product publish to %s: %v, want a permissions violation", subject, err)
			}
		case <-time.After(3 * time.Second):
			t.Errorf("product published to %s without a permissions violation", subject)
		}
	}
	if _, err := sessions.Get(ctx, "sb2"); !errors.Is(err, js.ErrKeyNotFound) {
		t.Errorf("session record sb2 after the product's attempt: %v, want key not found", err)
	}
	info, err := jobsStream.Info(ctx)
	if err != nil || info.State.Msgs != 1 || info.Cluster == nil || len(info.Cluster.Replicas) != n-1 {
		t.Errorf("FIRKIN_JOBS after the submit: %+v, %v; want 1 job on a leader and %d replicas", info, err, n-1)
	}
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
