package api

import (
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// FuzzServeHTTP sends any method, path, query and body, with the right key
// or a wrong one, through the whole handler: it never panics, a request
// without the key is always 401 and reaches nothing, and every error is in
// E2B's shape with the status as its code and never a 500 (the stub workers
// do not fail).
func FuzzServeHTTP(f *testing.F) {
	f.Add("POST", "/v2/sandboxes", `{"templateID":"base","timeout":60,"metadata":{"a":"b"}}`, true)
	f.Add("GET", "/v2/sandboxes?metadata=user%3Da%2520b&state=running,paused&limit=2", "", true)
	f.Add("POST", "/sandboxes/sb000000000000000001/timeout", `{"timeout":5}`, true)
	f.Add("POST", "/v2/sandboxes/sb000000000000000001/connect", `{"timeout":-1}`, true)
	f.Add("DELETE", "/templates/x..y", "", true)
	f.Add("GET", "/sandboxes/metrics?sandbox_ids=a,b,,c", "", false)
	f.Add("POST", "/sandboxes", `{"templateID":"base","network":{"allowOut":["*.example.com"],"denyOut":["0.0.0.0/0"]}}`, true)
	f.Fuzz(func(t *testing.T, method, target, body string, withKey bool) {
		if !strings.HasPrefix(target, "/") || strings.ContainsAny(target, " \r\n\t#") || len(target) > 4096 {
			return
		}
		switch method {
		case "GET", "POST", "PUT", "DELETE", "PATCH":
		default:
			return
		}
		api := newStub()
		keys, _ := NewKeys([]string{testKey})
		srv, err := New(Config{API: api, Keys: keys, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		if err != nil {
			t.Fatal(err)
		}
		req, err := http.NewRequest(method, "http://x"+target, strings.NewReader(body))
		if err != nil {
			return
		}
		if withKey {
			req.Header.Set("X-API-KEY", testKey)
		}
		rec := httptest.NewRecorder()
		srv.ServeHTTP(rec, req)
		if !withKey && req.URL.Path != "/health" {
			if rec.Code != 401 || len(api.created)+len(api.lists)+len(api.timeouts) != 0 {
				t.Fatalf("no key: %d, stub saw %d creates", rec.Code, len(api.created))
			}
		}
		if rec.Code >= 400 {
			var e apiError
			if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil || e.Code != rec.Code || e.Message == "" {
				t.Fatalf("%s %s: error %d body %q not E2B's shape", method, target, rec.Code, rec.Body.String())
			}
		}
		if rec.Code == 500 {
			t.Fatalf("%s %s %q: 500 %s", method, target, body, rec.Body.String())
		}
	})
}
