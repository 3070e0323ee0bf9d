package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// dialTimeout bounds the guest's TCP connect for DialGuest.
const dialTimeout = 5 * time.Second

// fileChunk is the size of the data frames of ReadFile.
const fileChunk = 256<<10 - frameHeaderSize

// dial connects the stream to 127.0.0.1:port (or [::1]:port when only that
// listens) and copies bytes both ways after a status line.
func (s *Server) dial(ctx context.Context, st io.ReadWriteCloser, port int) {
	if port <= 0 || port > 65535 {
		_, _ = io.WriteString(st, "ERR invalid port "+strconv.Itoa(port)+"\n")
		return
	}
	d := net.Dialer{Timeout: dialTimeout}
	c, err := d.DialContext(ctx, "tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if errors.Is(err, syscall.ECONNREFUSED) {
		if c6, err6 := d.DialContext(ctx, "tcp", net.JoinHostPort("::1", strconv.Itoa(port))); err6 == nil {
			c, err = c6, nil
		}
	}
	if err != nil {
		msg := err.Error()
		if errors.Is(err, syscall.ECONNREFUSED) {
			msg = "connection refused"
		}
		_, _ = io.WriteString(st, "ERR port "+strconv.Itoa(port)+": "+msg+"\n")
		return
	}
	defer c.Close()
	if _, err := io.WriteString(st, "OK\n"); err != nil {
		return
	}
	stop := context.AfterFunc(ctx, func() { _ = c.Close() })
	defer stop()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		_, _ = io.Copy(c, st)
		// The host closed its side: pass the half-close on.
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
	}()
	if _, err := io.Copy(st, c); err != nil {
		_ = c.Close()
	}
	_ = st.Close() // half-close toward the host
	wg.Wait()
}

// rootFS opens the directory file operations are confined to.
func (s *Server) rootFS() (*os.Root, error) {
	dir := s.Root
	if dir == "" {
		dir = "/"
	}
	return os.OpenRoot(dir)
}

// relPath turns a guest path (absolute, or relative to "/") into a path
// relative to the root.
func relPath(p string) (string, error) {
	if p == "" || len(p) > 4096 {
		return "", errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("bad path %q", p))
	}
	rel := path.Clean("/" + p)[1:]
	if rel == "" {
		rel = "."
	}
	return rel, nil
}

// fileError classes a file system error for the wire.
func fileError(op, p string, err error) error {
	err = fmt.Errorf("%s %s: %w", op, p, err)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return errdefs.Wrap(errdefs.ErrNotFound, err)
	case errors.Is(err, fs.ErrPermission), errors.Is(err, syscall.EISDIR), errors.Is(err, syscall.ENOTDIR):
		return errdefs.Wrap(errdefs.ErrInvalidArgument, err)
	}
	var pe *fs.PathError
	if errors.As(err, &pe) {
		// os.Root reports escapes and the like as path errors.
		return errdefs.Wrap(errdefs.ErrInvalidArgument, err)
	}
	return err
}

func (s *Server) readFile(st io.Writer, p string) {
	err := func() error {
		rel, err := relPath(p)
		if err != nil {
			return err
		}
		root, err := s.rootFS()
		if err != nil {
			return fileError("read", p, err)
		}
		defer root.Close()
		f, err := root.Open(rel)
		if err != nil {
			return fileError("read", p, err)
		}
		defer f.Close()
		if fi, err := f.Stat(); err == nil && fi.IsDir() {
			return fileError("read", p, syscall.EISDIR)
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
				return fileError("read", p, err)
			}
		}
	}()
	if err != nil {
		sendError(st, err)
		return
	}
	_ = writeFrame(st, frameOK, nil)
}

func (s *Server) writeFile(st io.ReadWriter, p string, mode fs.FileMode) {
	if mode == 0 {
		mode = 0o644
	}
	var f *os.File
	err := func() error {
		rel, err := relPath(p)
		if err != nil {
			return err
		}
		root, err := s.rootFS()
		if err != nil {
			return fileError("write", p, err)
		}
		defer root.Close()
		if dir := path.Dir(rel); dir != "." {
			if err := root.MkdirAll(dir, 0o755); err != nil {
				return fileError("write", p, err)
			}
		}
		f, err = root.OpenFile(rel, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode.Perm())
		if err != nil {
			return fileError("write", p, err)
		}
		return nil
	}()
	// Read every frame the host sends, even after a failure, so that it
	// never blocks on a full window.
	for {
		typ, payload, rerr := readFrame(st)
		if rerr != nil {
			if f != nil {
				_ = f.Close()
			}
			return
		}
		if typ == frameEOF {
			break
		}
		if typ != frameData {
			if err == nil {
				err = errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("write %s: unexpected frame %q", p, typ))
			}
			continue
		}
		if err == nil {
			if _, werr := f.Write(payload); werr != nil {
				err = fileError("write", p, werr)
			}
		}
	}
	if f != nil {
		if cerr := f.Close(); err == nil && cerr != nil {
			err = fileError("write", p, cerr)
		}
	}
	if err != nil {
		sendError(st, err)
		return
	}
	_ = writeFrame(st, frameOK, nil)
}
