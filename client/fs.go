package client

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// transferIdle bounds how long a streamed transfer waits for the worker's
// next message.
const transferIdle = 60 * time.Second

// AsUser returns a client on c's connection whose file operations (Stat,
// ListFiles, Mkdir, Remove, Rename, ReadFile, WriteFile and the *Bytes
// forms) run as user in the guest (a name, uid or uid:gid, as exec's
// user): the guest checks permissions as it would for that user. Watches
// run as root.
func (c *Client) AsUser(user string) *Client {
	return &Client{nc: c.nc, subj: c.subj, fsUser: user}
}

// Stat describes the guest file at path in sandbox id (a final symlink is
// not followed). A missing path is file_not_found.
func (c *Client) Stat(ctx context.Context, id, path string) (subjects.FileInfo, error) {
	var fi subjects.FileInfo
	err := c.Request(ctx, c.subj.Sandbox(id, subjects.VerbFSStat), subjects.FSPathRequest{Path: path, User: c.fsUser}, &fi)
	return fi, err
}

// ListFiles lists the guest directory at path, down to depth levels (0 or
// 1: its entries only).
func (c *Client) ListFiles(ctx context.Context, id, path string, depth int) (subjects.FSListReply, error) {
	var r subjects.FSListReply
	err := c.Request(ctx, c.subj.Sandbox(id, subjects.VerbFSList), subjects.FSListRequest{Path: path, Depth: depth, User: c.fsUser}, &r)
	return r, err
}

// Mkdir makes a guest directory (mode 0: 0755); with parents, mkdir -p.
func (c *Client) Mkdir(ctx context.Context, id, path string, mode fs.FileMode, parents bool) error {
	return c.Request(ctx, c.subj.Sandbox(id, subjects.VerbFSMkdir), subjects.FSMkdirRequest{Path: path, Mode: uint32(mode.Perm()), Parents: parents, User: c.fsUser}, nil)
}

// Remove removes a guest file or empty directory; with recursive, rm -r.
func (c *Client) Remove(ctx context.Context, id, path string, recursive bool) error {
	return c.Request(ctx, c.subj.Sandbox(id, subjects.VerbFSRemove), subjects.FSRemoveRequest{Path: path, Recursive: recursive, User: c.fsUser}, nil)
}

// Rename renames a guest file or directory.
func (c *Client) Rename(ctx context.Context, id, from, to string) error {
	return c.Request(ctx, c.subj.Sandbox(id, subjects.VerbFSRename), subjects.FSRenameRequest{Path: from, To: to, User: c.fsUser}, nil)
}

// transferStream is the private inbox of one streamed transfer: the
// worker's messages arrive there in order.
type transferStream struct {
	c       *Client
	subject string
	sub     *nats.Subscription
}

func (c *Client) openTransfer(ctx context.Context, subject string, req any) (*transferStream, error) {
	data, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("%s: encode request: %w", subject, err)
	}
	inbox := c.nc.NewInbox()
	sub, err := c.nc.SubscribeSync(inbox)
	if err != nil {
		return nil, fmt.Errorf("%s: subscribe: %w", subject, err)
	}
	if err := c.nc.PublishRequest(subject, inbox, data); err != nil {
		_ = sub.Unsubscribe()
		return nil, fmt.Errorf("%s: %w", subject, err)
	}
	return &transferStream{c: c, subject: subject, sub: sub}, nil
}

func (t *transferStream) close() { _ = t.sub.Unsubscribe() }

// next returns the next message from the worker; a no-responders status
// becomes the error it means.
func (t *transferStream) next(ctx context.Context) (*nats.Msg, error) {
	ctx, cancel := context.WithTimeout(ctx, transferIdle)
	defer cancel()
	m, err := t.sub.NextMsgWithContext(ctx)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			err = errdefs.Wrap(errdefs.ErrTimeout, err)
		}
		return nil, fmt.Errorf("%s: %w", t.subject, err)
	}
	if len(m.Data) == 0 && m.Header.Get("Status") == "503" {
		return nil, t.c.noResponders(t.subject)
	}
	return m, nil
}

// ReadFile streams the guest file at path in sandbox id into w, in chunks
// under flow control (the worker waits while w does), and checks the size
// and SHA-256 the worker reports against what arrived. It returns the
// worker's reply (file info, size, digest). Files of any size: nothing is
// held in memory beyond a few chunks.
func (c *Client) ReadFile(ctx context.Context, id, path string, w io.Writer) (subjects.FSReadReply, error) {
	subject := c.subj.Sandbox(id, subjects.VerbFSRead)
	t, err := c.openTransfer(ctx, subject, subjects.FSReadRequest{Path: path, Stream: true, User: c.fsUser})
	if err != nil {
		return subjects.FSReadReply{}, err
	}
	defer t.close()
	h := sha256.New()
	var n int64
	seq := 0
	for {
		m, err := t.next(ctx)
		if err != nil {
			return subjects.FSReadReply{}, err
		}
		tid := m.Header.Get(subjects.HeaderTransfer)
		if tid == "" || m.Header.Get(subjects.HeaderSeq) == "" {
			var r subjects.FSReadReply
			if err := decodeReply(subject, m, &r); err != nil {
				return subjects.FSReadReply{}, err
			}
			if sum := hex.EncodeToString(h.Sum(nil)); r.Size != n || r.SHA256 != sum || r.Chunks != seq {
				return r, errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("%s: received %d bytes in %d chunks with sha256 %s, the worker sent %d in %d with %s", subject, n, seq, sum, r.Size, r.Chunks, r.SHA256))
			}
			return r, nil
		}
		if got := m.Header.Get(subjects.HeaderSeq); got != strconv.Itoa(seq) {
			return subjects.FSReadReply{}, errdefs.Wrap(errdefs.ErrProtocol, fmt.Errorf("%s: chunk %s, want %d", subject, got, seq))
		}
		if _, err := w.Write(m.Data); err != nil {
			return subjects.FSReadReply{}, fmt.Errorf("%s: write: %w", subject, err)
		}
		h.Write(m.Data)
		n += int64(len(m.Data))
		ack := &nats.Msg{Subject: c.subj.FSAck(id, tid), Header: nats.Header{}}
		ack.Header.Set(subjects.HeaderAck, strconv.Itoa(seq))
		if err := c.nc.PublishMsg(ack); err != nil {
			return subjects.FSReadReply{}, fmt.Errorf("%s: ack: %w", subject, err)
		}
		seq++
	}
}

// WriteFileOptions are those of WriteFile.
type WriteFileOptions struct {
	// Mode of the file (0: the old file's, or 0644).
	Mode fs.FileMode
	// Parents makes missing parent directories.
	Parents bool
}

// WriteFile streams r into the guest file at path in sandbox id, in chunks
// under flow control, atomically: the guest renames the new file into
// place only once everything arrived and its SHA-256 matches the one
// computed here; on any failure the old file stays. Sources of any size.
func (c *Client) WriteFile(ctx context.Context, id, path string, r io.Reader, opts WriteFileOptions) (subjects.FSWriteReply, error) {
	subject := c.subj.Sandbox(id, subjects.VerbFSWrite)
	t, err := c.openTransfer(ctx, subject, subjects.FSWriteRequest{Path: path, Mode: uint32(opts.Mode.Perm()), Parents: opts.Parents, Stream: true, User: c.fsUser})
	if err != nil {
		return subjects.FSWriteReply{}, err
	}
	defer t.close()
	final := func(m *nats.Msg) (subjects.FSWriteReply, error) {
		var reply subjects.FSWriteReply
		err := decodeReply(subject, m, &reply)
		return reply, err
	}
	m, err := t.next(ctx)
	if err != nil {
		return subjects.FSWriteReply{}, err
	}
	if m.Header.Get(subjects.HeaderTransfer) == "" {
		return final(m) // an error before the transfer started
	}
	var start subjects.FSTransfer
	if err := json.Unmarshal(m.Data, &start); err != nil || start.ChunkSize <= 0 || start.Window <= 0 || start.Subject == "" {
		return subjects.FSWriteReply{}, errdefs.Wrap(errdefs.ErrProtocol, fmt.Errorf("%s: bad transfer start %q", subject, m.Data))
	}
	buf := make([]byte, start.ChunkSize)
	h := sha256.New()
	unacked := 0
	// wait takes one message from the worker: an ack, or its reply.
	wait := func() (*nats.Msg, error) {
		m, err := t.next(ctx)
		if err != nil {
			return nil, err
		}
		if m.Header.Get(subjects.HeaderAck) != "" {
			unacked--
			return nil, nil
		}
		return m, nil
	}
	for seq := 0; ; seq++ {
		n, rerr := io.ReadFull(r, buf)
		eof := errors.Is(rerr, io.EOF) || errors.Is(rerr, io.ErrUnexpectedEOF)
		if rerr != nil && !eof {
			// A chunk out of order ends the transfer at once; the guest
			// drops its temporary file.
			abort := &nats.Msg{Subject: start.Subject, Header: nats.Header{}}
			abort.Header.Set(subjects.HeaderSeq, "abort")
			_ = c.nc.PublishMsg(abort)
			return subjects.FSWriteReply{}, fmt.Errorf("%s: read source: %w (the file is left as it was)", subject, rerr)
		}
		h.Write(buf[:n])
		chunk := &nats.Msg{Subject: start.Subject, Data: buf[:n], Header: nats.Header{}}
		chunk.Header.Set(subjects.HeaderSeq, strconv.Itoa(seq))
		if eof {
			chunk.Header.Set(subjects.HeaderEOF, "1")
			chunk.Header.Set(subjects.HeaderSHA256, hex.EncodeToString(h.Sum(nil)))
		}
		for !eof && unacked >= start.Window {
			m, err := wait()
			if err != nil {
				return subjects.FSWriteReply{}, err
			}
			if m != nil {
				return final(m) // the worker ended it (an error)
			}
		}
		if err := c.nc.PublishMsg(chunk); err != nil {
			return subjects.FSWriteReply{}, fmt.Errorf("%s: send chunk: %w", subject, err)
		}
		if eof {
			break
		}
		unacked++
	}
	for {
		m, err := wait()
		if err != nil {
			return subjects.FSWriteReply{}, err
		}
		if m != nil {
			return final(m)
		}
	}
}

// ReadFileBytes reads a small guest file whole in one reply (at most what
// one message holds; larger files need ReadFile).
func (c *Client) ReadFileBytes(ctx context.Context, id, path string) ([]byte, error) {
	var r subjects.FSReadReply
	err := c.Request(ctx, c.subj.Sandbox(id, subjects.VerbFSRead), subjects.FSReadRequest{Path: path, User: c.fsUser}, &r)
	return r.Data, err
}

// WriteFileBytes writes a small guest file in one request.
func (c *Client) WriteFileBytes(ctx context.Context, id, path string, data []byte, opts WriteFileOptions) (subjects.FSWriteReply, error) {
	var r subjects.FSWriteReply
	err := c.Request(ctx, c.subj.Sandbox(id, subjects.VerbFSWrite), subjects.FSWriteRequest{Path: path, Data: data, Mode: uint32(opts.Mode.Perm()), Parents: opts.Parents, User: c.fsUser}, &r)
	return r, err
}

// Watcher delivers the changes in a watched guest directory.
type Watcher struct {
	c       *Client
	sandbox string
	sub     *nats.Subscription
	events  chan subjects.WatchEvent
	dropped atomic.Int64

	mu     sync.Mutex // guards the fields below and sends on events
	id     string
	err    error
	closed bool
}

// watchBuffer is how many events a Watcher holds for a slow reader before
// it drops (and counts) new ones.
const watchBuffer = 1024

// Watch watches the guest directory at path (not its subdirectories) and
// delivers its create, write, remove and rename events on the Watcher's
// Events channel until Close, ctx ending, the directory going or the
// sandbox ending (then Events is closed and Err says why: nil for a
// directory that went or a Close).
func (c *Client) Watch(ctx context.Context, id, path string) (*Watcher, error) {
	return c.watch(ctx, id, subjects.FSWatchRequest{Path: path})
}

// WatchRecursive is Watch of the directory at path and the directories
// below it (at most subjects.MaxWatchDirs, new ones as they appear): event
// names are paths relative to path, and a directory left unwatched at the
// bound comes as a subjects.WatchLimit event.
func (c *Client) WatchRecursive(ctx context.Context, id, path string) (*Watcher, error) {
	return c.watch(ctx, id, subjects.FSWatchRequest{Path: path, Recursive: true})
}

func (c *Client) watch(ctx context.Context, id string, req subjects.FSWatchRequest) (*Watcher, error) {
	w := &Watcher{c: c, sandbox: id, events: make(chan subjects.WatchEvent, watchBuffer)}
	inbox := c.nc.NewInbox()
	sub, err := c.nc.Subscribe(inbox, w.handle)
	if err != nil {
		return nil, fmt.Errorf("watch: subscribe: %w", err)
	}
	w.sub = sub
	var reply subjects.FSWatchReply
	if err := c.Request(ctx, c.subj.Sandbox(id, subjects.VerbFSWatch), subjects.FSWatchRequest{Path: req.Path, Subject: inbox, Recursive: req.Recursive}, &reply); err != nil {
		_ = sub.Unsubscribe()
		return nil, err
	}
	w.mu.Lock()
	w.id = reply.Watch
	w.mu.Unlock()
	context.AfterFunc(ctx, func() { _ = w.Close() })
	return w, nil
}

// handle takes one message of the watch's subject.
func (w *Watcher) handle(m *nats.Msg) {
	var msg subjects.FSWatchMessage
	if err := json.Unmarshal(m.Data, &msg); err != nil {
		return
	}
	w.dropped.Add(msg.Dropped)
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return
	}
	for _, ev := range msg.Events {
		select {
		case w.events <- ev:
		default:
			w.dropped.Add(1)
		}
	}
	if msg.End {
		if msg.Error != nil {
			w.err = &Error{Subject: w.c.subj.Sandbox(w.sandbox, subjects.VerbFSWatch), Code: msg.Error.Code, Message: msg.Error.Message}
		}
		w.closeLocked()
	}
}

// closeLocked closes Events once; w.mu is held.
func (w *Watcher) closeLocked() {
	if !w.closed {
		w.closed = true
		close(w.events)
		go func() { _ = w.sub.Unsubscribe() }()
	}
}

// Events delivers the events; it is closed when the watch ends.
func (w *Watcher) Events() <-chan subjects.WatchEvent { return w.events }

// ID is the watch's id.
func (w *Watcher) ID() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.id
}

// Dropped is how many events were lost: dropped by the worker or here
// because the reader was slow.
func (w *Watcher) Dropped() int64 { return w.dropped.Load() }

// Err says why the watch ended (nil while it runs, after Close, or when
// the directory went).
func (w *Watcher) Err() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// Close ends the watch (fs.unwatch) and closes Events.
func (w *Watcher) Close() error {
	w.mu.Lock()
	closed := w.closed
	w.mu.Unlock()
	if closed {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := w.c.Request(ctx, w.c.subj.Sandbox(w.sandbox, subjects.VerbFSUnwatch), subjects.FSUnwatchRequest{Watch: w.ID()}, nil)
	w.mu.Lock()
	w.closeLocked()
	w.mu.Unlock()
	if errors.Is(err, errdefs.ErrInvalidArgument) {
		err = nil // it had ended already
	}
	return err
}
