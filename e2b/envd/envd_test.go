package envd

import (
	"compress/gzip"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/firkin-dev/firkin-worker/client"
	pb "github.com/firkin-dev/firkin-worker/e2b/envd/gen/process"
	"github.com/firkin-dev/firkin-worker/proxy"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// sign makes a signature the way the SDK's getSignature does.
func sign(path, op, user, token, exp string) string {
	raw := path + ":" + op + ":" + user + ":" + token
	if exp != "" {
		raw += ":" + exp
	}
	sum := sha256.Sum256([]byte(raw))
	return url.QueryEscape("v1_" + strings.TrimRight(base64.StdEncoding.EncodeToString(sum[:]), "="))
}

func TestCheckSignature(t *testing.T) {
	const tok = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	now := time.Unix(1_800_000_000, 0)
	for _, c := range []struct {
		name, method, query string
		ok                  bool
	}{
		{"read", "GET", "path=/a&username=user&signature=" + sign("/a", "read", "user", tok, ""), true},
		{"write", "POST", "path=/a&signature=" + sign("/a", "write", "", tok, ""), true},
		{"expiry ahead", "GET", "path=/a&signature_expiration=1800000060&signature=" + sign("/a", "read", "", tok, "1800000060"), true},
		{"expired", "GET", "path=/a&signature_expiration=1799999999&signature=" + sign("/a", "read", "", tok, "1799999999"), false},
		{"read signature used to write", "POST", "path=/a&signature=" + sign("/a", "read", "", tok, ""), false},
		{"other path", "GET", "path=/b&signature=" + sign("/a", "read", "", tok, ""), false},
		{"other user", "GET", "path=/a&username=root&signature=" + sign("/a", "read", "user", tok, ""), false},
		{"other token", "GET", "path=/a&signature=" + sign("/a", "read", "", strings.Repeat("1", 64), ""), false},
		{"expiry dropped", "GET", "path=/a&signature=" + sign("/a", "read", "", tok, "1800000060"), false},
	} {
		r := httptest.NewRequest(c.method, "/files?"+c.query, nil)
		if err := checkSignature(r, tok, now); (err == nil) != c.ok {
			t.Errorf("%s: %v, want ok %v", c.name, err, c.ok)
		}
	}
	r := httptest.NewRequest("GET", "/files?path=/a&signature="+sign("/a", "read", "", "", ""), nil)
	if checkSignature(r, "", now) == nil {
		t.Error("a signature with an empty token passes")
	}
}

// TestSignedURLUser: a request admitted by its /files signature runs as
// the user the signature covers (the username parameter, else the
// default), whatever Authorization says; with a token, Authorization
// picks the user.
func TestSignedURLUser(t *testing.T) {
	const tok = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	s := &Server{cfg: Config{DefaultUser: "user"}}
	acc := Access{Secure: true, EnvdToken: tok}
	root := "Basic " + base64.StdEncoding.EncodeToString([]byte("root:"))
	for _, c := range []struct {
		name, query, token, want string
	}{
		{"signed, no username", "path=/a&signature=" + sign("/a", "read", "", tok, ""), "", "user"},
		{"signed, username", "path=/a&username=user&signature=" + sign("/a", "read", "user", tok, ""), "", "user"},
		{"token", "path=/a", tok, "root"},
	} {
		r := httptest.NewRequest("GET", "/files?"+c.query, nil)
		r.Header.Set("Authorization", root)
		if c.token != "" {
			r.Header.Set(AccessTokenHeader, c.token)
		}
		r, status, msg := s.admitRequest(r, acc)
		if status != 0 {
			t.Fatalf("%s: refused: %d %s", c.name, status, msg)
		}
		if u, err := s.filesUser(r); err != nil || u != c.want {
			t.Errorf("%s: user %q, %v; want %q", c.name, u, err, c.want)
		}
	}
}

func TestGuestPath(t *testing.T) {
	for _, c := range []struct{ in, user, want string }{
		{"/etc/hosts", "user", "/etc/hosts"},
		{"a/b", "user", "/home/user/a/b"},
		{"~", "root", "/root"},
		{"~/x", "user", "/home/user/x"},
		{"../../etc/passwd", "user", "/etc/passwd"}, // a guest path: the guest decides who may read it
		{"/a/./b//c/", "user", "/a/b/c"},
	} {
		if got, err := guestPath(c.in, c.user); err != nil || got != c.want {
			t.Errorf("guestPath(%q, %q) = %q, %v; want %q", c.in, c.user, got, err, c.want)
		}
	}
	for _, bad := range []string{"", "a\x00b", "/" + strings.Repeat("a", maxPathLen)} {
		if _, err := guestPath(bad, "user"); err == nil {
			t.Errorf("guestPath(%.20q) accepted", bad)
		}
	}
}

func TestUserOf(t *testing.T) {
	s := &Server{cfg: Config{DefaultUser: "user"}}
	basic := func(s string) string { return "Basic " + base64.StdEncoding.EncodeToString([]byte(s)) }
	for _, c := range []struct {
		auth, want string
		ok         bool
	}{
		{"", "user", true}, {basic("root:"), "root", true}, {basic(":"), "user", true}, {basic("1000:"), "1000", true},
		{basic("x y:"), "", false}, {basic("-rf:"), "", false}, {basic("../x:"), "", false}, {"Bearer x", "", false}, {"Basic !!", "", false},
		{basic(strings.Repeat("a", 33) + ":"), "", false},
	} {
		h := http.Header{}
		if c.auth != "" {
			h.Set("Authorization", c.auth)
		}
		got, err := s.userOf(h)
		if (err == nil) != c.ok || got != c.want && c.ok {
			t.Errorf("userOf(%q) = %q, %v; want %q ok %v", c.auth, got, err, c.want, c.ok)
		}
	}
}

func TestAdmit(t *testing.T) {
	s := &Server{}
	const envdTok, trafficTok = "envd-token", "traffic-token"
	secure := Access{Secure: true, EnvdToken: envdTok}
	private := Access{VerifyTraffic: func(tok string) bool { return tok == trafficTok }}
	for _, c := range []struct {
		name   string
		acc    Access
		header map[string]string
		ok     bool
	}{
		{"secure, right token", secure, map[string]string{AccessTokenHeader: envdTok}, true},
		{"secure, no token", secure, nil, false},
		{"secure, wrong token", secure, map[string]string{AccessTokenHeader: "x"}, false},
		{"secure, traffic header only", secure, map[string]string{"E2b-Traffic-Access-Token": envdTok}, false},
		// public_traffic opens the guest's ports, not this one: a
		// sandbox made with firkin's defaults (public, not secure) must
		// not run commands for anyone who knows its id.
		{"public, no token", Access{Public: true, VerifyTraffic: private.VerifyTraffic}, nil, false},
		{"public, wrong token", Access{Public: true, VerifyTraffic: private.VerifyTraffic}, map[string]string{AccessTokenHeader: "x"}, false},
		{"public, traffic token", Access{Public: true, VerifyTraffic: private.VerifyTraffic}, map[string]string{AccessTokenHeader: trafficTok}, true},
		{"public, no verifier", Access{Public: true}, map[string]string{AccessTokenHeader: trafficTok}, false},
		{"private, traffic token in X-Access-Token", private, map[string]string{AccessTokenHeader: trafficTok}, true},
		{"private, traffic token header", private, map[string]string{"E2b-Traffic-Access-Token": trafficTok}, true},
		{"private, no token", private, nil, false},
		{"private, wrong token", private, map[string]string{AccessTokenHeader: envdTok}, false},
	} {
		r := httptest.NewRequest("POST", "/process.Process/List", nil)
		for k, v := range c.header {
			r.Header.Set(k, v)
		}
		if status, msg := s.admit(r, c.acc); (status == 0) != c.ok {
			t.Errorf("%s: %d %s, want ok %v", c.name, status, msg, c.ok)
		}
	}
}

func TestEndEvent(t *testing.T) {
	for _, c := range []struct {
		ex     subjects.ProcExit
		code   int32
		exited bool
		status string
	}{
		{subjects.ProcExit{ExitCode: 0}, 0, true, "exit status 0"},
		{subjects.ProcExit{ExitCode: 3}, 3, true, "exit status 3"},
		{subjects.ProcExit{ExitCode: 137, Signal: "KILL"}, -1, false, "signal: killed"},
		{subjects.ProcExit{ExitCode: 143, Signal: "TERM"}, -1, false, "signal: terminated"},
		{subjects.ProcExit{ExitCode: -1, Lost: true}, -1, false, "lost"},
	} {
		end := endEvent(c.ex).GetEnd()
		if end.GetExitCode() != c.code || end.GetExited() != c.exited || end.GetStatus() != c.status {
			t.Errorf("endEvent(%+v) = %v", c.ex, end)
		}
		// error is set (the SDK's CommandExitError message) unless the
		// process exited cleanly; it is the status except for a lost one.
		switch {
		case c.code == 0 && end.Error != nil:
			t.Errorf("endEvent(%+v): error %q on a clean exit", c.ex, end.GetError())
		case c.code != 0 && end.Error == nil:
			t.Errorf("endEvent(%+v): no error", c.ex)
		case c.code != 0 && !c.ex.Lost && end.GetError() != c.status:
			t.Errorf("endEvent(%+v): error %q, want %q", c.ex, end.GetError(), c.status)
		}
	}
}

func TestStartRequest(t *testing.T) {
	cwd := "work"
	req, err := startRequest(&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-l", "-c", "echo hi"}, Cwd: &cwd}}, "user")
	if err != nil {
		t.Fatal(err)
	}
	if req.Command != "/bin/sh" || req.Cwd != "/home/user/work" || !req.Background || req.User != "user" {
		t.Errorf("start request %+v", req)
	}
	if cmd, args := unwrapCommand(req.Command, req.Args); cmd != "/bin/bash" || strings.Join(args, " ") != "-l -c echo hi" {
		t.Errorf("unwrap: %q %q", cmd, args)
	}
	if _, err := startRequest(&pb.StartRequest{Process: &pb.ProcessConfig{}}, "user"); err == nil {
		t.Error("a start without cmd is accepted")
	}
	if _, err := startRequest(&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "sh"}, Pty: &pb.PTY{Size: &pb.PTY_Size{Cols: 0, Rows: 24}}}, "user"); err == nil {
		t.Error("a PTY of 0 columns is accepted")
	}
}

func TestFSEvents(t *testing.T) {
	tmp := ".a.txt.firkin-0123456789ab"
	for _, c := range []struct {
		ev   subjects.WatchEvent
		want string
	}{
		{subjects.WatchEvent{Op: "create", Name: "a"}, "a:EVENT_TYPE_CREATE"},
		{subjects.WatchEvent{Op: "write", Name: "a"}, "a:EVENT_TYPE_WRITE"},
		{subjects.WatchEvent{Op: "remove", Name: "a"}, "a:EVENT_TYPE_REMOVE"},
		{subjects.WatchEvent{Op: "rename", Name: "a", To: "b"}, "a:EVENT_TYPE_RENAME b:EVENT_TYPE_CREATE"},
		{subjects.WatchEvent{Op: "create", Name: tmp}, ""},
		{subjects.WatchEvent{Op: "write", Name: tmp}, ""},
		{subjects.WatchEvent{Op: "rename", Name: tmp, To: "a.txt"}, "a.txt:EVENT_TYPE_CREATE a.txt:EVENT_TYPE_WRITE"},
		{subjects.WatchEvent{Op: "create", Name: ".a.firkin-notahexvalue"}, ".a.firkin-notahexvalue:EVENT_TYPE_CREATE"},
		{subjects.WatchEvent{Op: "overflow"}, ""},
		// A recursive watch names paths relative to the watched directory.
		{subjects.WatchEvent{Op: "create", Name: "d/e", Dir: true}, "d/e:EVENT_TYPE_CREATE"},
		{subjects.WatchEvent{Op: "rename", Name: "d/" + tmp, To: "d/a.txt"}, "d/a.txt:EVENT_TYPE_CREATE d/a.txt:EVENT_TYPE_WRITE"},
		{subjects.WatchEvent{Op: "limit", Name: "d/deep", Dir: true}, ""},
	} {
		var got []string
		for _, fe := range fsEvents(c.ev) {
			got = append(got, fe.GetName()+":"+fe.GetType().String())
		}
		if strings.Join(got, " ") != c.want {
			t.Errorf("fsEvents(%+v) = %q, want %q", c.ev, got, c.want)
		}
	}
}

func TestLifetimeMS(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	for _, c := range []struct {
		deadline time.Time
		ok       bool
		want     int
	}{
		{time.Time{}, false, 0},
		{now.Add(60 * time.Second), true, 60_000},
		{now.Add(-time.Second), true, 1},
		{now.Add(24 * time.Hour), true, 86_400_000},
		{now.Add(25 * time.Hour), true, 0},
	} {
		if got := lifetimeMS(c.deadline, c.ok, now); got != c.want {
			t.Errorf("lifetimeMS(%v, %v) = %d, want %d", c.deadline.Sub(now), c.ok, got, c.want)
		}
	}
}

// TestFailRoute: an unknown or stopped sandbox is 502 (the SDK's "not
// running"), other failures keep their status; the body is envd's JSON.
func TestFailRoute(t *testing.T) {
	s := &Server{}
	for in, want := range map[int]int{404: 502, 503: 502, 400: 400, 504: 504, 502: 502} {
		w := httptest.NewRecorder()
		s.FailRoute(w, httptest.NewRequest("GET", "/health", nil), proxy.Route{SandboxID: "x", Port: Port}, in, "msg")
		var body struct {
			Code    int    `json:"code"`
			Message string `json:"message"`
		}
		if err := json.Unmarshal(w.Body.Bytes(), &body); err != nil || w.Code != want || body.Code != want || body.Message != "msg" {
			t.Errorf("FailRoute(%d) = %d %q (%v), want %d", in, w.Code, w.Body.String(), err, want)
		}
	}
}

// TestWatcherSlots: the watcher bounds count the watchers being made, so
// concurrent CreateWatcher calls cannot pass them; a slot given back is
// free again.
func TestWatcherSlots(t *testing.T) {
	s := &Server{watchers: map[string]*watcher{}}
	var wg sync.WaitGroup
	var got atomic.Int32
	for range 4 * maxWatchersPerSandbox {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if s.reserveWatcher("a") == nil {
				got.Add(1)
			}
		}()
	}
	wg.Wait()
	if got.Load() != maxWatchersPerSandbox {
		t.Fatalf("%d watchers of one sandbox reserved at once, want %d", got.Load(), maxWatchersPerSandbox)
	}
	if err := s.reserveWatcher("b"); err != nil {
		t.Fatalf("another sandbox: %v", err)
	}
	s.unreserveWatcher("a")
	if err := s.reserveWatcher("a"); err != nil {
		t.Fatalf("a slot given back: %v", err)
	}
	for i := 0; i < maxWatchers; i++ {
		s.pendingTotal++
	}
	if err := s.reserveWatcher("c"); err == nil {
		t.Fatal("the worker's bound passed")
	}
}

// TestPublicMessage: an internal failure's text (which can name host
// paths) is not told to the sandbox API's client, only the worker's error
// id; a refusal keeps its text.
func TestPublicMessage(t *testing.T) {
	internal := &client.Error{Code: "runtime_failed", Subject: "firkin.sandbox.a.fs.read",
		Message: "read: open /var/lib/firkin/sandboxes/a/disk.qcow2: input/output error (error id 1x2y3z)"}
	for _, err := range []error{internal, errors.New("subscribe to output: /var/lib/firkin/x")} {
		for _, msg := range []string{publicMessage(err), connectError(err).Error()} {
			if strings.Contains(msg, "/var/lib") {
				t.Errorf("%v told as %q", err, msg)
			}
		}
	}
	if msg := publicMessage(internal); msg != "internal error (error id 1x2y3z)" {
		t.Errorf("internal: %q", msg)
	}
	notFound := &client.Error{Code: subjects.CodeFileNotFound, Message: "/home/user/x: no such file"}
	if msg := publicMessage(notFound); !strings.Contains(msg, "/home/user/x") {
		t.Errorf("not found: %q", msg)
	}
	if ce := connectError(notFound); connect.CodeOf(ce) != connect.CodeNotFound || !strings.Contains(ce.Error(), "/home/user/x") {
		t.Errorf("not found: %v", ce)
	}
}

// TestGzipUploadBound: a gzip upload that inflates past the bound fails
// with a MaxBytesError (413) instead of being written cut short; one that
// inflates to the bound exactly is whole.
func TestGzipUploadBound(t *testing.T) {
	for _, c := range []struct {
		size    int
		tooMuch bool
	}{{100, false}, {1000, false}, {1001, true}, {1 << 20, true}} {
		var zb strings.Builder
		zw := gzip.NewWriter(&zb)
		_, _ = zw.Write(make([]byte, c.size))
		_ = zw.Close()
		zr, err := gzip.NewReader(strings.NewReader(zb.String()))
		if err != nil {
			t.Fatal(err)
		}
		n, err := io.Copy(io.Discard, &maxReader{r: zr, left: 1000, limit: 1000})
		var mbe *http.MaxBytesError
		if got := errors.As(err, &mbe); got != c.tooMuch || (!c.tooMuch && (err != nil || n != int64(c.size))) {
			t.Errorf("%d bytes: copied %d, %v; want too much %v", c.size, n, err, c.tooMuch)
		}
	}
}

// TestOutputBufferBound: what one live output stream may hold for a
// client that does not read is bounded by its channel's capacity alone
// (nats.go takes no pending limits on a channel subscription).
func TestOutputBufferBound(t *testing.T) {
	if got := outputBuffer * subjects.MaxLiveChunk; got > maxStreamBuffer {
		t.Fatalf("a stream buffers up to %d bytes, want at most %d", got, maxStreamBuffer)
	}
}
