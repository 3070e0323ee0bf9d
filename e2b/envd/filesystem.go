package envd

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"path"
	"strconv"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/firkin-dev/firkin-worker/agent"
	"github.com/firkin-dev/firkin-worker/client"
	pb "github.com/firkin-dev/firkin-worker/e2b/envd/gen/filesystem"
	"github.com/firkin-dev/firkin-worker/e2b/envd/gen/filesystem/filesystemconnect"
	"github.com/firkin-dev/firkin-worker/subjects"
)

type filesystemService struct{ s *Server }

var _ filesystemconnect.FilesystemHandler = (*filesystemService)(nil)

// userPath resolves a request's path for its user.
func (f *filesystemService) userPath(p string, hdr connectHeader) (*client.Client, string, error) {
	user, err := f.s.connectUser(hdr.Header())
	if err != nil {
		return nil, "", err
	}
	gp, err := guestPath(p, user)
	if err != nil {
		return nil, "", connect.NewError(connect.CodeInvalidArgument, err)
	}
	return f.s.cfg.Client.AsUser(user), gp, nil
}

// connectHeader is what every Connect request has.
type connectHeader interface{ Header() http.Header }

// Stat describes a guest path.
func (f *filesystemService) Stat(ctx context.Context, req *connect.Request[pb.StatRequest]) (*connect.Response[pb.StatResponse], error) {
	c, p, err := f.userPath(req.Msg.GetPath(), req)
	if err != nil {
		return nil, err
	}
	fi, err := c.Stat(ctx, sandboxOf(ctx), p)
	if err != nil {
		return nil, connectError(err)
	}
	return connect.NewResponse(&pb.StatResponse{Entry: entryInfo(fi)}), nil
}

// MakeDir makes a directory and its parents; AlreadyExists when it is
// there.
func (f *filesystemService) MakeDir(ctx context.Context, req *connect.Request[pb.MakeDirRequest]) (*connect.Response[pb.MakeDirResponse], error) {
	c, p, err := f.userPath(req.Msg.GetPath(), req)
	if err != nil {
		return nil, err
	}
	id := sandboxOf(ctx)
	if _, err := c.Stat(ctx, id, p); err == nil {
		return nil, connect.NewError(connect.CodeAlreadyExists, fmt.Errorf("path %s already exists", p))
	}
	if err := c.Mkdir(ctx, id, p, 0o755, true); err != nil {
		return nil, connectError(err)
	}
	fi, err := c.Stat(ctx, id, p)
	if err != nil {
		return nil, connectError(err)
	}
	return connect.NewResponse(&pb.MakeDirResponse{Entry: entryInfo(fi)}), nil
}

// Move renames a guest path.
func (f *filesystemService) Move(ctx context.Context, req *connect.Request[pb.MoveRequest]) (*connect.Response[pb.MoveResponse], error) {
	c, from, err := f.userPath(req.Msg.GetSource(), req)
	if err != nil {
		return nil, err
	}
	_, to, err := f.userPath(req.Msg.GetDestination(), req)
	if err != nil {
		return nil, err
	}
	id := sandboxOf(ctx)
	if err := c.Rename(ctx, id, from, to); err != nil {
		return nil, connectError(err)
	}
	fi, err := c.Stat(ctx, id, to)
	if err != nil {
		return nil, connectError(err)
	}
	return connect.NewResponse(&pb.MoveResponse{Entry: entryInfo(fi)}), nil
}

// ListDir lists a directory down to depth levels (0 or 1: its entries).
func (f *filesystemService) ListDir(ctx context.Context, req *connect.Request[pb.ListDirRequest]) (*connect.Response[pb.ListDirResponse], error) {
	c, p, err := f.userPath(req.Msg.GetPath(), req)
	if err != nil {
		return nil, err
	}
	depth := int(min(req.Msg.GetDepth(), agent.MaxListDepth)) // deeper is cut, as the worker allows no more
	r, err := c.ListFiles(ctx, sandboxOf(ctx), p, depth)
	if err != nil {
		return nil, connectError(err)
	}
	res := &pb.ListDirResponse{Entries: make([]*pb.EntryInfo, 0, len(r.Entries))}
	for _, fi := range r.Entries {
		res.Entries = append(res.Entries, entryInfo(fi))
	}
	return connect.NewResponse(res), nil
}

// Remove removes a file or a directory with what it holds.
func (f *filesystemService) Remove(ctx context.Context, req *connect.Request[pb.RemoveRequest]) (*connect.Response[pb.RemoveResponse], error) {
	c, p, err := f.userPath(req.Msg.GetPath(), req)
	if err != nil {
		return nil, err
	}
	if p == "/" {
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("will not remove /"))
	}
	if err := c.Remove(ctx, sandboxOf(ctx), p, true); err != nil {
		return nil, connectError(err)
	}
	return connect.NewResponse(&pb.RemoveResponse{}), nil
}

// watch starts a fs.watch of a directory; a recursive one watches the
// directories below it too, and its event names are paths relative to the
// watched directory, as envd's are.
func (f *filesystemService) watch(ctx context.Context, p string, recursive bool, hdr connectHeader) (*client.Watcher, string, error) {
	c, gp, err := f.userPath(p, hdr)
	if err != nil {
		return nil, "", err
	}
	watch := c.Watch
	if recursive {
		watch = c.WatchRecursive
	}
	w, err := watch(ctx, sandboxOf(ctx), gp)
	if err != nil {
		return nil, "", connectError(err)
	}
	return w, gp, nil
}

// WatchDir streams the changes in a directory until the client goes or
// the directory does.
func (f *filesystemService) WatchDir(ctx context.Context, req *connect.Request[pb.WatchDirRequest], stream *connect.ServerStream[pb.WatchDirResponse]) error {
	w, _, err := f.watch(ctx, req.Msg.GetPath(), req.Msg.GetRecursive(), req)
	if err != nil {
		return err
	}
	defer w.Close()
	if err := stream.Send(&pb.WatchDirResponse{Event: &pb.WatchDirResponse_Start{Start: &pb.WatchDirResponse_StartEvent{}}}); err != nil {
		return err
	}
	ka := time.NewTicker(keepaliveEvery(req.Header()))
	defer ka.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-ka.C:
			if err := stream.Send(&pb.WatchDirResponse{Event: &pb.WatchDirResponse_Keepalive{Keepalive: &pb.WatchDirResponse_KeepAlive{}}}); err != nil {
				return err
			}
		case ev, ok := <-w.Events():
			if !ok {
				if err := w.Err(); err != nil {
					return connectError(err)
				}
				return nil
			}
			for _, fe := range fsEvents(ev) {
				if err := stream.Send(&pb.WatchDirResponse{Event: &pb.WatchDirResponse_Filesystem{Filesystem: fe}}); err != nil {
					return err
				}
			}
		}
	}
}

// fsEvents maps a firkin watch event to envd's (a rename is the old
// name's RENAME and the new name's CREATE, as inotify reports it to envd).
// A firkin write's temporary file is not shown: its rename into place is
// the file's CREATE and WRITE, as a write in place would be.
func fsEvents(ev subjects.WatchEvent) []*pb.FilesystemEvent {
	mk := func(name string, t pb.EventType) *pb.FilesystemEvent { return &pb.FilesystemEvent{Name: name, Type: t} }
	if agent.IsWriteTemp(ev.Name) {
		if ev.Op == subjects.WatchRename && ev.To != "" && !agent.IsWriteTemp(ev.To) {
			return []*pb.FilesystemEvent{mk(ev.To, pb.EventType_EVENT_TYPE_CREATE), mk(ev.To, pb.EventType_EVENT_TYPE_WRITE)}
		}
		return nil
	}
	switch ev.Op {
	case subjects.WatchCreate:
		return []*pb.FilesystemEvent{mk(ev.Name, pb.EventType_EVENT_TYPE_CREATE)}
	case subjects.WatchWrite:
		return []*pb.FilesystemEvent{mk(ev.Name, pb.EventType_EVENT_TYPE_WRITE)}
	case subjects.WatchRemove:
		return []*pb.FilesystemEvent{mk(ev.Name, pb.EventType_EVENT_TYPE_REMOVE)}
	case subjects.WatchRename:
		out := []*pb.FilesystemEvent{mk(ev.Name, pb.EventType_EVENT_TYPE_RENAME)}
		if ev.To != "" {
			out = append(out, mk(ev.To, pb.EventType_EVENT_TYPE_CREATE))
		}
		return out
	}
	return nil
}

// watcher is a CreateWatcher watch: its events wait for GetWatcherEvents.
type watcher struct {
	sandbox  string
	w        *client.Watcher
	lastUsed time.Time // guarded by Server.mu
}

// sweepWatchers ends the watchers nobody polled for watcherIdle (their
// client went away, or their sandbox did); s.mu is held.
func (s *Server) sweepWatchers(now time.Time) {
	for wid, w := range s.watchers {
		if now.Sub(w.lastUsed) > watcherIdle {
			delete(s.watchers, wid)
			go func() { _ = w.w.Close() }()
		}
	}
}

// reserveWatcher takes a watcher slot of sandbox id, counting the
// watchers being made (a watch takes a round trip to the guest): without
// that, concurrent CreateWatcher calls all passed the bounds. Give it back
// with unreserveWatcher once the watcher is in the map (or failed).
func (s *Server) reserveWatcher(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sweepWatchers(time.Now())
	n := s.pendingWatchers[id]
	for _, w := range s.watchers {
		if w.sandbox == id {
			n++
		}
	}
	total := len(s.watchers) + s.pendingTotal
	if n >= maxWatchersPerSandbox || total >= maxWatchers {
		return connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("sandbox has %d watchers (the worker %d), the most allowed", n, total))
	}
	if s.pendingWatchers == nil {
		s.pendingWatchers = map[string]int{}
	}
	s.pendingWatchers[id]++
	s.pendingTotal++
	return nil
}

// unreserveWatcher gives back a slot reserveWatcher took.
func (s *Server) unreserveWatcher(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pendingWatchers[id]--; s.pendingWatchers[id] <= 0 {
		delete(s.pendingWatchers, id)
	}
	s.pendingTotal--
}

// CreateWatcher starts a watch whose events GetWatcherEvents collects.
func (f *filesystemService) CreateWatcher(ctx context.Context, req *connect.Request[pb.CreateWatcherRequest]) (*connect.Response[pb.CreateWatcherResponse], error) {
	id := sandboxOf(ctx)
	if err := f.s.reserveWatcher(id); err != nil {
		return nil, err
	}
	defer f.s.unreserveWatcher(id)
	// The watch outlives this request: it ends with RemoveWatcher.
	w, _, err := f.watch(context.WithoutCancel(ctx), req.Msg.GetPath(), req.Msg.GetRecursive(), req)
	if err != nil {
		return nil, err
	}
	wid := w.ID()
	f.s.mu.Lock()
	if f.s.closed {
		f.s.mu.Unlock()
		_ = w.Close()
		return nil, connect.NewError(connect.CodeUnavailable, errors.New("shutting down"))
	}
	f.s.watchers[wid] = &watcher{sandbox: id, w: w, lastUsed: time.Now()}
	f.s.mu.Unlock()
	return connect.NewResponse(&pb.CreateWatcherResponse{WatcherId: wid}), nil
}

// lookupWatcher finds a watcher of the request's sandbox.
func (f *filesystemService) lookupWatcher(ctx context.Context, wid string) (*watcher, error) {
	f.s.mu.Lock()
	defer f.s.mu.Unlock()
	w := f.s.watchers[wid]
	if w == nil || w.sandbox != sandboxOf(ctx) {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("watcher %q not found", wid))
	}
	w.lastUsed = time.Now()
	return w, nil
}

// GetWatcherEvents returns the events since the last call.
func (f *filesystemService) GetWatcherEvents(ctx context.Context, req *connect.Request[pb.GetWatcherEventsRequest]) (*connect.Response[pb.GetWatcherEventsResponse], error) {
	w, err := f.lookupWatcher(ctx, req.Msg.GetWatcherId())
	if err != nil {
		return nil, err
	}
	res := &pb.GetWatcherEventsResponse{}
	for len(res.Events) < maxWatcherEvents {
		select {
		case ev, ok := <-w.w.Events():
			if !ok {
				f.s.mu.Lock()
				delete(f.s.watchers, req.Msg.GetWatcherId())
				f.s.mu.Unlock()
				if len(res.Events) == 0 {
					return nil, connect.NewError(connect.CodeNotFound, errors.New("the watch ended"))
				}
				return connect.NewResponse(res), nil
			}
			res.Events = append(res.Events, fsEvents(ev)...)
		default:
			return connect.NewResponse(res), nil
		}
	}
	return connect.NewResponse(res), nil
}

// RemoveWatcher ends a watch.
func (f *filesystemService) RemoveWatcher(ctx context.Context, req *connect.Request[pb.RemoveWatcherRequest]) (*connect.Response[pb.RemoveWatcherResponse], error) {
	w, err := f.lookupWatcher(ctx, req.Msg.GetWatcherId())
	if err != nil {
		return nil, err
	}
	f.s.mu.Lock()
	delete(f.s.watchers, req.Msg.GetWatcherId())
	f.s.mu.Unlock()
	_ = w.w.Close()
	return connect.NewResponse(&pb.RemoveWatcherResponse{}), nil
}

// entryInfo is envd's EntryInfo of a firkin FileInfo.
func entryInfo(fi subjects.FileInfo) *pb.EntryInfo {
	e := &pb.EntryInfo{
		Name:         path.Base(fi.Path),
		Path:         fi.Path,
		Size:         fi.Size,
		Mode:         fi.Mode & 0o7777,
		Owner:        ownerName(fi.UID),
		Group:        ownerName(fi.GID),
		ModifiedTime: timestamppb.New(fi.MTime),
		Metadata:     map[string]string{},
	}
	mode := fs.FileMode(fi.Mode & 0o777)
	switch fi.Type {
	case subjects.FileTypeFile:
		e.Type = pb.FileType_FILE_TYPE_FILE
	case subjects.FileTypeDir:
		e.Type = pb.FileType_FILE_TYPE_DIRECTORY
		mode |= fs.ModeDir
		e.Mode |= uint32(fs.ModeDir)
	case subjects.FileTypeSymlink:
		e.Type = pb.FileType_FILE_TYPE_SYMLINK
		mode |= fs.ModeSymlink
		if fi.Link != "" {
			link := fi.Link
			e.SymlinkTarget = &link
		}
	}
	e.Permissions = mode.String()
	return e
}

// ownerName names the ids of firkin's images (root, user); others are
// numbers.
func ownerName(id uint32) string {
	switch id {
	case 0:
		return "root"
	case 1000:
		return "user"
	}
	return strconv.FormatUint(uint64(id), 10)
}
