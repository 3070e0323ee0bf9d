package envd

import (
	"net/http"
	"net/url"
	"path"
	"strings"
	"testing"
	"time"
)

// FuzzRequestParsing drives what the sandbox API takes from a client
// before any call reaches the worker: the guest path, the user from
// Authorization, the /files signature and the access check. An accepted
// path is absolute, clean and without NUL; an accepted user is a plain
// name or number; a secure sandbox admits only its exact token or a
// signature made with it; nothing panics.
func FuzzRequestParsing(f *testing.F) {
	const tok = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	f.Add("/etc/hosts", "Basic cm9vdDo=", "GET", "path=/a&signature="+sign("/a", "read", "", tok, ""), tok)
	f.Add("~/x/../y", "", "POST", "path=a&username=user&signature_expiration=1&signature=v1_x", "wrong")
	f.Add("../../a\x00b", "Basic Ojo6", "PUT", "%zz&path=", "")
	f.Add(strings.Repeat("/a", 3000), "Bearer x", "GET", "path="+url.QueryEscape("/a b"), tok)
	now := time.Unix(1_800_000_000, 0)
	s := &Server{cfg: Config{DefaultUser: "user"}}
	f.Fuzz(func(t *testing.T, p, auth, method, query, header string) {
		h := http.Header{}
		h.Set("Authorization", auth)
		user, err := s.userOf(h)
		if err == nil && (user == "" || len(user) > 32 || strings.ContainsAny(user, " /:\x00") || strings.HasPrefix(user, "-")) {
			t.Fatalf("userOf(%q) accepted %q", auth, user)
		}
		if err != nil {
			user = "user"
		}
		if g, err := guestPath(p, user); err == nil {
			if !strings.HasPrefix(g, "/") || path.Clean(g) != g || strings.ContainsRune(g, 0) || len(g) > maxPathLen+64 {
				t.Fatalf("guestPath(%q, %q) = %q", p, user, g)
			}
		}
		if !validMethod(method) {
			method = http.MethodGet
		}
		r, err := http.NewRequest(method, "http://x/files?"+query, nil)
		if err != nil {
			return
		}
		r.Header.Set(AccessTokenHeader, header)
		if checkSignature(r, "", now) == nil {
			t.Fatalf("a signature passed with no token: %q", query)
		}
		status, _ := s.admit(r, Access{Secure: true, EnvdToken: tok})
		if status == 0 && header != tok && checkSignature(r, tok, time.Now()) != nil {
			t.Fatalf("a secure sandbox admitted token %q, query %q", header, query)
		}
		if status == 0 && header != tok {
			// Admitted by signature: only on /files, and the signature is
			// the one made for this path, operation and user.
			if r.URL.Path != "/files" {
				t.Fatalf("signature admitted %s", r.URL.Path)
			}
		}
	})
}

// validMethod reports whether m is a token http.NewRequest takes.
func validMethod(m string) bool {
	if m == "" || len(m) > 16 {
		return false
	}
	for _, c := range m {
		if c < 'A' || c > 'Z' {
			return false
		}
	}
	return true
}
