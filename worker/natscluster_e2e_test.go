package worker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	js "github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/embedded"
	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/jetstream"
	"github.com/firkin-dev/firkin-worker/jobs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// natsCluster is a real three-node nats-server cluster with JetStream,
// in the test process, on loopback ports, with the worker's nkey users.
type natsCluster struct {
	servers []*server.Server
	// seeds are the nkey seed files of the users: worker, service, client.
	workerSeed, serviceSeed, clientSeed string
}

// startNATSCluster starts n clustered servers and waits for JetStream to
// have a meta leader.
func startNATSCluster(t *testing.T, n int) *natsCluster {
	t.Helper()
	dir := t.TempDir()
	c := &natsCluster{}
	var keys []string
	for _, name := range []string{"worker", "service", "client"} {
		kp, err := nkeys.CreateUser()
		if err != nil {
			t.Fatal(err)
		}
		seed, _ := kp.Seed()
		pub, _ := kp.PublicKey()
		path := filepath.Join(dir, name+".nk")
		if err := os.WriteFile(path, seed, 0o600); err != nil {
			t.Fatal(err)
		}
		keys = append(keys, pub)
		switch name {
		case "worker":
			c.workerSeed = path
		case "service":
			c.serviceSeed = path
		default:
			c.clientSeed = path
		}
	}
	access := embedded.Access{Prefix: "firkin", ReadStreams: jetstream.ReadableStreams()}
	routePorts := make([]int, n)
	for i := range routePorts {
		routePorts[i] = freePort(t)
	}
	for i := 0; i < n; i++ {
		var routes []string
		for j, p := range routePorts {
			if j != i {
				routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", p))
			}
		}
		opts := &server.Options{
			ServerName: fmt.Sprintf("n%d", i+1),
			Host:       "127.0.0.1",
			Port:       -1,
			JetStream:  true,
			StoreDir:   filepath.Join(dir, fmt.Sprintf("n%d", i+1)),
			NoSigs:     true,
			NoLog:      true,
			Nkeys:      access.Users(keys[0], keys[1], keys[2]),
			Cluster: server.ClusterOpts{
				Name: "firkin-test",
				Host: "127.0.0.1",
				Port: routePorts[i],
			},
			Routes: server.RoutesFromStr(strings.Join(routes, ",")),
		}
		s, err := server.NewServer(opts)
		if err != nil {
			t.Fatal(err)
		}
		go s.Start()
		if !s.ReadyForConnections(20 * time.Second) {
			t.Fatalf("nats server n%d not ready", i+1)
		}
		c.servers = append(c.servers, s)
		t.Cleanup(s.Shutdown)
	}
	nc := c.connect(t, c.clientSeed)
	j, err := js.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, time.Minute, "a JetStream meta leader", func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, err := j.AccountInfo(ctx)
		return err
	})
	return c
}

// url lists the client URLs of the servers that are still running.
func (c *natsCluster) url() string {
	var urls []string
	for _, s := range c.servers {
		if s.Running() {
			urls = append(urls, s.ClientURL())
		}
	}
	return strings.Join(urls, ",")
}

func (c *natsCluster) connect(t *testing.T, seed string) *nats.Conn {
	t.Helper()
	opt, err := nats.NkeyOptionFromSeed(seed)
	if err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(c.url(), opt, nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// clusterWorker is one worker process joined to the cluster.
type clusterWorker struct {
	*process
	state string
}

// startClusterWorker starts the worker binary as a member of the cluster,
// with the shared secret.
func startClusterWorker(t *testing.T, bin string, c *natsCluster, secretFile string, extra ...string) clusterWorker {
	t.Helper()
	state := t.TempDir()
	shareDebCache(t, state)
	args := append([]string{"--state-dir", state, "--nats-url", c.url(),
		"--nats-nkey", c.workerSeed, "--nats-service-nkey", c.serviceSeed,
		"--token-secret-file", secretFile, "--proxy-listen", "127.0.0.1:0",
		"--agent", testenv.AgentBinary(t, runtime.GOARCH), "--accel", "tcg", "--keep-machines=false", "--log-level", "debug"}, extra...)
	p := startBinary(t, bin, args...)
	t.Cleanup(func() { killMachines(state) })
	return clusterWorker{process: p, state: state}
}

// TestNATSCluster runs two worker processes on a real three-node NATS cluster:
// both serve creates and jobs, and the system goes on when a NATS node dies.
func TestNATSCluster(t *testing.T) {
	testenv.RequireQEMU(t, runtime.GOARCH)
	c := startNATSCluster(t, 3)
	bin := workerBinary(t)
	secret := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secret, []byte("cluster-test-secret-0123456789abcdef\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	member := []string{"--pool", "tiny=1", "--max-sandboxes", "4", "--heartbeat-interval", "1s"}
	startClusterWorker(t, bin, c, secret, member...)
	startClusterWorker(t, bin, c, secret, member...)

	nc := c.connect(t, c.clientSeed)
	cl := client.New(nc)
	ctx := func(d time.Duration) context.Context {
		ctx, cancel := context.WithTimeout(context.Background(), d)
		t.Cleanup(cancel)
		return ctx
	}

	// Both workers are members and answer the every-worker subjects.
	var members subjects.ListWorkersReply
	eventually(t, 30*time.Second, "two members", func() error {
		if err := cl.Request(ctx(10*time.Second), subjects.Default.ListWorkers(), struct{}{}, &members); err != nil {
			return err
		}
		if len(members.Workers) != 2 {
			return fmt.Errorf("members %+v", members.Workers)
		}
		return nil
	})
	if workers := poolStatusReplies(t, nc); len(workers) != 2 {
		t.Fatalf("pool.status answered by %v, want two workers", workers)
	}

	// The streams and buckets are replicated on the cluster.
	j, err := js.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{jetstream.LogStream, "KV_" + jetstream.SessionsBucket, "KV_" + jobs.ResultsBucket, jobs.DeadStream} {
		info, err := j.Stream(ctx(10*time.Second), name)
		if err != nil {
			t.Fatalf("stream %s: %v", name, err)
		}
		if r := info.CachedInfo().Config.Replicas; r != 3 {
			t.Errorf("stream %s has %d replicas, want 3", name, r)
		}
	}

	// Creates spread over both (placement on the members' loads); execs
	// reach each owner.
	owners := map[string]int{}
	var ids []string
	for i := 0; i < 4; i++ {
		sb, err := cl.Create(ctx(3*time.Minute), subjects.CreateSandboxRequest{TemplateID: "tiny"})
		if err != nil {
			t.Fatalf("create %d: %v", i, err)
		}
		owners[sb.ClientID]++
		ids = append(ids, sb.SandboxID)
		out, err := cl.Exec(ctx(time.Minute), sb.SandboxID, subjects.ExecRequest{Command: "echo hi-" + sb.SandboxID})
		if err != nil || out.ExitCode != 0 || out.Stdout != "hi-"+sb.SandboxID+"\n" {
			t.Fatalf("exec on %s: %+v %v", sb.ClientID, out, err)
		}
		time.Sleep(1500 * time.Millisecond) // the next heartbeat carries the new load
	}
	t.Logf("creates per worker: %v", owners)
	if len(owners) != 2 {
		t.Errorf("creates per worker %v: want both workers used", owners)
	}
	for _, id := range ids {
		if err := cl.Kill(ctx(time.Minute), id); err != nil {
			t.Fatal(err)
		}
	}

	// One NATS node dies; creates, execs and jobs go on.
	t.Logf("the client is on %s; node n1 (%s) goes down", nc.ConnectedUrl(), c.servers[0].ClientURL())
	c.servers[0].Shutdown()
	c.servers[0].WaitForShutdown()
	eventually(t, 30*time.Second, "the client on a live node", func() error {
		if !nc.IsConnected() {
			return fmt.Errorf("client %s", nc.Status())
		}
		return nil
	})
	// A request sent while the client moved may be lost with the node it
	// was sent to (core NATS is at most once): a client retries.
	var sb subjects.Sandbox
	eventually(t, 3*time.Minute, "a create with a node down", func() error {
		var err error
		sb, err = cl.Create(ctx(45*time.Second), subjects.CreateSandboxRequest{TemplateID: "tiny"})
		if err != nil {
			t.Logf("create with a node down: %v (client on %s)", err, nc.ConnectedUrl())
		}
		return err
	})
	if out, err := cl.Exec(ctx(time.Minute), sb.SandboxID, subjects.ExecRequest{Command: "echo still"}); err != nil || out.Stdout != "still\n" {
		t.Fatalf("exec with a node down: %+v %v", out, err)
	}
	m := nats.NewMsg("firkin.jobs.default")
	m.Data = []byte(`{"job_id":"cluster-1","template_id":"tiny","commands":["echo job-done"]}`)
	if reply, err := nc.RequestMsg(m, 20*time.Second); err != nil || !strings.Contains(string(reply.Data), `"seq"`) {
		t.Fatalf("submit a job with a node down: %v %v", reply, err)
	}
	kv, err := j.KeyValue(ctx(10*time.Second), jobs.ResultsBucket)
	if err != nil {
		t.Fatal(err)
	}
	var res jobs.Result
	eventually(t, 2*time.Minute, "the job's result with a node down", func() error {
		entry, err := kv.Get(context.Background(), "cluster-1")
		if err != nil {
			return err
		}
		return json.Unmarshal(entry.Value(), &res)
	})
	if res.Status != jobs.StatusSucceeded || len(res.Commands) != 1 || res.Commands[0].Stdout != "job-done\n" {
		t.Fatalf("job result = %+v", res)
	}
	if err := cl.Kill(ctx(time.Minute), sb.SandboxID); err != nil {
		t.Fatal(err)
	}

	// Drain one worker: it says drained, and creates go to the other.
	drained, other := members.Workers[0].WorkerID, members.Workers[1].WorkerID
	var dr subjects.DrainReply
	if err := cl.Request(ctx(2*time.Minute), subjects.Default.WorkerDrain(drained), subjects.DrainRequest{Wait: true, TimeoutS: 60}, &dr); err != nil {
		t.Fatalf("drain %s: %v", drained, err)
	}
	if dr.State != subjects.WorkerDrained {
		t.Fatalf("drain reply %+v", dr)
	}
	time.Sleep(1500 * time.Millisecond) // the drained state is in the next heartbeat
	for i := 0; i < 3; i++ {
		sb, err := cl.Create(ctx(3*time.Minute), subjects.CreateSandboxRequest{TemplateID: "tiny"})
		if err != nil {
			t.Fatalf("create after the drain: %v", err)
		}
		if sb.ClientID != other {
			t.Errorf("create after draining %s went to %s, want %s", drained, sb.ClientID, other)
		}
		if err := cl.Kill(ctx(time.Minute), sb.SandboxID); err != nil {
			t.Fatal(err)
		}
	}
}

// poolStatusReplies sends firkin.pool.status once and collects the worker
// ids of every reply that comes within two seconds.
func poolStatusReplies(t *testing.T, nc *nats.Conn) []string {
	t.Helper()
	inbox := nc.NewRespInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := nc.PublishRequest("firkin.pool.status", inbox, []byte("{}")); err != nil {
		t.Fatal(err)
	}
	var ids []string
	deadline := time.Now().Add(2 * time.Second)
	for i := 0; i < 16; i++ {
		m, err := sub.NextMsg(time.Until(deadline))
		if err != nil {
			break
		}
		var st subjects.PoolStatusReply
		if err := json.Unmarshal(m.Data, &st); err != nil {
			t.Fatalf("pool.status reply %q: %v", m.Data, err)
		}
		ids = append(ids, st.WorkerID)
	}
	return ids
}
