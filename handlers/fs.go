package handlers

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// Files is the runtime's guest file API. It is optional: a runtime without
// it answers the fs verbs with unsupported.
type Files interface {
	FSStat(ctx context.Context, id string, req subjects.FSPathRequest) (subjects.FileInfo, error)
	FSList(ctx context.Context, id string, req subjects.FSListRequest) (subjects.FSListReply, error)
	FSMkdir(ctx context.Context, id string, req subjects.FSMkdirRequest) (subjects.FSReply, error)
	FSRemove(ctx context.Context, id string, req subjects.FSRemoveRequest) (subjects.FSReply, error)
	FSRename(ctx context.Context, id string, req subjects.FSRenameRequest) (subjects.FSReply, error)
	// FSReadTo streams a guest file into w; the guest waits while w does.
	FSReadTo(ctx context.Context, id string, req subjects.FSReadRequest, w io.Writer) (int64, error)
	// FSWriteFrom streams r into a guest file atomically; sumAtEOF, when
	// not nil, gives the digest the content must have once r is done.
	FSWriteFrom(ctx context.Context, id string, req subjects.FSWriteRequest, r io.Reader, sumAtEOF func() string) (subjects.FSWriteReply, error)
	// FSWatch reports a guest directory's changes to emit until ctx ends
	// or the directory or the sandbox goes; ready is called once watching.
	FSWatch(ctx context.Context, id string, req subjects.FSWatchRequest, ready func(), emit func([]subjects.WatchEvent)) error
}

// Bounds of the file endpoints.
const (
	// fsWindow is how many chunks of a transfer may be unacknowledged.
	fsWindow = 4
	// fsMaxChunk is the largest chunk (less when the server's max payload
	// is smaller).
	fsMaxChunk = 1 << 20
	// fsHeadroom is left in a message for headers and JSON.
	fsHeadroom = 16 << 10
	// fsMaxTransfers bounds the streamed transfers a worker runs at once:
	// with fsWindow chunks each, at most 8*4 MiB of chunks in memory.
	fsMaxTransfers = 8
	// fsIdle ends a transfer that made no progress for this long.
	fsIdle = 30 * time.Second
	// fsTransferTimeout bounds a whole transfer.
	fsTransferTimeout = time.Hour
	// fsMaxWatches bounds the watches a worker runs at once.
	fsMaxWatches = 64
	// fsClientShare is the most of the worker's transfers (and of its
	// watches) one client holds at once, as a fraction: 1/fsClientShare.
	// A client is the connection a request comes from, known by its reply
	// subject's prefix (see clientOf).
	fsClientShare = 2
	// fsWatchQueue is how many event batches wait for publishing before
	// new ones are dropped (and counted).
	fsWatchQueue = 64
)

// fsState is the file endpoints' state: transfers in flight (keyed by id)
// and watches. The zero value is ready.
type fsState struct {
	mu        sync.Mutex
	transfers map[string]*transfer
	watches   map[string]*watch
	// byClient counts the transfers and watches each client holds.
	transfersBy map[string]int
	watchesBy   map[string]int
}

// clientOf names the client that sent a request by its reply subject: a
// NATS connection asks all its requests' replies under one inbox prefix
// (_INBOX.<connection nuid>.<request token>), so the prefix before the last
// token stands for the connection. A client using a fresh inbox per
// request (old-style requests) counts as a new client each time: the
// share is a guard against one busy client starving the others by
// accident, not against one that means to; the worker-wide bounds stay.
func clientOf(reply string) string {
	if i := strings.LastIndexByte(reply, '.'); i > 0 && strings.Count(reply, ".") >= 2 {
		return reply[:i]
	}
	return reply
}

// share is the most of total one client may hold.
func share(total int) int { return max(1, total/fsClientShare) }

// claim takes one of total slots for client, counted in by, or fails with
// a capacity error naming what ran out.
func claim(by map[string]int, n, total int, client, what string) error {
	if n >= total {
		return capacityError(fmt.Sprintf("worker runs %d %s already (its most): retry later", total, what))
	}
	if by[client] >= share(total) {
		return capacityError(fmt.Sprintf("this client holds %d of the worker's %d %s, its share: retry when one of them ends", by[client], total, what))
	}
	by[client]++
	return nil
}

// unclaim gives client's slot back.
func unclaim(by map[string]int, client string) {
	if by[client]--; by[client] <= 0 {
		delete(by, client)
	}
}

// transfer is one streamed read or write: the chunks (upload) or acks
// (download) the sandbox's subscription hands it, in order.
type transfer struct {
	sandbox  string
	client   string
	in       chan *nats.Msg
	overflow atomic.Bool
	broken   chan struct{} // closed on overflow
	breakMu  sync.Once
	// acked is the last chunk of an upload the worker acknowledged (-1:
	// none yet), set before the ack is sent, so a chunk beyond the window
	// is known as such when it arrives.
	acked atomic.Int64
}

// watch is one running watch.
type watch struct {
	sandbox string
	client  string
	cancel  context.CancelFunc
}

// addTransfer registers a transfer of client's, within the worker's
// bound and the client's share of it.
func (f *fsState) addTransfer(id, sandbox, client string, size int) (*transfer, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.transfers == nil {
		f.transfers, f.transfersBy = map[string]*transfer{}, map[string]int{}
	}
	if err := claim(f.transfersBy, len(f.transfers), fsMaxTransfers, client, "streamed transfers"); err != nil {
		return nil, err
	}
	t := &transfer{sandbox: sandbox, client: client, in: make(chan *nats.Msg, size), broken: make(chan struct{})}
	t.acked.Store(-1)
	f.transfers[id] = t
	return t, nil
}

func (f *fsState) removeTransfer(id string) {
	f.mu.Lock()
	if t := f.transfers[id]; t != nil {
		delete(f.transfers, id)
		unclaim(f.transfersBy, t.client)
	}
	f.mu.Unlock()
}

// addWatch registers a watch, within the worker's bound and its client's
// share of it.
func (f *fsState) addWatch(id string, w *watch) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.watches == nil {
		f.watches, f.watchesBy = map[string]*watch{}, map[string]int{}
	}
	if err := claim(f.watchesBy, len(f.watches), fsMaxWatches, w.client, "watches"); err != nil {
		return err
	}
	f.watches[id] = w
	return nil
}

// removeWatchLocked forgets watch id (f.mu is held) and returns it, nil
// when it is not there.
func (f *fsState) removeWatchLocked(id string) *watch {
	w := f.watches[id]
	if w != nil {
		delete(f.watches, id)
		unclaim(f.watchesBy, w.client)
	}
	return w
}

// deliver hands a chunk or ack message (verb fs.chunk.<tid> or
// fs.ack.<tid>) of sandbox to its transfer, without blocking the
// subscription: a sender that ignores the window overflows its transfer,
// which then fails. It reports whether verb was one of those.
func (f *fsState) deliver(sandbox, verb string, m *nats.Msg) bool {
	tid, ok := strings.CutPrefix(verb, subjects.VerbFSChunkPrefix)
	if !ok {
		tid, ok = strings.CutPrefix(verb, subjects.VerbFSAckPrefix)
	}
	if !ok {
		return false
	}
	f.mu.Lock()
	t := f.transfers[tid]
	f.mu.Unlock()
	if t == nil || t.sandbox != sandbox {
		return true // unknown or ended: dropped
	}
	if seq := m.Header.Get(subjects.HeaderSeq); seq != "" {
		// An upload's chunk: at most fsWindow unacknowledged, plus the
		// last message.
		limit := int64(fsWindow)
		if m.Header.Get(subjects.HeaderEOF) != "" {
			limit++
		}
		if n, err := strconv.ParseInt(seq, 10, 64); err == nil && n-t.acked.Load() > limit {
			t.fail()
		}
	}
	select {
	case t.in <- m:
	default:
		t.fail()
	}
	return true
}

// fail marks a transfer whose sender ignored the window.
func (t *transfer) fail() {
	t.overflow.Store(true)
	t.breakMu.Do(func() { close(t.broken) })
}

// release ends the watches of a sandbox this worker no longer owns.
func (f *fsState) release(sandbox string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for id, w := range f.watches {
		if w.sandbox == sandbox {
			w.cancel()
			f.removeWatchLocked(id)
		}
	}
}

func newTransferID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// maxPayload is the server's max payload (1 MiB, the NATS default, before
// the connection knows it).
func (s *Service) maxPayload() int {
	if s.nc == nil || s.nc.MaxPayload() <= 0 {
		return 1 << 20
	}
	return int(s.nc.MaxPayload())
}

// chunkSize is the largest chunk that fits one message of this server.
func (s *Service) chunkSize() int {
	return max(4<<10, min(fsMaxChunk, s.maxPayload()-fsHeadroom))
}

// inlineMax is the largest file a reply carries inline (base64 in JSON).
func (s *Service) inlineMax() int {
	return max(1<<10, (s.maxPayload()-fsHeadroom)/4*3)
}

// fsVerb answers firkin.sandbox.<id>.fs.<op>.
func (s *Service) fsVerb(ctx context.Context, req micro.Request, id, verb string) (any, error) {
	files, ok := s.rt.(Files)
	if !ok {
		return nil, errdefs.Wrap(errdefs.ErrUnsupported, errors.New("this worker has no file operations"))
	}
	switch verb {
	case subjects.VerbFSRead:
		in, err := decode[subjects.FSReadRequest](req)
		if err != nil {
			return nil, err
		}
		return s.fsRead(ctx, req, files, id, in)
	case subjects.VerbFSWrite:
		in, err := decode[subjects.FSWriteRequest](req)
		if err != nil {
			return nil, err
		}
		return s.fsWrite(ctx, req, files, id, in)
	case subjects.VerbFSWatch:
		in, err := decode[subjects.FSWatchRequest](req)
		if err != nil {
			return nil, err
		}
		return s.fsWatch(ctx, files, id, clientOf(req.Reply()), in)
	case subjects.VerbFSUnwatch:
		in, err := decode[subjects.FSUnwatchRequest](req)
		if err != nil {
			return nil, err
		}
		return s.fsUnwatch(id, in)
	}
	ctx, cancel := context.WithTimeout(ctx, quickTimeout)
	defer cancel()
	switch verb {
	case subjects.VerbFSStat:
		in, err := decode[subjects.FSPathRequest](req)
		if err != nil {
			return nil, err
		}
		return files.FSStat(ctx, id, in)
	case subjects.VerbFSList:
		in, err := decode[subjects.FSListRequest](req)
		if err != nil {
			return nil, err
		}
		out, err := files.FSList(ctx, id, in)
		if err != nil {
			return nil, err
		}
		s.fitList(&out)
		return out, nil
	case subjects.VerbFSMkdir:
		in, err := decode[subjects.FSMkdirRequest](req)
		if err != nil {
			return nil, err
		}
		return files.FSMkdir(ctx, id, in)
	case subjects.VerbFSRemove:
		in, err := decode[subjects.FSRemoveRequest](req)
		if err != nil {
			return nil, err
		}
		return files.FSRemove(ctx, id, in)
	case subjects.VerbFSRename:
		in, err := decode[subjects.FSRenameRequest](req)
		if err != nil {
			return nil, err
		}
		return files.FSRename(ctx, id, in)
	}
	return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("unknown file verb %q: want one of %v", verb, subjects.FSVerbs))
}

// fitList cuts a list reply to the server's max payload (marking it
// truncated).
func (s *Service) fitList(out *subjects.FSListReply) {
	limit := s.maxPayload() - fsHeadroom
	b, _ := json.Marshal(out)
	for len(b) > limit && len(out.Entries) > 0 {
		keep := len(out.Entries) * limit / len(b) * 9 / 10
		out.Entries, out.Truncated = out.Entries[:keep], true
		b, _ = json.Marshal(out)
	}
}

// limitBuffer is a bytes.Buffer that refuses to grow past max.
type limitBuffer struct {
	bytes.Buffer
	max int
}

func (l *limitBuffer) Write(p []byte) (int, error) {
	if l.Len()+len(p) > l.max {
		return 0, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("the file is larger than %d bytes (one message): read it with \"stream\": true", l.max))
	}
	return l.Buffer.Write(p)
}

// fsRead answers fs.read: whole in the reply, or streamed in chunks to the
// reply subject under flow control, then the reply.
func (s *Service) fsRead(ctx context.Context, req micro.Request, files Files, id string, in subjects.FSReadRequest) (any, error) {
	qctx, cancel := context.WithTimeout(ctx, quickTimeout)
	fi, err := files.FSStat(qctx, id, subjects.FSPathRequest{Path: in.Path, User: in.User})
	cancel()
	if err != nil {
		return nil, err
	}
	if !in.Stream {
		if fi.Type == subjects.FileTypeFile && fi.Size > int64(s.inlineMax()) {
			return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("%s is %d bytes, more than one message holds (%d): read it with \"stream\": true", in.Path, fi.Size, s.inlineMax()))
		}
		ctx, cancel := context.WithTimeout(ctx, quickTimeout)
		defer cancel()
		buf := &limitBuffer{max: s.inlineMax()}
		n, err := files.FSReadTo(ctx, id, in, buf)
		if err != nil {
			return nil, err
		}
		sum := sha256.Sum256(buf.Bytes())
		return subjects.FSReadReply{File: fi, Data: buf.Bytes(), Size: n, SHA256: hex.EncodeToString(sum[:])}, nil
	}
	if req.Reply() == "" {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, errors.New("a streamed read needs a reply subject"))
	}
	tid := newTransferID()
	t, err := s.fs.addTransfer(tid, id, clientOf(req.Reply()), 4*fsWindow)
	if err != nil {
		return nil, err
	}
	defer s.fs.removeTransfer(tid)
	ctx, cancel = context.WithTimeout(ctx, fsTransferTimeout)
	defer cancel()
	cw := &chunkWriter{s: s, ctx: ctx, t: t, tid: tid, reply: req.Reply(), buf: make([]byte, 0, s.chunkSize()), h: sha256.New(), acked: -1}
	n, err := files.FSReadTo(ctx, id, in, cw)
	if err == nil {
		err = cw.flush()
	}
	if err != nil {
		if cw.err != nil {
			err = cw.err // the transfer's own failure says more
		}
		return nil, err
	}
	return subjects.FSReadReply{File: fi, Size: n, SHA256: hex.EncodeToString(cw.h.Sum(nil)), Chunks: cw.seq}, nil
}

// chunkWriter sends what it is given as chunk messages, at most fsWindow
// of them unacknowledged.
type chunkWriter struct {
	s     *Service
	ctx   context.Context
	t     *transfer
	tid   string
	reply string
	buf   []byte
	h     hash.Hash
	seq   int // next chunk's number
	acked int // last acknowledged chunk
	err   error
}

func (w *chunkWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		k := min(len(p), cap(w.buf)-len(w.buf))
		w.buf = append(w.buf, p[:k]...)
		p, n = p[k:], n+k
		if len(w.buf) == cap(w.buf) {
			if err := w.flush(); err != nil {
				return n, err
			}
		}
	}
	return n, nil
}

// flush sends the buffered bytes as one chunk, once the window allows.
func (w *chunkWriter) flush() error {
	if len(w.buf) == 0 {
		return nil
	}
	idle := time.NewTimer(fsIdle)
	defer idle.Stop()
	for w.seq-w.acked > fsWindow {
		select {
		case m := <-w.t.in:
			a, err := strconv.Atoi(m.Header.Get(subjects.HeaderAck))
			if err != nil || a >= w.seq {
				w.err = errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("transfer %s: bad ack %q", w.tid, m.Header.Get(subjects.HeaderAck)))
				return w.err
			}
			w.acked = max(w.acked, a)
			idle.Reset(fsIdle)
		case <-idle.C:
			w.err = errdefs.Wrap(errdefs.ErrTimeout, fmt.Errorf("transfer %s: no ack for %s", w.tid, fsIdle))
			return w.err
		case <-w.ctx.Done():
			return w.ctx.Err()
		}
	}
	m := &nats.Msg{Subject: w.reply, Data: w.buf, Header: nats.Header{}}
	m.Header.Set(subjects.HeaderTransfer, w.tid)
	m.Header.Set(subjects.HeaderSeq, strconv.Itoa(w.seq))
	if err := w.s.nc.PublishMsg(m); err != nil {
		w.err = fmt.Errorf("transfer %s: send chunk: %w", w.tid, err)
		return w.err
	}
	w.h.Write(w.buf)
	w.seq++
	w.buf = make([]byte, 0, cap(w.buf)) // the published message may still hold the old one
	return nil
}

// fsWrite answers fs.write: whole from the request, or streamed in chunks
// that the client sends to fs.chunk.<transfer id> under flow control.
func (s *Service) fsWrite(ctx context.Context, req micro.Request, files Files, id string, in subjects.FSWriteRequest) (any, error) {
	if in.SHA256 != "" {
		if b, err := hex.DecodeString(in.SHA256); err != nil || len(b) != sha256.Size {
			return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("sha256 %q: want 64 lowercase hex digits", in.SHA256))
		}
	}
	if !in.Stream {
		ctx, cancel := context.WithTimeout(ctx, quickTimeout)
		defer cancel()
		data := in.Data
		in.Data = nil
		return files.FSWriteFrom(ctx, id, in, bytes.NewReader(data), nil)
	}
	if len(in.Data) > 0 {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, errors.New("a streamed write carries its content in chunks, not in data"))
	}
	if req.Reply() == "" {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, errors.New("a streamed write needs a reply subject"))
	}
	tid := newTransferID()
	t, err := s.fs.addTransfer(tid, id, clientOf(req.Reply()), fsWindow+2)
	if err != nil {
		return nil, err
	}
	defer s.fs.removeTransfer(tid)
	ctx, cancel := context.WithTimeout(ctx, fsTransferTimeout)
	defer cancel()
	send := func(h nats.Header, body []byte) error {
		h.Set(subjects.HeaderTransfer, tid)
		return s.nc.PublishMsg(&nats.Msg{Subject: req.Reply(), Header: h, Data: body})
	}
	start, _ := json.Marshal(subjects.FSTransfer{Transfer: tid, Subject: s.subj.FSChunk(id, tid), ChunkSize: s.chunkSize(), Window: fsWindow})
	if err := send(nats.Header{}, start); err != nil {
		return nil, fmt.Errorf("transfer %s: send start: %w", tid, err)
	}

	pr, pw := io.Pipe()
	h := sha256.New()
	var claimed string // the client's digest, from its last message
	type result struct {
		reply subjects.FSWriteReply
		err   error
	}
	done := make(chan result, 1)
	go func() {
		r, err := files.FSWriteFrom(ctx, id, in, pr, func() string { return claimed })
		pr.CloseWithError(errors.New("write ended"))
		done <- result{r, err}
	}()
	fail := func(err error) (any, error) {
		pw.CloseWithError(err) // the guest drops its temporary file
		cancel()
		<-done
		return nil, err
	}
	idle := time.NewTimer(fsIdle)
	defer idle.Stop()
	for seq := 0; ; seq++ {
		var m *nats.Msg
		select {
		case m = <-t.in:
		case <-t.broken:
		case <-idle.C:
			return fail(errdefs.Wrap(errdefs.ErrTimeout, fmt.Errorf("transfer %s: no chunk for %s", tid, fsIdle)))
		case r := <-done:
			if r.err == nil {
				r.err = fmt.Errorf("transfer %s: the guest write ended early", tid)
			}
			return nil, r.err
		case <-ctx.Done():
			return fail(ctx.Err())
		}
		idle.Reset(fsIdle)
		if t.overflow.Load() {
			return fail(errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("transfer %s: more than %d chunks unacknowledged", tid, fsWindow)))
		}
		if got := m.Header.Get(subjects.HeaderSeq); got != strconv.Itoa(seq) {
			return fail(errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("transfer %s: chunk %q, want %d", tid, got, seq)))
		}
		if len(m.Data) > 0 {
			if _, err := pw.Write(m.Data); err != nil {
				return fail(fmt.Errorf("transfer %s: %w", tid, err))
			}
			h.Write(m.Data)
		}
		if m.Header.Get(subjects.HeaderEOF) != "" {
			sum := hex.EncodeToString(h.Sum(nil))
			claimed = m.Header.Get(subjects.HeaderSHA256)
			if (claimed != "" && claimed != sum) || (in.SHA256 != "" && in.SHA256 != sum) {
				return fail(errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("transfer %s: sha256 of the bytes received is %s, the client said %s: file left as it was", tid, sum, claimed+in.SHA256)))
			}
			claimed = sum
			pw.Close()
			r := <-done
			return r.reply, r.err
		}
		t.acked.Store(int64(seq))
		ack := nats.Header{}
		ack.Set(subjects.HeaderAck, strconv.Itoa(seq))
		if err := send(ack, nil); err != nil {
			return fail(fmt.Errorf("transfer %s: send ack: %w", tid, err))
		}
	}
}

// fsWatch answers fs.watch: it starts a watch that publishes to the
// caller's subject until fs.unwatch, the directory going, or the sandbox
// ending, and answers once the guest watches.
func (s *Service) fsWatch(ctx context.Context, files Files, id, client string, in subjects.FSWatchRequest) (any, error) {
	// At most 256 bytes (checkLiveSubject): the subject rides in the body,
	// so the server's control line does not bound it, and a publish to a
	// longer one than that line would get the worker's connection cut.
	if in.Subject == "" || s.checkLiveSubject("subject", in.Subject) != nil || strings.Contains(in.Subject, "..") || strings.HasSuffix(in.Subject, ".") {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("watch subject %q: want a subject of at most 256 bytes under %v without wildcards", cutSubject(in.Subject), s.cfg.ReplyPrefixes))
	}
	wid := newTransferID()
	wctx, cancel := context.WithCancel(s.ctx)
	if err := s.fs.addWatch(wid, &watch{sandbox: id, client: client, cancel: cancel}); err != nil {
		cancel()
		return nil, err
	}

	publish := func(msg subjects.FSWatchMessage) {
		msg.Watch = wid
		b, _ := json.Marshal(msg)
		if err := s.nc.Publish(in.Subject, b); err != nil {
			s.log.Warn("publish watch events", "sandbox", id, "watch", wid, "err", err)
		}
	}
	queue := make(chan []subjects.WatchEvent, fsWatchQueue)
	var dropped atomic.Int64
	ready := make(chan struct{})
	ended := make(chan error, 1)
	go func() {
		err := files.FSWatch(wctx, id, in, func() { close(ready) }, func(evs []subjects.WatchEvent) {
			select {
			case queue <- evs:
			default:
				dropped.Add(int64(len(evs)))
			}
		})
		close(queue)
		ended <- err
	}()
	go func() {
		defer func() {
			s.fs.mu.Lock()
			s.fs.removeWatchLocked(wid)
			s.fs.mu.Unlock()
			cancel()
		}()
		for evs := range queue {
			publish(subjects.FSWatchMessage{Events: evs, Dropped: dropped.Swap(0)})
		}
		select {
		case <-ready:
		default:
			return // never started: the request answers with the error
		}
		err := <-ended
		end := subjects.FSWatchMessage{End: true, Dropped: dropped.Swap(0)}
		if err != nil && wctx.Err() == nil {
			end.Error = &subjects.ErrorDetail{Code: subjects.CodeOf(err), Message: err.Error()}
		}
		publish(end)
	}()
	qctx, qcancel := context.WithTimeout(ctx, quickTimeout)
	defer qcancel()
	select {
	case <-ready:
		return subjects.FSWatchReply{Watch: wid, Subject: in.Subject}, nil
	case err := <-ended:
		select {
		case <-ready: // started, and already over: the publisher ends it
			ended <- err
			return subjects.FSWatchReply{Watch: wid, Subject: in.Subject}, nil
		default:
		}
		cancel()
		if err == nil {
			err = errors.New("watch ended before it started")
		}
		return nil, err
	case <-qctx.Done():
		cancel()
		return nil, errdefs.Wrap(errdefs.ErrTimeout, errors.New("the guest did not start the watch in time"))
	}
}

// fsUnwatch answers fs.unwatch.
func (s *Service) fsUnwatch(id string, in subjects.FSUnwatchRequest) (any, error) {
	s.fs.mu.Lock()
	w := s.fs.watches[in.Watch]
	if w != nil && w.sandbox == id {
		s.fs.removeWatchLocked(in.Watch)
	}
	s.fs.mu.Unlock()
	if w == nil || w.sandbox != id {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("sandbox %s has no watch %q", id, in.Watch))
	}
	w.cancel()
	return subjects.FSReply{OK: true}, nil
}
