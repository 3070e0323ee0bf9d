package envd

import (
	"encoding/base64"
	"errors"
	"net/http"
	"path"
	"strings"

	"connectrpc.com/connect"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// maxPathLen bounds a guest path.
const maxPathLen = 4096

// validateUser accepts a user name as the guest takes it: [a-z_][a-z0-9_-]
// up to 32 characters, or a uid.
func validateUser(u string) error {
	if u == "" || len(u) > 32 {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, errors.New("invalid user name"))
	}
	for i := 0; i < len(u); i++ {
		c := u[i]
		ok := c >= 'a' && c <= 'z' || c == '_' || (i > 0 || isDigits(u)) && (c >= '0' && c <= '9' || c == '-')
		if !ok {
			return errdefs.Wrap(errdefs.ErrInvalidArgument, errors.New("invalid user name"))
		}
	}
	return nil
}

func isDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return s != ""
}

// userOf is the user a request runs as: the SDK's Authorization: Basic
// base64(user:), else the default.
func (s *Server) userOf(h http.Header) (string, error) {
	a := h.Get("Authorization")
	if a == "" {
		return s.cfg.DefaultUser, nil
	}
	b64, ok := strings.CutPrefix(a, "Basic ")
	if !ok {
		return "", errdefs.Wrap(errdefs.ErrInvalidArgument, errors.New("authorization: want Basic"))
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(b64))
	if err != nil {
		return "", errdefs.Wrap(errdefs.ErrInvalidArgument, errors.New("authorization: bad base64"))
	}
	user, _, _ := strings.Cut(string(raw), ":")
	if user == "" {
		return s.cfg.DefaultUser, nil
	}
	return user, validateUser(user)
}

// homeOf is a user's home directory in the guest.
func homeOf(user string) string {
	if user == "root" || user == "0" {
		return "/root"
	}
	return "/home/" + user
}

// guestPath resolves p (absolute, or relative to the user's home; ~ is the
// home) to a clean absolute guest path.
func guestPath(p, user string) (string, error) {
	if p == "" || len(p) > maxPathLen || strings.ContainsRune(p, 0) {
		return "", errdefs.Wrap(errdefs.ErrInvalidArgument, errors.New("invalid path: want 1..4096 bytes without NUL"))
	}
	if p == "~" || strings.HasPrefix(p, "~/") {
		p = homeOf(user) + p[1:]
	} else if !strings.HasPrefix(p, "/") {
		p = homeOf(user) + "/" + p
	}
	return path.Clean(p), nil
}

// connectUser is userOf for a Connect request.
func (s *Server) connectUser(h http.Header) (string, error) {
	u, err := s.userOf(h)
	if err != nil {
		return "", connect.NewError(connect.CodeInvalidArgument, err)
	}
	return u, nil
}
