package envd

import (
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// maxUploadFiles bounds the files of one multipart upload.
const maxUploadFiles = 1000

// fileEntry is one written file in the /files upload reply.
type fileEntry struct {
	Name string `json:"name"`
	Type string `json:"type"`
	Path string `json:"path"`
}

// filesUser is the user of a /files request: the username query parameter,
// else the Authorization header's, else the default. A signed request's
// user is the one its signature covers: the username parameter, else the
// default (the holder of a signed URL may not pick root in Authorization).
func (s *Server) filesUser(r *http.Request) (string, error) {
	if u := r.URL.Query().Get("username"); u != "" {
		return u, validateUser(u)
	}
	if signedRequest(r) {
		return s.cfg.DefaultUser, nil
	}
	return s.userOf(r.Header)
}

// download answers GET /files?path=…: the file's bytes as they are.
func (s *Server) download(w http.ResponseWriter, r *http.Request) {
	user, err := s.filesUser(r)
	if err != nil {
		httpError(w, http.StatusBadRequest, err.Error())
		return
	}
	p, err := guestPath(r.URL.Query().Get("path"), user)
	if err != nil {
		httpError(w, http.StatusBadRequest, err.Error())
		return
	}
	ctx, id := r.Context(), sandboxOf(r.Context())
	c := s.cfg.Client.AsUser(user)
	fi, err := c.Stat(ctx, id, p)
	if err != nil {
		httpError(w, httpStatus(err), publicMessage(err))
		return
	}
	if fi.Type == subjects.FileTypeDir {
		httpError(w, http.StatusBadRequest, fmt.Sprintf("path %s is a directory", p))
		return
	}
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Content-Disposition", mime.FormatMediaType("attachment", map[string]string{"filename": path.Base(p)}))
	h.Set("Content-Length", strconv.FormatInt(fi.Size, 10))
	cw := &countingWriter{w: w}
	if _, err := c.ReadFile(ctx, id, p, cw); err != nil {
		if cw.n == 0 {
			h.Del("Content-Length")
			h.Del("Content-Disposition")
			httpError(w, httpStatus(err), publicMessage(err))
			return
		}
		// Headers are out: cut the body short so the client sees an error.
		s.log.Debug("download cut short", "sandbox", id, "path", p, "err", err)
		panic(http.ErrAbortHandler)
	}
}

// maxReader reads at most limit bytes of r and fails with
// *http.MaxBytesError after them: a gzip body that inflates past the bound
// is refused (413), not written cut short as if it were whole.
type maxReader struct {
	r           io.Reader
	left, limit int64
}

func (m *maxReader) Read(b []byte) (int, error) {
	if m.left <= 0 {
		// One byte more than allowed tells the end from too much.
		var one [1]byte
		n, err := m.r.Read(one[:])
		if n > 0 {
			return 0, &http.MaxBytesError{Limit: m.limit}
		}
		return 0, err
	}
	if int64(len(b)) > m.left {
		b = b[:m.left]
	}
	n, err := m.r.Read(b)
	m.left -= int64(n)
	return n, err
}

// countingWriter counts what went through it.
type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n += int64(n)
	return n, err
}

// upload answers POST /files: a multipart form whose "file" parts are
// written (to path, or to each part's filename), or an octet-stream body
// written to path. Parent directories are made. The reply lists the files.
func (s *Server) upload(w http.ResponseWriter, r *http.Request) {
	user, err := s.filesUser(r)
	if err != nil {
		httpError(w, http.StatusBadRequest, err.Error())
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, s.cfg.MaxUploadBytes)
	c := s.cfg.Client.AsUser(user)
	qpath := r.URL.Query().Get("path")
	ct, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	var written []fileEntry
	write := func(p string, body io.Reader) bool {
		gp, err := guestPath(p, user)
		if err != nil {
			httpError(w, http.StatusBadRequest, err.Error())
			return false
		}
		if _, err := c.WriteFile(r.Context(), sandboxOf(r.Context()), gp, body, client.WriteFileOptions{Parents: true}); err != nil {
			var mbe *http.MaxBytesError
			if errors.As(err, &mbe) {
				httpError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("upload over %d bytes", s.cfg.MaxUploadBytes))
				return false
			}
			httpError(w, httpStatus(err), publicMessage(err))
			return false
		}
		written = append(written, fileEntry{Name: path.Base(gp), Type: "file", Path: gp})
		return true
	}
	switch ct {
	case "application/octet-stream":
		var body io.Reader = r.Body
		if strings.EqualFold(r.Header.Get("Content-Encoding"), "gzip") {
			zr, err := gzip.NewReader(r.Body)
			if err != nil {
				httpError(w, http.StatusBadRequest, "bad gzip body")
				return
			}
			body = &maxReader{r: zr, left: s.cfg.MaxUploadBytes, limit: s.cfg.MaxUploadBytes}
		}
		if qpath == "" {
			httpError(w, http.StatusBadRequest, "path is required")
			return
		}
		if !write(qpath, body) {
			return
		}
	case "multipart/form-data":
		mr, err := r.MultipartReader()
		if err != nil {
			httpError(w, http.StatusBadRequest, "bad multipart body: "+err.Error())
			return
		}
		for n := 0; ; n++ {
			part, err := mr.NextRawPart()
			if err == io.EOF {
				break
			}
			if err != nil {
				httpError(w, http.StatusBadRequest, "bad multipart body: "+err.Error())
				return
			}
			if n >= maxUploadFiles {
				httpError(w, http.StatusBadRequest, fmt.Sprintf("more than %d files", maxUploadFiles))
				return
			}
			if part.FormName() != "file" {
				continue
			}
			// The SDK names the guest path in the part's filename; Go's
			// FileName keeps only its base, so read the header as it is.
			_, params, _ := mime.ParseMediaType(part.Header.Get("Content-Disposition"))
			p := qpath
			if p == "" {
				p = params["filename"]
			}
			if p == "" {
				httpError(w, http.StatusBadRequest, "a file part names no path")
				return
			}
			if !write(p, part) {
				return
			}
		}
		if len(written) == 0 {
			httpError(w, http.StatusBadRequest, "no file part")
			return
		}
	default:
		httpError(w, http.StatusBadRequest, "Content-Type: want multipart/form-data or application/octet-stream")
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(written)
}

// envs answers GET /envs: the environment a process of the default user
// starts with.
func (s *Server) envs(w http.ResponseWriter, r *http.Request) {
	ctx, id := r.Context(), sandboxOf(r.Context())
	rep, err := s.cfg.Client.Exec(ctx, id, subjects.ExecRequest{Command: "env", User: s.cfg.DefaultUser, TimeoutMS: 10000})
	if err != nil {
		httpError(w, httpStatus(err), publicMessage(err))
		return
	}
	out := map[string]string{}
	for _, line := range strings.Split(rep.Stdout, "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && k != "" && len(out) < 4096 {
			out[k] = v
		}
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(out)
}

// metrics answers GET /metrics in envd's shape from the sandbox's latest
// metrics sample.
func (s *Server) metrics(w http.ResponseWriter, r *http.Request) {
	ctx, id := r.Context(), sandboxOf(r.Context())
	rep, err := s.cfg.Client.Metrics(ctx, id)
	if err != nil {
		httpError(w, httpStatus(err), publicMessage(err))
		return
	}
	m := map[string]any{"ts": time.Now().Unix()}
	if l := rep.Latest; l != nil {
		m["ts"] = l.At.Unix()
		m["cpu_used_pct"] = max(l.GuestCPUPercent, 0)
		m["mem_total"], m["mem_used"] = l.GuestMemTotal, l.GuestMemUsed
		m["disk_total"], m["disk_used"] = l.GuestDiskTotal, l.GuestDiskUsed
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(m)
}
