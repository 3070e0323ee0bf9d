package backend

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"

	"github.com/firkin-dev/firkin-worker/agent"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// agentMachine is what a machine must offer for file operations: its agent
// session (the qemu driver's machines do).
type agentMachine interface {
	Agent() (*agent.Client, error)
}

// fsAgent returns the file operations of a sandbox's machine, done as the
// guest user user ("" for root).
func (b *Backend) fsAgent(id, user string) (agent.Files, error) {
	c, err := b.fsClient(id)
	if err != nil {
		return agent.Files{}, err
	}
	if len(user) > 256 {
		return agent.Files{}, invalid("user: at most 256 bytes")
	}
	return c.Files(user), nil
}

// fsClient returns the agent session of a sandbox's machine.
func (b *Backend) fsClient(id string) (*agent.Client, error) {
	s, err := b.lookup(id)
	if err != nil {
		return nil, err
	}
	m, ok := s.mach().(agentMachine)
	if !ok {
		return nil, errdefs.Wrap(errdefs.ErrUnsupported, fmt.Errorf("sandbox %s: driver %s has no file operations", id, b.cfg.Driver.Name()))
	}
	return m.Agent()
}

// fileError classes a guest's file error for the wire: a missing guest path
// is file_not_found (not sandbox_not_found), a refusal permission_denied;
// the guest's reason stays in the message.
func fileError(err error) error {
	var re *agent.RemoteError
	if errors.As(err, &re) {
		switch re.Code {
		case agent.CodeNotFound:
			return errdefs.Wrap(subjects.ErrFileNotFound, err)
		case agent.CodePermissionDenied:
			return errdefs.Wrap(subjects.ErrPermissionDenied, err)
		}
	}
	return err
}

// fileInfo converts the agent's file description.
func fileInfo(fi agent.FileInfo) subjects.FileInfo {
	return subjects.FileInfo{Path: fi.Path, Type: fi.Type, Size: fi.Size, Mode: fi.Mode, UID: fi.UID, GID: fi.GID, MTime: fi.MTime, Link: fi.Link}
}

// checkPath refuses what is not a guest path before it reaches the guest.
func checkPath(what, p string) error {
	if p == "" || len(p) > 4096 {
		return invalid("%s: want a guest path of 1..4096 bytes", what)
	}
	for i := 0; i < len(p); i++ {
		if p[i] == 0 {
			return invalid("%s: a path has no NUL bytes", what)
		}
	}
	return nil
}

// FSStat describes the guest file at path.
func (b *Backend) FSStat(ctx context.Context, id string, req subjects.FSPathRequest) (subjects.FileInfo, error) {
	if err := checkPath("path", req.Path); err != nil {
		return subjects.FileInfo{}, err
	}
	c, err := b.fsAgent(id, req.User)
	if err != nil {
		return subjects.FileInfo{}, err
	}
	fi, err := c.Stat(ctx, req.Path)
	if err != nil {
		return subjects.FileInfo{}, fileError(err)
	}
	return fileInfo(fi), nil
}

// FSList lists a guest directory down to req.Depth levels (default 1).
func (b *Backend) FSList(ctx context.Context, id string, req subjects.FSListRequest) (subjects.FSListReply, error) {
	if err := checkPath("path", req.Path); err != nil {
		return subjects.FSListReply{}, err
	}
	if req.Depth == 0 {
		req.Depth = 1
	}
	if req.Depth < 1 || req.Depth > agent.MaxListDepth {
		return subjects.FSListReply{}, invalid("depth %d: want 1..%d", req.Depth, agent.MaxListDepth)
	}
	c, err := b.fsAgent(id, req.User)
	if err != nil {
		return subjects.FSListReply{}, err
	}
	ents, truncated, err := c.List(ctx, req.Path, req.Depth)
	if err != nil {
		return subjects.FSListReply{}, fileError(err)
	}
	out := subjects.FSListReply{Entries: make([]subjects.FileInfo, len(ents)), Truncated: truncated}
	for i, e := range ents {
		out.Entries[i] = fileInfo(e)
	}
	return out, nil
}

// FSMkdir makes a guest directory.
func (b *Backend) FSMkdir(ctx context.Context, id string, req subjects.FSMkdirRequest) (subjects.FSReply, error) {
	if err := checkPath("path", req.Path); err != nil {
		return subjects.FSReply{}, err
	}
	if req.Mode > 0o777 {
		return subjects.FSReply{}, invalid("mode %o: want permission bits (at most 0777)", req.Mode)
	}
	c, err := b.fsAgent(id, req.User)
	if err != nil {
		return subjects.FSReply{}, err
	}
	if err := c.Mkdir(ctx, req.Path, fs.FileMode(req.Mode), req.Parents); err != nil {
		return subjects.FSReply{}, fileError(err)
	}
	return subjects.FSReply{OK: true}, nil
}

// FSRemove removes a guest file or directory.
func (b *Backend) FSRemove(ctx context.Context, id string, req subjects.FSRemoveRequest) (subjects.FSReply, error) {
	if err := checkPath("path", req.Path); err != nil {
		return subjects.FSReply{}, err
	}
	c, err := b.fsAgent(id, req.User)
	if err != nil {
		return subjects.FSReply{}, err
	}
	if err := c.Remove(ctx, req.Path, req.Recursive); err != nil {
		return subjects.FSReply{}, fileError(err)
	}
	return subjects.FSReply{OK: true}, nil
}

// FSRename renames a guest file or directory.
func (b *Backend) FSRename(ctx context.Context, id string, req subjects.FSRenameRequest) (subjects.FSReply, error) {
	if err := checkPath("path", req.Path); err != nil {
		return subjects.FSReply{}, err
	}
	if err := checkPath("to", req.To); err != nil {
		return subjects.FSReply{}, err
	}
	c, err := b.fsAgent(id, req.User)
	if err != nil {
		return subjects.FSReply{}, err
	}
	if err := c.Rename(ctx, req.Path, req.To); err != nil {
		return subjects.FSReply{}, fileError(err)
	}
	return subjects.FSReply{OK: true}, nil
}

// FSReadTo streams the guest file at path into w (the guest waits while w
// does) and returns how many bytes it wrote.
func (b *Backend) FSReadTo(ctx context.Context, id string, req subjects.FSReadRequest, w io.Writer) (int64, error) {
	if err := checkPath("path", req.Path); err != nil {
		return 0, err
	}
	c, err := b.fsAgent(id, req.User)
	if err != nil {
		return 0, err
	}
	n, err := c.ReadFileTo(ctx, req.Path, w)
	return n, fileError(err)
}

// FSWriteFrom streams r into the guest file req.Path, atomically (req.Data
// is ignored: r is the content). With req.SHA256, or the digest sumAtEOF
// returns once r is done (when not nil and not ""), the guest renames the
// new file into place only if the content has that digest.
func (b *Backend) FSWriteFrom(ctx context.Context, id string, req subjects.FSWriteRequest, r io.Reader, sumAtEOF func() string) (subjects.FSWriteReply, error) {
	if err := checkPath("path", req.Path); err != nil {
		return subjects.FSWriteReply{}, err
	}
	if req.Mode > 0o7777 {
		return subjects.FSWriteReply{}, invalid("mode %o: want at most 07777", req.Mode)
	}
	c, err := b.fsAgent(id, req.User)
	if err != nil {
		return subjects.FSWriteReply{}, err
	}
	opts := agent.WriteOptions{Mode: fs.FileMode(req.Mode), Parents: req.Parents, SHA256: req.SHA256}
	if sumAtEOF != nil {
		opts.SHA256AtEOF = func() string {
			if sum := sumAtEOF(); sum != "" {
				return sum
			}
			return req.SHA256
		}
	}
	res, err := c.WriteFileFrom(ctx, req.Path, r, opts)
	if err != nil {
		return subjects.FSWriteReply{}, fileError(err)
	}
	fi, err := c.Stat(ctx, req.Path)
	if err != nil {
		return subjects.FSWriteReply{}, fileError(err)
	}
	return subjects.FSWriteReply{File: fileInfo(fi), Size: res.Size, SHA256: res.SHA256}, nil
}

// The wire and the agent bound a recursive watch alike (a compile error
// when they differ).
const _ = uint(agent.MaxWatchDirs-subjects.MaxWatchDirs) + uint(subjects.MaxWatchDirs-agent.MaxWatchDirs)

// FSWatch reports the changes in a guest directory (and, with
// req.Recursive, below it) to emit until ctx ends (nil), the directory
// goes, or the sandbox ends. ready is called once the guest watches.
func (b *Backend) FSWatch(ctx context.Context, id string, req subjects.FSWatchRequest, ready func(), emit func([]subjects.WatchEvent)) error {
	path := req.Path
	if err := checkPath("path", path); err != nil {
		return err
	}
	c, err := b.fsAgent(id, "")
	if err != nil {
		return err
	}
	readyCh := make(chan struct{})
	go func() {
		select {
		case <-readyCh:
			ready()
		case <-ctx.Done():
		}
	}()
	err = c.WatchWith(ctx, path, agent.WatchOptions{Recursive: req.Recursive}, readyCh, func(evs []agent.WatchEvent) {
		out := make([]subjects.WatchEvent, len(evs))
		for i, e := range evs {
			out[i] = subjects.WatchEvent{Op: e.Op, Name: e.Name, To: e.To, Dir: e.Dir, Count: e.Count}
		}
		emit(out)
	})
	return fileError(err)
}
