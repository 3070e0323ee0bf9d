package handlers

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

func TestClientOf(t *testing.T) {
	for reply, want := range map[string]string{
		"_INBOX.conn1.tok9": "_INBOX.conn1",
		"_INBOX.conn1.tokA": "_INBOX.conn1",
		"_INBOX.x":          "_INBOX.x", // one inbox per request: its own client
		"":                  "",
	} {
		if got := clientOf(reply); got != want {
			t.Errorf("clientOf(%q) = %q, want %q", reply, got, want)
		}
	}
}

// TestFSClientShare: one client holds at most half of the worker's
// transfers and watches (capacity_rejected beyond, naming its share),
// others still get theirs, the worker-wide bound holds, and a slot given
// back can be taken again.
func TestFSClientShare(t *testing.T) {
	var f fsState
	isShare := func(err error) bool {
		return errors.Is(err, errdefs.ErrCapacity) && strings.Contains(err.Error(), "its share")
	}
	for i := range share(fsMaxTransfers) {
		if _, err := f.addTransfer("a"+string(rune('0'+i)), "sb1", "A", 1); err != nil {
			t.Fatalf("A's transfer %d: %v", i, err)
		}
	}
	if _, err := f.addTransfer("a-more", "sb2", "A", 1); !isShare(err) {
		t.Fatalf("A beyond its share: %v", err)
	}
	for i := range fsMaxTransfers - share(fsMaxTransfers) {
		if _, err := f.addTransfer("b"+string(rune('0'+i)), "sb1", "B", 1); err != nil {
			t.Fatalf("B's transfer %d: %v", i, err)
		}
	}
	if _, err := f.addTransfer("c0", "sb1", "C", 1); !errors.Is(err, errdefs.ErrCapacity) || isShare(err) {
		t.Fatalf("C with the worker full: %v", err)
	}
	f.removeTransfer("a0")
	f.removeTransfer("a0") // twice: counted once
	if _, err := f.addTransfer("c0", "sb1", "C", 1); err != nil {
		t.Fatalf("C after A gave one back: %v", err)
	}
	if _, err := f.addTransfer("a-more", "sb1", "A", 1); err == nil {
		t.Fatal("A again with the worker full")
	}
	if f.transfersBy["A"] != share(fsMaxTransfers)-1 || f.transfersBy["C"] != 1 {
		t.Fatalf("counts %v", f.transfersBy)
	}

	for i := range share(fsMaxWatches) {
		if err := f.addWatch("w"+string(rune('0'+i)), &watch{sandbox: "sb1", client: "A", cancel: func() {}}); err != nil {
			t.Fatalf("A's watch %d: %v", i, err)
		}
	}
	if err := f.addWatch("w-more", &watch{sandbox: "sb1", client: "A", cancel: func() {}}); !isShare(err) {
		t.Fatalf("A's watch beyond its share: %v", err)
	}
	if err := f.addWatch("wb", &watch{sandbox: "sb2", client: "B", cancel: func() {}}); err != nil {
		t.Fatalf("B's watch: %v", err)
	}
	f.release("sb1") // the sandbox went: A's watches end
	if len(f.watchesBy) != 1 || f.watchesBy["B"] != 1 {
		t.Fatalf("watch counts after release: %v", f.watchesBy)
	}
}

// TestFSWatchShareThroughNATS: a connection that opened its share of
// watches is refused with capacity_rejected; another connection is not.
func TestFSWatchShareThroughNATS(t *testing.T) {
	_, c, nc := startFSService(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i := range share(fsMaxWatches) {
		if _, err := c.Watch(ctx, "sb1", "/work"); err != nil {
			t.Fatalf("watch %d: %v", i, err)
		}
	}
	_, err := c.Watch(ctx, "sb1", "/work")
	if subjects.CodeOf(err) != subjects.CodeCapacityRejected || !strings.Contains(err.Error(), "its share") {
		t.Fatalf("watch beyond the share: %v", err)
	}
	nc2, err := nats.Connect(nc.ConnectedUrl())
	if err != nil {
		t.Fatal(err)
	}
	defer nc2.Close()
	w, err := client.New(nc2).Watch(ctx, "sb1", "/work")
	if err != nil {
		t.Fatalf("another client's watch: %v", err)
	}
	_ = w.Close()
}
