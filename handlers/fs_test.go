package handlers

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// fsRuntime keeps guest files in memory (logic only: the guest side is
// tested in package agent and end to end in package worker).
type fsRuntime struct {
	fakeRuntime
	mu     sync.Mutex
	files  map[string][]byte
	events chan []subjects.WatchEvent
}

func (f *fsRuntime) FSStat(_ context.Context, _ string, req subjects.FSPathRequest) (subjects.FileInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	b, ok := f.files[req.Path]
	if !ok {
		return subjects.FileInfo{}, errdefs.Wrap(subjects.ErrFileNotFound, errors.New("guest: no such file"))
	}
	return subjects.FileInfo{Path: req.Path, Type: subjects.FileTypeFile, Size: int64(len(b))}, nil
}
func (f *fsRuntime) FSList(context.Context, string, subjects.FSListRequest) (subjects.FSListReply, error) {
	return subjects.FSListReply{}, nil
}
func (f *fsRuntime) FSMkdir(context.Context, string, subjects.FSMkdirRequest) (subjects.FSReply, error) {
	return subjects.FSReply{OK: true}, nil
}
func (f *fsRuntime) FSRemove(context.Context, string, subjects.FSRemoveRequest) (subjects.FSReply, error) {
	return subjects.FSReply{OK: true}, nil
}
func (f *fsRuntime) FSRename(context.Context, string, subjects.FSRenameRequest) (subjects.FSReply, error) {
	return subjects.FSReply{OK: true}, nil
}
func (f *fsRuntime) FSReadTo(_ context.Context, _ string, req subjects.FSReadRequest, w io.Writer) (int64, error) {
	f.mu.Lock()
	b := f.files[req.Path]
	f.mu.Unlock()
	// In pieces, as the agent delivers them.
	var n int64
	for len(b) > 0 {
		k := min(len(b), 100_000)
		m, err := w.Write(b[:k])
		n += int64(m)
		if err != nil {
			return n, err
		}
		b = b[k:]
	}
	return n, nil
}
func (f *fsRuntime) FSWriteFrom(_ context.Context, _ string, req subjects.FSWriteRequest, r io.Reader, sumAtEOF func() string) (subjects.FSWriteReply, error) {
	if req.Path == "/slow" {
		time.Sleep(300 * time.Millisecond) // a slow guest: chunks pile up
	}
	b, err := io.ReadAll(r)
	if err != nil {
		return subjects.FSWriteReply{}, err // the guest drops the temporary file
	}
	sum := sha256.Sum256(b)
	hexSum := hex.EncodeToString(sum[:])
	want := req.SHA256
	if sumAtEOF != nil && sumAtEOF() != "" {
		want = sumAtEOF()
	}
	if want != "" && want != hexSum {
		return subjects.FSWriteReply{}, errdefs.Wrap(errdefs.ErrInvalidArgument, errors.New("guest: sha256 mismatch"))
	}
	f.mu.Lock()
	f.files[req.Path] = b
	f.mu.Unlock()
	return subjects.FSWriteReply{File: subjects.FileInfo{Path: req.Path, Size: int64(len(b))}, Size: int64(len(b)), SHA256: hexSum}, nil
}
func (f *fsRuntime) FSWatch(ctx context.Context, _ string, _ subjects.FSWatchRequest, ready func(), emit func([]subjects.WatchEvent)) error {
	ready()
	for {
		select {
		case evs := <-f.events:
			emit(evs)
		case <-ctx.Done():
			return nil
		}
	}
}

func startFSService(t *testing.T) (*fsRuntime, *client.Client, *nats.Conn) {
	t.Helper()
	nc := testenv.NATS(t)
	rt := &fsRuntime{files: map[string][]byte{}, events: make(chan []subjects.WatchEvent)}
	svc, err := New(nc, Config{WorkerID: "w1", Runtime: rt})
	if err != nil {
		t.Fatal(err)
	}
	if err := svc.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = svc.Stop(ctx)
	})
	svc.Own("sb1")
	return rt, client.New(nc), nc
}

func TestFSStreamedTransfers(t *testing.T) {
	rt, c, nc := startFSService(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	data := make([]byte, nc.MaxPayload()+123) // more than one message holds
	for i := range data {
		data[i] = byte(i * 7)
	}
	wr, err := c.WriteFile(ctx, "sb1", "/big", bytes.NewReader(data), client.WriteFileOptions{})
	if err != nil || wr.Size != int64(len(data)) {
		t.Fatalf("write: %+v %v", wr, err)
	}
	if !bytes.Equal(rt.files["/big"], data) {
		t.Fatal("stored content differs")
	}
	var got bytes.Buffer
	rr, err := c.ReadFile(ctx, "sb1", "/big", &got)
	if err != nil || !bytes.Equal(got.Bytes(), data) || rr.Chunks < 5 {
		t.Fatalf("read: %+v %v (equal %v)", rr, err, bytes.Equal(got.Bytes(), data))
	}
	// Small files in one message; the inline limit sends large ones to
	// the streamed form.
	if _, err := c.WriteFileBytes(ctx, "sb1", "/small", []byte{0, 1, 255}, client.WriteFileOptions{}); err != nil {
		t.Fatal(err)
	}
	if b, err := c.ReadFileBytes(ctx, "sb1", "/small"); err != nil || !bytes.Equal(b, []byte{0, 1, 255}) {
		t.Fatalf("small read: %v %v", b, err)
	}
	_, err = c.ReadFileBytes(ctx, "sb1", "/big")
	if subjects.CodeOf(err) != subjects.CodeInvalidRequest {
		t.Fatalf("inline read of more than a message: %v", err)
	}
	_, err = c.ReadFile(ctx, "sb1", "/missing", io.Discard)
	if subjects.CodeOf(err) != subjects.CodeFileNotFound {
		t.Fatalf("missing: %v", err)
	}
}

// rawUpload starts a streamed upload by hand and returns its start message
// and the subscription of its reply subject.
func rawUpload(t *testing.T, nc *nats.Conn, path string) (subjects.FSTransfer, *nats.Subscription) {
	t.Helper()
	inbox := nc.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	body, _ := json.Marshal(subjects.FSWriteRequest{Path: path, Stream: true})
	if err := nc.PublishRequest("firkin.sandbox.sb1.fs.write", inbox, body); err != nil {
		t.Fatal(err)
	}
	m, err := sub.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var start subjects.FSTransfer
	if err := json.Unmarshal(m.Data, &start); err != nil || start.Window != fsWindow {
		t.Fatalf("start %q: %v", m.Data, err)
	}
	return start, sub
}

func chunk(subject string, seq int, data []byte, hdr ...string) *nats.Msg {
	m := &nats.Msg{Subject: subject, Data: data, Header: nats.Header{}}
	m.Header.Set(subjects.HeaderSeq, strconv.Itoa(seq))
	for i := 0; i+1 < len(hdr); i += 2 {
		m.Header.Set(hdr[i], hdr[i+1])
	}
	return m
}

// finalReply skips acks and returns the error code of the transfer's reply.
func finalReply(t *testing.T, sub *nats.Subscription) string {
	t.Helper()
	for range 100 {
		m, err := sub.NextMsg(10 * time.Second)
		if err != nil {
			t.Fatalf("no reply: %v", err)
		}
		if m.Header.Get(subjects.HeaderAck) != "" {
			continue
		}
		return m.Header.Get("Firkin-Error-Code")
	}
	t.Fatal("no reply after 100 messages")
	return ""
}

func TestFSUploadMisbehaving(t *testing.T) {
	rt, _, nc := startFSService(t)
	// Out of order.
	start, sub := rawUpload(t, nc, "/a")
	_ = nc.PublishMsg(chunk(start.Subject, 1, []byte("x")))
	if code := finalReply(t, sub); code != string(subjects.CodeInvalidRequest) {
		t.Errorf("out of order: code %q", code)
	}
	// Beyond the window, without waiting for acks.
	start, sub = rawUpload(t, nc, "/slow")
	for seq := range 4 * fsWindow {
		_ = nc.PublishMsg(chunk(start.Subject, seq, make([]byte, 1000)))
	}
	if code := finalReply(t, sub); code != string(subjects.CodeInvalidRequest) {
		t.Errorf("beyond the window: code %q", code)
	}
	// A digest that does not match: the file is not written.
	start, sub = rawUpload(t, nc, "/c")
	_ = nc.PublishMsg(chunk(start.Subject, 0, []byte("abc"), subjects.HeaderEOF, "1", subjects.HeaderSHA256, "00"))
	if code := finalReply(t, sub); code != string(subjects.CodeInvalidRequest) {
		t.Errorf("digest mismatch: code %q", code)
	}
	rt.mu.Lock()
	_, written := rt.files["/c"]
	rt.mu.Unlock()
	if written {
		t.Error("a write with a wrong digest was stored")
	}
	// A chunk for another sandbox's transfer id goes nowhere.
	_ = nc.PublishMsg(chunk("firkin.sandbox.sb2.fs.chunk.nosuch", 0, []byte("x")))
}

// TestFSDownloadWindow: a reader that does not acknowledge gets exactly one
// window of chunks, then nothing more.
func TestFSDownloadWindow(t *testing.T) {
	rt, _, nc := startFSService(t)
	rt.files["/big"] = make([]byte, 20<<20)
	inbox := nc.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(subjects.FSReadRequest{Path: "/big", Stream: true})
	if err := nc.PublishRequest("firkin.sandbox.sb1.fs.read", inbox, body); err != nil {
		t.Fatal(err)
	}
	var last *nats.Msg
	for i := range fsWindow {
		m, err := sub.NextMsg(5 * time.Second)
		if err != nil || m.Header.Get(subjects.HeaderSeq) != strconv.Itoa(i) {
			t.Fatalf("chunk %d: %v %v", i, m, err)
		}
		last = m
	}
	if m, err := sub.NextMsg(500 * time.Millisecond); err == nil {
		t.Fatalf("got chunk %s beyond the window", m.Header.Get(subjects.HeaderSeq))
	}
	// One ack opens the window by one.
	ack := &nats.Msg{Subject: "firkin.sandbox.sb1.fs.ack." + last.Header.Get(subjects.HeaderTransfer), Header: nats.Header{}}
	ack.Header.Set(subjects.HeaderAck, "0")
	if err := nc.PublishMsg(ack); err != nil {
		t.Fatal(err)
	}
	if m, err := sub.NextMsg(5 * time.Second); err != nil || m.Header.Get(subjects.HeaderSeq) != strconv.Itoa(fsWindow) {
		t.Fatalf("after an ack: %v %v", m, err)
	}
}

func TestFSWatchDelivers(t *testing.T) {
	rt, c, _ := startFSService(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	w, err := c.Watch(ctx, "sb1", "/work")
	if err != nil {
		t.Fatal(err)
	}
	rt.events <- []subjects.WatchEvent{{Op: subjects.WatchCreate, Name: "f"}, {Op: subjects.WatchRemove, Name: "f"}}
	for _, want := range []string{"create", "remove"} {
		select {
		case ev := <-w.Events():
			if ev.Op != want || ev.Name != "f" {
				t.Fatalf("event %+v, want %s f", ev, want)
			}
		case <-ctx.Done():
			t.Fatal("no event")
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if _, ok := <-w.Events(); ok {
		t.Fatal("events open after close")
	}
	// Unwatching again, or a watch of another sandbox, is invalid.
	err = c.Request(ctx, "firkin.sandbox.sb1.fs.unwatch", subjects.FSUnwatchRequest{Watch: w.ID()}, nil)
	if subjects.CodeOf(err) != subjects.CodeInvalidRequest {
		t.Fatalf("unwatch twice: %v", err)
	}
}

// TestFSUploadAbort: a client whose source fails ends the transfer at once
// and the file is not written.
func TestFSUploadAbort(t *testing.T) {
	rt, c, _ := startFSService(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	_, err := c.WriteFile(ctx, "sb1", "/aborted", io.MultiReader(bytes.NewReader(make([]byte, 3<<20)), &errReader{}), client.WriteFileOptions{})
	if err == nil {
		t.Fatal("no error from a failing source")
	}
	time.Sleep(100 * time.Millisecond)
	rt.mu.Lock()
	_, written := rt.files["/aborted"]
	rt.mu.Unlock()
	if written || time.Since(start) > 5*time.Second {
		t.Fatalf("written %v after %s", written, time.Since(start))
	}
}

type errReader struct{}

func (errReader) Read([]byte) (int, error) { return 0, errors.New("source broke") }
