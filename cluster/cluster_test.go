package cluster

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	js "github.com/nats-io/nats.go/jetstream"

	"github.com/firkin-dev/firkin-worker/embedded"
	"github.com/firkin-dev/firkin-worker/subjects"
)

func worker(id, state string, sandboxes, capSandboxes int) subjects.WorkerRecord {
	now := time.Now().UTC()
	return subjects.WorkerRecord{
		WorkerID: id, State: state, StartedAt: now, UpdatedAt: now,
		Capacity: subjects.WorkerCapacity{VCPUs: 256, MemoryMB: 256 << 10, Sandboxes: capSandboxes, Jobs: 2},
		Load:     subjects.WorkerLoad{VCPUs: sandboxes, MemoryMB: 256 * sandboxes, Sandboxes: sandboxes},
	}
}

func TestChoose(t *testing.T) {
	need := Need{VCPUs: 1, MemoryMB: 256}
	for _, tc := range []struct {
		name    string
		self    subjects.WorkerRecord
		members []subjects.WorkerRecord
		want    string
	}{
		{"alone", worker("a", "active", 0, 4), nil, ""},
		{"equal", worker("a", "active", 1, 4), []subjects.WorkerRecord{worker("b", "active", 1, 4)}, ""},
		{"self listed is skipped", worker("a", "active", 3, 4), []subjects.WorkerRecord{worker("a", "active", 0, 4)}, ""},
		{"clearly more room", worker("a", "active", 2, 4), []subjects.WorkerRecord{worker("b", "active", 0, 4)}, "b"},
		{"one more is clear at 4", worker("a", "active", 1, 4), []subjects.WorkerRecord{worker("b", "active", 0, 4)}, "b"},
		{"not clear at 64", worker("a", "active", 5, 64), []subjects.WorkerRecord{worker("b", "active", 0, 64)}, ""},
		{"clear at 64", worker("a", "active", 20, 64), []subjects.WorkerRecord{worker("b", "active", 2, 64)}, "b"},
		{"self full", worker("a", "active", 4, 4), []subjects.WorkerRecord{worker("b", "active", 3, 4)}, "b"},
		{"all full", worker("a", "active", 4, 4), []subjects.WorkerRecord{worker("b", "active", 4, 4)}, ""},
		{"draining goes anywhere with room", worker("a", "draining", 0, 4), []subjects.WorkerRecord{worker("b", "active", 3, 4)}, "b"},
		{"drained goes elsewhere", worker("a", "drained", 0, 4), []subjects.WorkerRecord{worker("b", "active", 1, 4)}, "b"},
		{"never to a draining one", worker("a", "active", 3, 4), []subjects.WorkerRecord{worker("b", "draining", 0, 4)}, ""},
		{"least loaded of several", worker("a", "active", 3, 4),
			[]subjects.WorkerRecord{worker("b", "active", 2, 4), worker("c", "active", 0, 4), worker("d", "active", 1, 4)}, "c"},
		{"ties by id", worker("a", "draining", 0, 4),
			[]subjects.WorkerRecord{worker("c", "active", 1, 4), worker("b", "active", 1, 4)}, "b"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, why := Choose(tc.self, tc.members, need, DefaultMargin)
			if got != tc.want {
				t.Errorf("Choose = %q (%s), want %q", got, why, tc.want)
			}
			if why == "" {
				t.Error("no reason given")
			}
		})
	}
	// Memory decides when it is the scarce resource.
	self, other := worker("a", "active", 0, 64), worker("b", "active", 0, 64)
	self.Capacity.MemoryMB, other.Capacity.MemoryMB = 16<<10, 16<<10
	self.Load.MemoryMB = 12 << 10
	if got, _ := Choose(self, []subjects.WorkerRecord{other}, Need{VCPUs: 1, MemoryMB: 2048}, DefaultMargin); got != "b" {
		t.Errorf("memory-heavy create stays on a worker with 75%% memory used (got %q)", got)
	}
	if got, _ := Choose(other, []subjects.WorkerRecord{self}, Need{VCPUs: 1, MemoryMB: 8 << 10}, DefaultMargin); got != "" {
		t.Errorf("create sent to a worker it does not fit (got %q)", got)
	}
}

func TestDecodeRecord(t *testing.T) {
	good := worker("w1", "active", 1, 4)
	enc := func(r subjects.WorkerRecord) []byte { b, _ := json.Marshal(r); return b }
	if _, err := DecodeRecord("w1", enc(good)); err != nil {
		t.Fatalf("good record refused: %v", err)
	}
	// Unknown fields of a newer worker are accepted.
	withExtra := strings.Replace(string(enc(good)), "{", `{"zone":"eu",`, 1)
	if _, err := DecodeRecord("w1", []byte(withExtra)); err != nil {
		t.Errorf("record with an unknown field refused: %v", err)
	}
	mod := func(f func(*subjects.WorkerRecord)) []byte { r := good; f(&r); return enc(r) }
	for name, tc := range map[string]struct {
		key  string
		data []byte
	}{
		"other key":          {"w2", enc(good)},
		"bad id":             {"W.1", mod(func(r *subjects.WorkerRecord) { r.WorkerID = "W.1" })},
		"wildcard id":        {"w>", mod(func(r *subjects.WorkerRecord) { r.WorkerID = "w>" })},
		"empty id":           {"", mod(func(r *subjects.WorkerRecord) { r.WorkerID = "" })},
		"bad state":          {"w1", mod(func(r *subjects.WorkerRecord) { r.State = "zombie" })},
		"negative load":      {"w1", mod(func(r *subjects.WorkerRecord) { r.Load.Sandboxes = -1 })},
		"huge capacity":      {"w1", mod(func(r *subjects.WorkerRecord) { r.Capacity.VCPUs = 1 << 40 })},
		"control characters": {"w1", mod(func(r *subjects.WorkerRecord) { r.Version = "1\x1b[2J" })},
		"long driver":        {"w1", mod(func(r *subjects.WorkerRecord) { r.Driver = strings.Repeat("q", 65) })},
		"no times":           {"w1", mod(func(r *subjects.WorkerRecord) { r.UpdatedAt = time.Time{} })},
		"too big":            {"w1", []byte(`{"worker_id":"w1","x":"` + strings.Repeat("a", MaxRecordBytes) + `"}`)},
		"not json":           {"w1", []byte("w1 is alive")},
	} {
		if _, err := DecodeRecord(tc.key, tc.data); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// startNATS starts an embedded nats-server with JetStream for one test.
func startNATS(t *testing.T) string {
	t.Helper()
	srv, err := embedded.Start(embedded.Config{Listen: "127.0.0.1:-1", StoreDir: t.TempDir(), Anonymous: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Shutdown)
	return srv.ClientURL()
}

func connect(t *testing.T, url string) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// fakeStatus is a worker's reported load (pure logic: what is tested is
// what membership does with it).
type fakeStatus struct{ sandboxes atomic.Int64 }

func (f *fakeStatus) status() Status {
	n := int(f.sandboxes.Load())
	return Status{Accelerator: "tcg", Capacity: subjects.WorkerCapacity{VCPUs: 8, MemoryMB: 8192, Sandboxes: 4, Jobs: 2},
		Load: subjects.WorkerLoad{VCPUs: n, MemoryMB: 256 * n, Sandboxes: n}}
}

func startMember(t *testing.T, nc *nats.Conn, id string, st *fakeStatus, opts ...func(*Config)) *Membership {
	t.Helper()
	cfg := Config{WorkerID: id, Version: "test", Driver: "qemu", Conn: nc, Interval: 100 * time.Millisecond, Status: st.status}
	for _, o := range opts {
		o(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err := Start(ctx, cfg)
	if err != nil {
		t.Fatalf("start %s: %v", id, err)
	}
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { _ = m.Stop(context.Background()) }) })
	return m
}

func sessionsBucket(t *testing.T, nc *nats.Conn) js.KeyValue {
	t.Helper()
	j, _ := js.New(nc)
	kv, err := j.CreateOrUpdateKeyValue(context.Background(), js.KeyValueConfig{Bucket: "firkin_sessions"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := j.CreateOrUpdateStream(context.Background(), js.StreamConfig{Name: "FIRKIN_EVENTS", Subjects: []string{"firkin.events.>"}}); err != nil {
		t.Fatal(err)
	}
	return kv
}

func poll(t *testing.T, d time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v after %s", what, err, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

type errString string

func (e errString) Error() string { return string(e) }

func TestMembersAndLost(t *testing.T) {
	url := startNATS(t)
	ncA, ncB, ncC, ncTest := connect(t, url), connect(t, url), connect(t, url), connect(t, url)
	sessions := sessionsBucket(t, ncTest)
	var sa, sb, sc fakeStatus
	sb.sandboxes.Store(2)
	a := startMember(t, ncA, "wa", &sa)
	startMember(t, ncC, "wc", &sc)
	b := startMember(t, ncB, "wb", &sb)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	list, err := a.Members(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 3 || list[0].WorkerID != "wa" || list[1].WorkerID != "wb" || list[1].Load.Sandboxes != 2 || list[1].Driver != "qemu" {
		t.Fatalf("members = %+v, want wa, wb (2 sandboxes), wc", list)
	}
	// A forged record in the bucket is left out.
	j, _ := js.New(ncTest)
	wkv, _ := j.KeyValue(ctx, Bucket)
	if _, err := wkv.Put(ctx, "wz", []byte(`{"worker_id":"other","state":"active"}`)); err != nil {
		t.Fatal(err)
	}
	if list, _ := a.Members(ctx); len(list) != 3 {
		t.Errorf("forged record listed: %+v", list)
	}

	put := func(id, owner, state string) {
		data, _ := json.Marshal(subjects.Sandbox{SandboxID: id, ClientID: owner, State: state, MAC: "v1:abc"})
		// A field a newer worker wrote survives the lost marking.
		data = []byte(strings.Replace(string(data), "{", `{"future_field":7,`, 1))
		if _, err := sessions.Put(ctx, id, data); err != nil {
			t.Fatal(err)
		}
	}
	put("sb-1", "wb", subjects.StateRunning)
	put("sb-2", "wb", subjects.StateCreating)
	put("sa-1", "wa", subjects.StateRunning)

	events, err := ncTest.SubscribeSync("firkin.events.lost.>")
	if err != nil {
		t.Fatal(err)
	}
	// Nothing is lost while everyone beats.
	time.Sleep(3 * a.cfg.Interval)
	for _, id := range []string{"sb-1", "sb-2", "sa-1"} {
		e, _ := sessions.Get(ctx, id)
		if strings.Contains(string(e.Value()), `"lost"`) {
			t.Fatalf("%s marked lost while its worker beats", id)
		}
	}

	// wb crashes: stops beating, its key stays until the TTL.
	b.Abandon()
	crashed := time.Now()
	bound := a.LostWithin()
	poll(t, bound+2*time.Second, "wb's sessions marked lost", func() error {
		for _, id := range []string{"sb-1", "sb-2"} {
			e, err := sessions.Get(ctx, id)
			if err != nil {
				return err
			}
			var rec map[string]any
			_ = json.Unmarshal(e.Value(), &rec)
			if rec["state"] != subjects.StateLost {
				return errString(id + " is " + rec["state"].(string))
			}
			if rec["future_field"] != float64(7) || rec["mac"] != "v1:abc" || rec["client_id"] != "wb" {
				t.Fatalf("%s: marking lost changed more than its state: %v", id, rec)
			}
		}
		return nil
	})
	if took := time.Since(crashed); took > bound+500*time.Millisecond {
		t.Errorf("sessions marked lost after %s, bound %s", took, bound)
	}
	// One event per session, though two workers watch.
	got := map[string]int{}
	for {
		msg, err := events.NextMsg(3 * a.cfg.Interval)
		if err != nil {
			break
		}
		var ev subjects.LifecycleEvent
		_ = json.Unmarshal(msg.Data, &ev)
		if ev.Kind != subjects.EventLost || ev.WorkerID != "wb" {
			t.Errorf("event %+v", ev)
		}
		got[ev.SandboxID]++
	}
	if got["sb-1"] != 1 || got["sb-2"] != 1 || len(got) != 2 {
		t.Errorf("lost events = %v, want one each for sb-1 and sb-2", got)
	}
	if e, _ := sessions.Get(ctx, "sa-1"); strings.Contains(string(e.Value()), `"lost"`) {
		t.Error("a live worker's session marked lost")
	}
	if list, _ := a.Members(ctx); len(list) != 2 {
		t.Errorf("members after wb's heartbeat expired: %+v", list)
	}
}

func TestStopDeletesHeartbeat(t *testing.T) {
	url := startNATS(t)
	nc := connect(t, url)
	sessionsBucket(t, nc)
	var st fakeStatus
	m := startMember(t, nc, "wa", &st)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := m.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	other := startMember(t, connect(t, url), "wb", &st)
	if list, err := other.Members(ctx); err != nil || len(list) != 1 || list[0].WorkerID != "wb" {
		t.Errorf("members after wa stopped: %+v, %v", list, err)
	}
}

// drainJobs is a job runner that has one job running until released.
type drainJobs struct {
	release chan struct{}
	running atomic.Int64
	handed  atomic.Bool
}

func (d *drainJobs) Running() int { return int(d.running.Load()) }
func (d *drainJobs) Drain(ctx context.Context) error {
	select {
	case <-d.release:
	case <-ctx.Done():
		d.handed.Store(true)
	}
	d.running.Store(0)
	return nil
}

type warmFunc func(context.Context) error

func (f warmFunc) ReleaseWarm(ctx context.Context) error { return f(ctx) }

func TestDrainAndPlacement(t *testing.T) {
	url := startNATS(t)
	ncA, ncB := connect(t, url), connect(t, url)
	sessionsBucket(t, ncA)
	jobsA := &drainJobs{release: make(chan struct{})}
	jobsA.running.Store(1)
	var released atomic.Bool
	var sa, sb fakeStatus
	a := startMember(t, ncA, "wa", &sa, func(c *Config) {
		c.Jobs = jobsA
		c.Warm = warmFunc(func(context.Context) error { released.Store(true); return nil })
		inner := c.Status
		c.Status = func() Status { s := inner(); s.Load.Jobs = jobsA.Running(); return s }
	})
	startMember(t, ncB, "wb", &sb)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	poll(t, 5*time.Second, "wa sees wb", func() error {
		if len(a.cachedMembers()) != 2 {
			return errString("not yet")
		}
		return nil
	})
	req := subjects.CreateSandboxRequest{TemplateID: "tiny"}
	if target, err := a.Place(ctx, req, false); err != nil || target != "" {
		t.Fatalf("equal load: Place = %q, %v; want this worker", target, err)
	}
	rep, err := a.Drain(ctx, subjects.DrainRequest{})
	if err != nil || rep.State != subjects.WorkerDraining || rep.JobsRunning != 1 {
		t.Fatalf("drain = %+v, %v; want draining with one job", rep, err)
	}
	if target, err := a.Place(ctx, req, false); err != nil || target != "wb" {
		t.Errorf("draining: Place = %q, %v; want wb", target, err)
	}
	if _, err := a.Place(ctx, req, true); subjects.CodeOf(err) != subjects.CodeCapacityRejected {
		t.Errorf("draining, pinned: Place error %v, want capacity_rejected", err)
	}
	close(jobsA.release)
	rep, err = a.Drain(ctx, subjects.DrainRequest{Wait: true})
	if err != nil || rep.State != subjects.WorkerDrained || rep.JobsRunning != 0 {
		t.Fatalf("drain with wait = %+v, %v", rep, err)
	}
	if !released.Load() || jobsA.handed.Load() {
		t.Errorf("warm released %v, jobs handed back %v; want released, finished", released.Load(), jobsA.handed.Load())
	}
	b := startMember(t, connect(t, url), "wc", &sb)
	poll(t, 5*time.Second, "others see wa drained", func() error {
		for _, w := range b.cachedMembers() {
			if w.WorkerID == "wa" && w.State == subjects.WorkerDrained {
				return nil
			}
		}
		return errString("not yet")
	})
	if _, err := a.Drain(ctx, subjects.DrainRequest{TimeoutS: -1}); subjects.CodeOf(err) != subjects.CodeInvalidRequest {
		t.Errorf("negative timeout: %v", err)
	}
}

func TestDrainHandsBackAfterTimeout(t *testing.T) {
	url := startNATS(t)
	nc := connect(t, url)
	sessionsBucket(t, nc)
	jobs := &drainJobs{release: make(chan struct{})}
	jobs.running.Store(1)
	var st fakeStatus
	a := startMember(t, nc, "wa", &st, func(c *Config) { c.Jobs = jobs })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	t0 := time.Now()
	rep, err := a.Drain(ctx, subjects.DrainRequest{Wait: true, TimeoutS: 1})
	if err != nil || rep.State != subjects.WorkerDrained {
		t.Fatalf("drain = %+v, %v", rep, err)
	}
	if !jobs.handed.Load() || time.Since(t0) < time.Second {
		t.Errorf("running job not handed back after the timeout (handed %v after %s)", jobs.handed.Load(), time.Since(t0))
	}
	if _, err := a.Place(ctx, subjects.CreateSandboxRequest{}, false); subjects.CodeOf(err) != subjects.CodeCapacityRejected {
		t.Errorf("only worker drained: Place error %v, want capacity_rejected", err)
	}
}

func TestRejoinedAfterGap(t *testing.T) {
	url := startNATS(t)
	ncA, ncB := connect(t, url), connect(t, url)
	sessions := sessionsBucket(t, ncA)
	var rejoined atomic.Int64
	var st fakeStatus
	a := startMember(t, ncA, "wa", &st, func(c *Config) { c.Rejoined = func(context.Context) { rejoined.Add(1) } })
	b := startMember(t, ncB, "wb", &st)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	data, _ := json.Marshal(subjects.Sandbox{SandboxID: "sa-1", ClientID: "wa", State: subjects.StateRunning})
	if _, err := sessions.Put(ctx, "sa-1", data); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * a.cfg.Interval)
	if n := rejoined.Load(); n != 0 {
		t.Fatalf("Rejoined called %d times while beating", n)
	}
	// Cut off for longer than the TTL: b marks wa's sandbox lost, and wa
	// is told when its heartbeat is back.
	a.Hold(a.LostWithin() + 2*a.cfg.Interval)
	poll(t, b.LostWithin()+3*time.Second, "wa's sandbox marked lost", func() error {
		e, err := sessions.Get(ctx, "sa-1")
		if err != nil {
			return err
		}
		if !strings.Contains(string(e.Value()), `"lost"`) {
			return errString("not yet")
		}
		return nil
	})
	poll(t, 5*time.Second, "Rejoined called", func() error {
		if rejoined.Load() != 1 {
			return errString("not yet")
		}
		return nil
	})
	time.Sleep(3 * a.cfg.Interval)
	if n := rejoined.Load(); n != 1 {
		t.Errorf("Rejoined called %d times, want once", n)
	}
}
