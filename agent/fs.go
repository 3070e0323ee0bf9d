package agent

// File operations beyond read_file and write_file: stat, list, mkdir,
// remove, rename, an atomic streaming write with a digest, a streaming read
// without a size cap, and watch. The wire (see the package doc's table):
//
//	stat        R{op, path}                               → O{FileInfo} | E
//	list        R{op, path, depth}                        → D{[]FileInfo}* O{ListResult} | E
//	mkdir       R{op, path, mode, parents}                → O | E
//	remove      R{op, path, recursive}                    → O | E
//	rename      R{op, path, to}                           → O | E
//	fs_write    R{op, path, mode, parents} D* F{sha256?}  → O{WriteResult} | E
//	watch       R{op, path, recursive}                    → O D{[]WatchEvent}* (until the host closes) | E
//
// fs_write writes to a temporary file next to the target and renames it
// over the target once everything arrived (and, when the F frame names a
// SHA-256, only if the content matches it): readers see the old file or
// the new one, never half of it. Errors of file operations carry the
// guest's reason with a code: not_found, permission_denied, is_directory,
// not_directory, exists, invalid_argument.

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"strings"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// Operations of file handling (fs.go, fs_server.go).
const (
	opStat    = "stat"
	opList    = "list"
	opMkdir   = "mkdir"
	opRemove  = "remove"
	opRename  = "rename"
	opFSWrite = "fs_write"
	opWatch   = "watch"
	opFSRead  = "fs_read" // read_file, as a user
)

// Error codes of file operations (RemoteError.Code), beyond not_found and
// invalid_argument.
const (
	CodePermissionDenied = "permission_denied"
	CodeIsDirectory      = "is_directory"
	CodeNotDirectory     = "not_directory"
	CodeExists           = "exists"
	// CodeNotFound is a missing guest path (the same code as the agent's
	// other not-found errors).
	CodeNotFound = codeNotFound
)

// fsCodeClass is the errdefs class of a file operation's error code, nil
// for codes that are not file codes.
func fsCodeClass(code string) error {
	switch code {
	case CodePermissionDenied, CodeIsDirectory, CodeNotDirectory:
		return errdefs.ErrInvalidArgument
	case CodeExists:
		return errdefs.ErrConflict
	}
	return nil
}

// Bounds of file operations. The host enforces them on what the guest
// sends; the guest stops at them too.
const (
	// MaxListEntries is the most entries one list returns (the result
	// says Truncated when there were more).
	MaxListEntries = 10000
	// MaxListDepth is the deepest a list recurses.
	MaxListDepth = 32
	// MaxWatchBatch is the most events in one watch frame.
	MaxWatchBatch = 256
	// MaxWatchDirs is the most directories one recursive watch watches
	// (the watched one included); a directory beyond it is reported by a
	// WatchLimit event and not watched.
	MaxWatchDirs = 1024
	// maxPathLen bounds a guest path or link target.
	maxPathLen = 4096
	// maxListBytes bounds the entry frames of one list the host keeps
	// (MaxListEntries entries of the longest paths would be 80 MiB); the
	// entries beyond it are dropped and the list says Truncated.
	maxListBytes = 8 << 20
)

// File types of FileInfo.Type.
const (
	TypeFile    = "file"
	TypeDir     = "dir"
	TypeSymlink = "symlink"
	TypeOther   = "other"
)

// FileInfo describes one guest file (never following a final symlink).
type FileInfo struct {
	// Path is the guest path, absolute and clean.
	Path string `json:"path"`
	Type string `json:"type"`
	Size int64  `json:"size"`
	// Mode holds the permission bits plus setuid, setgid and sticky, as
	// in chmod (0o4755).
	Mode  uint32    `json:"mode"`
	UID   uint32    `json:"uid"`
	GID   uint32    `json:"gid"`
	MTime time.Time `json:"mtime"`
	// Link is a symlink's target.
	Link string `json:"link,omitempty"`
}

// ListResult ends a list.
type ListResult struct {
	// Truncated says there were more than MaxListEntries entries.
	Truncated bool `json:"truncated,omitempty"`
}

// WriteOptions are those of WriteFileFrom.
type WriteOptions struct {
	// Mode of the new file (0: the old file's, or 0644).
	Mode fs.FileMode
	// Parents creates missing parent directories (0755).
	Parents bool
	// SHA256, when set (lowercase hex), must be the content's digest, or
	// the file is left as it was and the write fails.
	SHA256 string
	// SHA256AtEOF, when set, is asked for the digest once the source
	// reached its end (for a digest known only then); it overrides SHA256.
	SHA256AtEOF func() string
}

// WriteResult is what a write stored.
type WriteResult struct {
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// Watch event operations.
const (
	WatchCreate   = "create"
	WatchWrite    = "write"
	WatchRemove   = "remove"
	WatchRename   = "rename"
	WatchOverflow = "overflow" // the guest's queue overflowed: events were lost
	WatchGone     = "gone"     // the watched directory was removed or moved
	// WatchLimit names a directory a recursive watch does not watch: it
	// watches MaxWatchDirs already.
	WatchLimit = "limit"
)

// WatchEvent is one change in a watched directory.
type WatchEvent struct {
	Op string `json:"op"`
	// Name is the entry's name in the directory (rename: the old name); in
	// a recursive watch, its path relative to the watched directory
	// ("sub/dir/file").
	Name string `json:"name,omitempty"`
	// To is a rename's new name.
	To string `json:"to,omitempty"`
	// Dir says the entry is a directory.
	Dir bool `json:"dir,omitempty"`
	// Count is how many events of the same op and name were merged into
	// this one.
	Count int `json:"count,omitempty"`
}

// Files are the file operations of a session, done as one guest user.
type Files struct {
	c    *Client
	user string
}

// Files returns the file operations done as user in the guest (name,
// uid or uid:gid, as for exec; "" is root): the guest checks permissions
// as that user would meet them. Watches always run as root.
func (c *Client) Files(user string) Files { return Files{c: c, user: user} }

// Stat describes the guest file at path (a final symlink is not followed).
func (f Files) Stat(ctx context.Context, path string) (FileInfo, error) {
	reply, err := f.c.call(ctx, request{Op: opStat, Path: path, User: f.user}, nil)
	if err != nil {
		return FileInfo{}, err
	}
	var fi FileInfo
	if err := json.Unmarshal(reply, &fi); err != nil {
		return FileInfo{}, protocolError("stat: bad reply: %w", err)
	}
	if err := fi.check(); err != nil {
		return FileInfo{}, err
	}
	return fi, nil
}

// check bounds what the guest said about a file.
func (fi *FileInfo) check() error {
	if len(fi.Path) > maxPathLen || len(fi.Link) > maxPathLen {
		return protocolError("file info: path or link over %d bytes", maxPathLen)
	}
	switch fi.Type {
	case TypeFile, TypeDir, TypeSymlink, TypeOther:
	default:
		return protocolError("file info: bad type %q", fi.Type)
	}
	if fi.Size < 0 || fi.Mode > 0o7777 {
		return protocolError("file info: bad size %d or mode %o", fi.Size, fi.Mode)
	}
	return nil
}

// List lists the directory at path: its entries, and with depth > 1 theirs,
// down to depth levels (at most MaxListDepth). At most MaxListEntries
// entries come back; truncated says there were more.
func (f Files) List(ctx context.Context, path string, depth int) (entries []FileInfo, truncated bool, err error) {
	if depth < 1 || depth > MaxListDepth {
		return nil, false, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("list: depth %d: want 1..%d", depth, MaxListDepth))
	}
	kept, cut := 0, false
	reply, err := f.c.call(ctx, request{Op: opList, Path: path, Depth: depth, User: f.user}, func(b []byte) error {
		if cut || kept+len(b) > maxListBytes {
			cut = true
			return nil // read on, keep nothing more
		}
		kept += len(b)
		var batch []FileInfo
		if err := json.Unmarshal(b, &batch); err != nil {
			return protocolError("list: bad entries: %w", err)
		}
		if len(batch) > MaxListEntries-len(entries) {
			return protocolError("list: more than %d entries", MaxListEntries)
		}
		for i := range batch {
			if err := batch[i].check(); err != nil {
				return err
			}
		}
		entries = append(entries, batch...)
		return nil
	})
	if err != nil {
		return nil, false, err
	}
	var res ListResult
	if len(reply) > 0 {
		if err := json.Unmarshal(reply, &res); err != nil {
			return nil, false, protocolError("list: bad reply: %w", err)
		}
	}
	return entries, res.Truncated || cut, nil
}

// Mkdir makes the directory at path (mode 0: 0755); with parents, missing
// parents too and an existing directory is no error (mkdir -p).
func (f Files) Mkdir(ctx context.Context, path string, mode fs.FileMode, parents bool) error {
	_, err := f.c.call(ctx, request{Op: opMkdir, Path: path, Mode: uint32(mode.Perm()), Parents: parents, User: f.user}, nil)
	return err
}

// Remove removes the file or empty directory at path; with recursive, a
// directory and everything in it (rm -r). A missing path is not_found
// unless recursive.
func (f Files) Remove(ctx context.Context, path string, recursive bool) error {
	_, err := f.c.call(ctx, request{Op: opRemove, Path: path, Recursive: recursive, User: f.user}, nil)
	return err
}

// Rename renames from to to (replacing a file at to, as rename(2) does).
func (f Files) Rename(ctx context.Context, from, to string) error {
	_, err := f.c.call(ctx, request{Op: opRename, Path: from, To: to, User: f.user}, nil)
	return err
}

// ReadFileTo streams the file at path into w, chunk by chunk (the guest
// waits while w does: the stream's window is the flow control), and
// returns how many bytes it wrote. An error of w ends the read.
func (f Files) ReadFileTo(ctx context.Context, path string, w io.Writer) (int64, error) {
	var n int64
	_, err := f.c.call(ctx, request{Op: opFSRead, Path: path, User: f.user}, func(b []byte) error {
		m, err := w.Write(b)
		n += int64(m)
		return err
	})
	return n, err
}

// WriteFileFrom streams r into the file at path, atomically: the guest
// writes a temporary file next to it and renames it into place once r is
// done (and the digest matches, when opts.SHA256 is set). An error of r, or
// ctx ending, leaves the old file as it was.
func (f Files) WriteFileFrom(ctx context.Context, path string, r io.Reader, opts WriteOptions) (WriteResult, error) {
	if opts.SHA256 != "" {
		if b, err := hex.DecodeString(opts.SHA256); err != nil || len(b) != sha256.Size {
			return WriteResult{}, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("write %s: sha256 %q is not 64 hex digits", path, opts.SHA256))
		}
	}
	st, stop, err := f.c.open(ctx, request{Op: opFSWrite, Path: path, Mode: uint32(opts.Mode.Perm()), Parents: opts.Parents, User: f.user})
	if err != nil {
		return WriteResult{}, err
	}
	defer stop()
	defer st.Close()
	// The guest answers early on an error (it keeps reading, so sends do
	// not block): read its reply alongside.
	type answer struct {
		payload []byte
		err     error
	}
	replied := make(chan answer, 1)
	go func() {
		p, err := readReply(st, nil)
		replied <- answer{p, err}
	}()
	buf := make([]byte, frameHeaderSize+fileChunk)
	for {
		frame, n, rerr := readFrameFrom(r, frameData, buf)
		if n > 0 {
			if _, err := st.Write(frame); err != nil {
				return WriteResult{}, f.c.sessionError("agent: fs_write", ctx, err)
			}
		}
		if errors.Is(rerr, io.EOF) {
			break
		}
		if rerr != nil {
			// Closing without an F frame makes the guest drop the
			// temporary file.
			_ = st.Close()
			return WriteResult{}, fmt.Errorf("agent: write %s: read source: %w", path, rerr)
		}
	}
	want := opts.SHA256
	if opts.SHA256AtEOF != nil {
		want = opts.SHA256AtEOF()
	}
	if err := writeFrame(st, frameEOF, []byte(want)); err != nil {
		return WriteResult{}, f.c.sessionError("agent: fs_write", ctx, err)
	}
	a := <-replied
	if a.err != nil {
		return WriteResult{}, f.c.sessionError("agent: fs_write", ctx, a.err)
	}
	var res WriteResult
	if err := json.Unmarshal(a.payload, &res); err != nil {
		return WriteResult{}, protocolError("fs_write: bad reply: %w", err)
	}
	return res, nil
}

// Watch reports changes in the directory at path (not its subdirectories:
// see WatchWith)
// to fn, in batches of at most MaxWatchBatch events, until ctx ends (nil
// then), the directory goes (after a WatchGone event; nil), or the session
// fails. It returns once the watch is set up in the guest when ready is
// not nil, by closing ready; fn runs on one goroutine, and while it runs
// the guest queues (and, when its queue overflows, drops with a
// WatchOverflow event).
func (f Files) Watch(ctx context.Context, path string, ready chan<- struct{}, fn func([]WatchEvent)) error {
	return f.WatchWith(ctx, path, WatchOptions{}, ready, fn)
}

// WatchOptions are the options of a watch.
type WatchOptions struct {
	// Recursive watches the directories below the watched one too, at
	// most MaxWatchDirs in all, new ones as they appear (their entries
	// that appeared before are reported as created); events name paths
	// relative to the watched directory.
	Recursive bool
}

// WatchWith is Watch with options.
func (f Files) WatchWith(ctx context.Context, path string, o WatchOptions, ready chan<- struct{}, fn func([]WatchEvent)) error {
	st, stop, err := f.c.open(ctx, request{Op: opWatch, Path: path, User: f.user, Recursive: o.Recursive})
	if err != nil {
		return err
	}
	defer stop()
	defer st.Close()
	if _, err := readReply(st, nil); err != nil {
		return f.c.sessionError("agent: watch", ctx, err)
	}
	if ready != nil {
		close(ready)
	}
	for {
		typ, payload, err := readFrameLimit(st, frameLimit)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, io.EOF) {
				return nil // the guest ended the watch (directory gone)
			}
			return f.c.sessionError("agent: watch", ctx, err)
		}
		switch typ {
		case frameData:
		case frameError:
			return decodeRemoteError(payload)
		default:
			return protocolError("watch: unexpected frame %q", typ)
		}
		var batch []WatchEvent
		if err := json.Unmarshal(payload, &batch); err != nil {
			return protocolError("watch: bad events: %w", err)
		}
		if len(batch) > MaxWatchBatch {
			return protocolError("watch: %d events in one frame (at most %d)", len(batch), MaxWatchBatch)
		}
		for _, ev := range batch {
			if len(ev.Name) > maxPathLen || len(ev.To) > maxPathLen || len(ev.Op) > 16 {
				return protocolError("watch: event over its bounds")
			}
		}
		if len(batch) > 0 {
			fn(batch)
		}
	}
}

// writeTempSuffix marks the temporary file an atomic write fills before it
// renames it into place: .<name>.firkin-<12 hex digits>.
const writeTempSuffix = ".firkin-"

// writeTempName is the name of a new temporary file for writing p.
func writeTempName(p string) string {
	var rnd [6]byte
	_, _ = rand.Read(rnd[:])
	return path.Join(path.Dir(p), "."+path.Base(p)+writeTempSuffix+hex.EncodeToString(rnd[:]))
}

// IsWriteTemp reports whether name (a path or a base name) is such a
// temporary file, as watchers that hide them need to know.
func IsWriteTemp(name string) bool {
	base := path.Base(name)
	i := strings.LastIndex(base, writeTempSuffix)
	if !strings.HasPrefix(base, ".") || i < 1 || len(base)-i-len(writeTempSuffix) != 12 {
		return false
	}
	for _, c := range base[i+len(writeTempSuffix):] {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}
