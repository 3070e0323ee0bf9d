package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"syscall"
)

// handleFS serves the file operations of fs.go; it returns false for an
// operation that is not one of them.
func (s *Server) handleFS(ctx context.Context, st io.ReadWriteCloser, req request) bool {
	switch req.Op {
	case opStat, opList, opMkdir, opRemove, opRename, opFSWrite, opFSRead, opWatch:
	default:
		return false
	}
	if req.User == "" || req.Op == opWatch {
		s.fsOp(ctx, st, req)
		return true
	}
	u, err := lookupUser(s.Root, req.User)
	if err == nil {
		err = asUser(u, func() error { s.fsOp(ctx, st, req); return nil })
	}
	if err != nil {
		if req.Op == opFSWrite {
			drainFrames(st)
		}
		sendError(st, err)
	}
	return true
}

// drainFrames reads a stream's frames up to an F frame or its end, so
// that a writer refused up front does not block on a full window.
func drainFrames(st io.Reader) {
	for {
		typ, _, err := readFrame(st)
		if err != nil || typ == frameEOF {
			return
		}
	}
}

// fsOp runs one file operation.
func (s *Server) fsOp(ctx context.Context, st io.ReadWriteCloser, req request) {
	switch req.Op {
	case opFSRead:
		s.fsRead(st, req.Path)
	case opStat:
		s.fsStat(st, req.Path)
	case opList:
		s.fsList(st, req.Path, req.Depth)
	case opMkdir:
		s.fsSimple(st, "mkdir", req.Path, func(root *os.Root, rel string) error {
			mode := fs.FileMode(req.Mode).Perm()
			if mode == 0 {
				mode = 0o755
			}
			if req.Parents {
				return root.MkdirAll(rel, mode)
			}
			return root.Mkdir(rel, mode)
		})
	case opRemove:
		s.fsSimple(st, "remove", req.Path, func(root *os.Root, rel string) error {
			if rel == "." {
				return syscall.EBUSY // never the whole root
			}
			if req.Recursive {
				return root.RemoveAll(rel)
			}
			return root.Remove(rel)
		})
	case opRename:
		s.fsSimple(st, "rename", req.Path, func(root *os.Root, rel string) error {
			to, err := relPath(req.To)
			if err != nil {
				return err
			}
			if rel == "." || to == "." {
				return syscall.EBUSY
			}
			return root.Rename(rel, to)
		})
	case opFSWrite:
		s.fsWrite(st, req)
	case opWatch:
		s.watch(ctx, st, req.Path, req.Recursive)
	}
}

// fsError turns a file system error into the RemoteError the host sees:
// the guest's reason, with a code naming it.
func fsError(op, p string, err error) error {
	var re *RemoteError
	if errors.As(err, &re) {
		return re
	}
	msg := fmt.Sprintf("%s %s: %v", op, p, unwrapPathError(err))
	code := codeInvalid
	switch {
	case errors.Is(err, fs.ErrNotExist):
		code = CodeNotFound
	case errors.Is(err, fs.ErrPermission), errors.Is(err, syscall.EROFS):
		code = CodePermissionDenied
	case errors.Is(err, syscall.EISDIR):
		code = CodeIsDirectory
	case errors.Is(err, syscall.ENOTDIR):
		code = CodeNotDirectory
	case errors.Is(err, fs.ErrExist), errors.Is(err, syscall.ENOTEMPTY):
		code = CodeExists
	}
	return &RemoteError{Code: code, Message: msg}
}

// unwrapPathError drops a PathError's own op and path (relative to the
// root) so the message names the guest path once.
func unwrapPathError(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	var le *os.LinkError
	if errors.As(err, &le) {
		return le.Err
	}
	return err
}

// fsRoot validates p and opens the root it is confined to.
func (s *Server) fsRoot(p string) (*os.Root, string, error) {
	rel, err := relPath(p)
	if err != nil {
		return nil, "", &RemoteError{Code: codeInvalid, Message: err.Error()}
	}
	root, err := s.rootFS()
	if err != nil {
		return nil, "", err
	}
	return root, rel, nil
}

// fsSimple runs one operation without data and answers O or E.
func (s *Server) fsSimple(st io.Writer, op, p string, do func(root *os.Root, rel string) error) {
	root, rel, err := s.fsRoot(p)
	if err == nil {
		err = do(root, rel)
		root.Close()
	}
	if err != nil {
		sendError(st, fsError(op, p, err))
		return
	}
	_ = writeFrame(st, frameOK, nil)
}

// fileInfo describes fi, found at guest path p.
func fileInfo(root *os.Root, rel, p string, fi fs.FileInfo) FileInfo {
	out := FileInfo{Path: path.Clean("/" + p), Size: fi.Size(), MTime: fi.ModTime().UTC()}
	m := fi.Mode()
	out.Mode = uint32(m.Perm())
	if m&fs.ModeSetuid != 0 {
		out.Mode |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		out.Mode |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		out.Mode |= 0o1000
	}
	switch {
	case m.IsRegular():
		out.Type = TypeFile
	case m.IsDir():
		out.Type = TypeDir
	case m&fs.ModeSymlink != 0:
		out.Type = TypeSymlink
		if l, err := root.Readlink(rel); err == nil && len(l) <= maxPathLen {
			out.Link = l
		}
	default:
		out.Type = TypeOther
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		out.UID, out.GID = st.Uid, st.Gid
	}
	return out
}

func (s *Server) fsStat(st io.Writer, p string) {
	root, rel, err := s.fsRoot(p)
	if err != nil {
		sendError(st, fsError("stat", p, err))
		return
	}
	defer root.Close()
	fi, err := root.Lstat(rel)
	if err != nil {
		sendError(st, fsError("stat", p, err))
		return
	}
	_ = writeJSONFrame(st, frameOK, fileInfo(root, rel, p, fi))
}

// listBatch is how many entries go in one list data frame (well under
// MaxFramePayload: an entry encodes to at most ~8.5 KiB with 4 KiB paths).
const listBatch = 100

func (s *Server) fsList(st io.Writer, p string, depth int) {
	if depth < 1 || depth > MaxListDepth {
		sendError(st, &RemoteError{Code: codeInvalid, Message: fmt.Sprintf("list %s: depth %d: want 1..%d", p, depth, MaxListDepth)})
		return
	}
	root, rel, err := s.fsRoot(p)
	if err != nil {
		sendError(st, fsError("list", p, err))
		return
	}
	defer root.Close()
	fi, err := root.Stat(rel)
	if err == nil && !fi.IsDir() {
		err = syscall.ENOTDIR
	}
	if err != nil {
		sendError(st, fsError("list", p, err))
		return
	}
	var batch []FileInfo
	sent := 0
	truncated := false
	flush := func() error {
		if len(batch) == 0 {
			return nil
		}
		err := writeJSONFrame(st, frameData, batch)
		sent += len(batch)
		batch = batch[:0]
		return err
	}
	var walk func(rel, p string, level int) error
	walk = func(rel, p string, level int) error {
		d, err := root.Open(rel)
		if err != nil {
			if level == 1 {
				return err
			}
			return nil // a subdirectory we cannot read is skipped
		}
		defer d.Close()
		for {
			ents, rerr := d.ReadDir(256)
			for _, e := range ents {
				if sent+len(batch) >= MaxListEntries {
					truncated = true
					return nil
				}
				crel, cp := path.Join(rel, e.Name()), path.Join(p, e.Name())
				info, err := e.Info()
				if err != nil {
					continue // gone meanwhile
				}
				if len(cp) > maxPathLen {
					continue
				}
				batch = append(batch, fileInfo(root, crel, cp, info))
				if len(batch) == listBatch {
					if err := flush(); err != nil {
						return err
					}
				}
				if info.IsDir() && level < depth {
					if err := walk(crel, cp, level+1); err != nil {
						return err
					}
					if truncated {
						return nil
					}
				}
			}
			if errors.Is(rerr, io.EOF) || len(ents) == 0 {
				return nil
			}
			if rerr != nil {
				return rerr
			}
		}
	}
	err = walk(rel, path.Clean("/"+p), 1)
	if err == nil {
		err = flush()
	}
	if err != nil {
		sendError(st, fsError("list", p, err))
		return
	}
	_ = writeJSONFrame(st, frameOK, ListResult{Truncated: truncated})
}

// fsWrite writes a file atomically: data frames go to a temporary file next
// to the target, which is renamed over it after the F frame (whose payload,
// when not empty, is the SHA-256 the content must have). The stream ending
// without F drops the temporary file.
func (s *Server) fsWrite(st io.ReadWriter, req request) {
	p := req.Path
	var (
		f       *os.File
		root    *os.Root
		rel     string
		tmp     string
		mode    = fs.FileMode(req.Mode).Perm()
		uid     = -1
		gid     = -1
		written int64
	)
	h := sha256.New()
	err := func() error {
		var err error
		root, rel, err = s.fsRoot(p)
		if err != nil {
			return err
		}
		if rel == "." {
			return syscall.EISDIR
		}
		if fi, err := root.Lstat(rel); err == nil {
			if fi.IsDir() {
				return syscall.EISDIR
			}
			if mode == 0 {
				mode = fi.Mode().Perm()
			}
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				uid, gid = int(st.Uid), int(st.Gid)
			}
		}
		if mode == 0 {
			mode = 0o644
		}
		if dir := path.Dir(rel); dir != "." && req.Parents {
			if err := root.MkdirAll(dir, 0o755); err != nil {
				return err
			}
		}
		tmp = writeTempName(rel)
		f, err = root.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		return err
	}()
	cleanup := func() {
		if f != nil {
			_ = f.Close()
			f = nil
			_ = root.Remove(tmp)
		}
		if root != nil {
			root.Close()
		}
	}
	// Read every frame the host sends, even after a failure, so that it
	// never blocks on a full window.
	var want string
	for {
		typ, payload, rerr := readFrame(st)
		if rerr != nil {
			cleanup() // no F frame: the host gave up
			return
		}
		if typ == frameEOF {
			want = string(payload)
			break
		}
		if typ != frameData {
			if err == nil {
				err = &RemoteError{Code: codeInvalid, Message: fmt.Sprintf("write %s: unexpected frame %q", p, typ)}
			}
			continue
		}
		if err == nil {
			if _, werr := f.Write(payload); werr != nil {
				err = werr
			}
			h.Write(payload)
			written += int64(len(payload))
		}
	}
	sum := hex.EncodeToString(h.Sum(nil))
	if err == nil && want != "" && want != sum {
		err = &RemoteError{Code: codeInvalid, Message: fmt.Sprintf("write %s: sha256 of the %d bytes received is %s, not %s: file left as it was", p, written, sum, want)}
	}
	if err == nil {
		err = f.Chmod(mode)
	}
	if err == nil && req.User == "" && (uid > 0 || gid > 0) {
		err = f.Chown(uid, gid)
	}
	if err == nil {
		err = f.Sync()
	}
	if err == nil {
		err = f.Close()
		f = nil
		if err == nil {
			if err = root.Rename(tmp, rel); err != nil {
				_ = root.Remove(tmp)
			}
		}
	}
	cleanup()
	if err != nil {
		sendError(st, fsError("write", p, err))
		return
	}
	_ = writeJSONFrame(st, frameOK, WriteResult{Size: written, SHA256: sum})
}

// fsRead is read_file with the error codes of file operations.
func (s *Server) fsRead(st io.Writer, p string) {
	err := func() error {
		root, rel, err := s.fsRoot(p)
		if err != nil {
			return err
		}
		defer root.Close()
		f, err := root.Open(rel)
		if err != nil {
			return err
		}
		defer f.Close()
		if fi, err := f.Stat(); err == nil && fi.IsDir() {
			return syscall.EISDIR
		}
		buf := make([]byte, frameHeaderSize+fileChunk)
		for {
			frame, n, err := readFrameFrom(f, frameData, buf)
			if n > 0 {
				if _, werr := st.Write(frame); werr != nil {
					return werr
				}
			}
			if errors.Is(err, io.EOF) {
				return nil
			}
			if err != nil {
				return err
			}
		}
	}()
	if err != nil {
		sendError(st, fsError("read", p, err))
		return
	}
	_ = writeFrame(st, frameOK, nil)
}
