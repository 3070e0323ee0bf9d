package jetstream

import (
	"context"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/subjects"
)

func TestConfigAndWatches(t *testing.T) {
	s := openStore(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for k, v := range map[string]string{"pool.tiny": `{"target":1}`, "pool.tiny.w1": `{"target":2}`, "pool.web": `{"target":3}`, "other.x": `{}`} {
		if err := s.PutConfig(ctx, k, []byte(v)); err != nil {
			t.Fatal(err)
		}
	}
	all, err := s.ListConfig(ctx, "pool.>")
	if err != nil || len(all) != 3 {
		t.Fatalf("ListConfig(pool.>) = %+v, %v; want 3", all, err)
	}
	one, err := s.ListConfig(ctx, "pool.tiny")
	if err != nil || len(one) != 1 || string(one[0].Value) != `{"target":1}` || one[0].Revision == 0 {
		t.Fatalf("ListConfig(pool.tiny) = %+v, %v", one, err)
	}
	none, err := s.ListConfig(ctx, "pool.nothing")
	if err != nil || len(none) != 0 {
		t.Fatalf("ListConfig of a missing key = %+v, %v", none, err)
	}

	got := make(chan ConfigEntry, 16)
	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	if err := s.WatchConfig(wctx, "pool.>", func(e ConfigEntry) { got <- e }); err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 {
		t.Fatalf("WatchConfig delivered %d settings before returning, want 3", len(got))
	}
	for range 3 {
		<-got
	}
	if err := s.PutConfig(ctx, "pool.web", []byte(`{"target":0}`)); err != nil {
		t.Fatal(err)
	}
	select {
	case e := <-got:
		if e.Key != "pool.web" || string(e.Value) != `{"target":0}` || e.Deleted {
			t.Errorf("update = %+v", e)
		}
	case <-ctx.Done():
		t.Fatal("no update from the watch")
	}

	type change struct {
		key, id string // id: the record's snapshot_id, "" when deleted
	}
	snaps := make(chan change, 16)
	if err := s.CreateSnapshot(ctx, subjects.SnapshotRecord{SnapshotID: "a.b", Kind: subjects.KindTemplate}); err != nil {
		t.Fatal(err)
	}
	if err := s.WatchSnapshots(wctx, func(key string, rec *subjects.SnapshotRecord) {
		c := change{key: key}
		if rec != nil {
			c.id = rec.SnapshotID
		}
		snaps <- c
	}); err != nil {
		t.Fatal(err)
	}
	if c := <-snaps; c != (change{"a.b", "a.b"}) {
		t.Errorf("initial record = %+v", c)
	}
	if err := s.DeleteSnapshot(ctx, "a.b"); err != nil {
		t.Fatal(err)
	}
	select {
	case c := <-snaps:
		if c != (change{"a.b", ""}) {
			t.Errorf("after delete = %+v", c)
		}
	case <-ctx.Done():
		t.Fatal("no delete from the watch")
	}
}
