package api

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/subjects"
)

const testKey = "e2b_0123456789abcdef0123"

// stubAPI records requests and answers from a table: pure mapping tests of
// the handlers (the SDK test in testdata/sdk drives a real worker).
type stubAPI struct {
	mu        sync.Mutex
	created   []subjects.CreateSandboxRequest
	sandboxes map[string]subjects.Sandbox
	snapshots map[string]subjects.SnapshotRecord
	lists     []subjects.ListSandboxesRequest
	timeouts  map[string]int
	resumed   []string
}

func newStub() *stubAPI {
	return &stubAPI{sandboxes: map[string]subjects.Sandbox{}, snapshots: map[string]subjects.SnapshotRecord{}, timeouts: map[string]int{}}
}

func notFoundErr() error {
	return &client.Error{Code: subjects.CodeSandboxNotFound, Message: "no worker owns this sandbox"}
}

func (s *stubAPI) Create(_ context.Context, req subjects.CreateSandboxRequest) (subjects.Sandbox, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if req.TemplateID == "missing" {
		return subjects.Sandbox{}, &client.Error{Code: subjects.CodeInvalidRequest, Message: "unknown template missing"}
	}
	if req.TemplateID == "full" {
		return subjects.Sandbox{}, &client.Error{Code: subjects.CodeCapacityRejected, Message: "limits reached"}
	}
	s.created = append(s.created, req)
	sb := subjects.Sandbox{SandboxID: fmt.Sprintf("sb%018d", len(s.created)), TemplateID: req.TemplateID, SnapshotID: req.SnapshotID, ClientID: "wabcdefghijk",
		TrafficAccessToken: "traffic", EnvdAccessToken: "envd", Generation: "g1", State: subjects.StateRunning,
		StartedAt: time.Now(), EndAt: time.Now().Add(time.Duration(req.TimeoutS) * time.Second), Metadata: req.Metadata,
		Resources: subjects.Resources{VCPUs: 1, MemoryMB: 256}, Network: true, PublicTraffic: true}
	s.sandboxes[sb.SandboxID] = sb.WithoutTokens()
	return sb, nil
}

func (s *stubAPI) Get(_ context.Context, id string) (subjects.Sandbox, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sb, ok := s.sandboxes[id]
	if !ok {
		return sb, notFoundErr()
	}
	return sb, nil
}

func (s *stubAPI) Kill(_ context.Context, id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.sandboxes[id]; !ok {
		return notFoundErr()
	}
	delete(s.sandboxes, id)
	return nil
}

func (s *stubAPI) SetTimeout(_ context.Context, id string, seconds int) (subjects.Sandbox, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sb, ok := s.sandboxes[id]
	if !ok {
		return sb, notFoundErr()
	}
	s.timeouts[id] = seconds
	sb.EndAt = time.Now().Add(time.Duration(seconds) * time.Second)
	s.sandboxes[id] = sb
	return sb, nil
}

func (s *stubAPI) Pause(_ context.Context, id string) (subjects.Sandbox, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sb := s.sandboxes[id]
	sb.State = subjects.StatePaused
	sb.Paused = &subjects.PausedInfo{RemainingMS: 1000}
	s.sandboxes[id] = sb
	return sb, nil
}

func (s *stubAPI) Resume(_ context.Context, id string, req subjects.ResumeRequest) (subjects.Sandbox, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sb := s.sandboxes[id]
	sb.State, sb.Paused = subjects.StateRunning, nil
	s.sandboxes[id] = sb
	s.resumed = append(s.resumed, id)
	return sb, nil
}

func (s *stubAPI) Fork(context.Context, string, subjects.ForkRequest) (subjects.ForkReply, error) {
	return subjects.ForkReply{}, &client.Error{Code: subjects.CodeUnsupported, Message: "no"}
}

func (s *stubAPI) ListPage(_ context.Context, req subjects.ListSandboxesRequest) (subjects.ListSandboxesReply, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lists = append(s.lists, req)
	list := make([]subjects.Sandbox, 0, len(s.sandboxes))
	for _, sb := range s.sandboxes {
		list = append(list, sb)
	}
	return subjects.PageSandboxes(list, req), nil
}

func (s *stubAPI) Metrics(context.Context, string) (subjects.MetricsReply, error) {
	return subjects.MetricsReply{History: []subjects.SandboxMetrics{{At: time.Unix(1000, 0), GuestCPUPercent: -1, GuestMemTotal: 10}}}, nil
}

func (s *stubAPI) Snapshot(_ context.Context, id string, req subjects.SnapshotRequest) (subjects.SnapshotRecord, error) {
	rec := subjects.SnapshotRecord{SnapshotID: req.Name, SourceSandboxID: id, Kind: req.Kind}
	s.mu.Lock()
	s.snapshots[req.Name] = rec
	s.mu.Unlock()
	return rec, nil
}

func (s *stubAPI) GetSnapshot(_ context.Context, sid string) (subjects.SnapshotRecord, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	rec, ok := s.snapshots[sid]
	if !ok {
		return rec, &client.Error{Code: subjects.CodeSnapshotNotFound, Message: "no snapshot " + sid}
	}
	return rec, nil
}

func (s *stubAPI) ListSnapshots(context.Context) ([]subjects.SnapshotRecord, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []subjects.SnapshotRecord
	for _, r := range s.snapshots {
		out = append(out, r)
	}
	return out, nil
}

func (s *stubAPI) DeleteSnapshot(_ context.Context, sid string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.snapshots, sid)
	return nil
}

func newTestServer(t *testing.T, api API) *httptest.Server {
	t.Helper()
	keys, err := NewKeys([]string{testKey})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := New(Config{API: api, Keys: keys, Domain: "localhost:8080"})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(srv)
	t.Cleanup(ts.Close)
	return ts
}

func do(t *testing.T, ts *httptest.Server, method, path, body string, key string) (int, http.Header, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, ts.URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if key != "" {
		req.Header.Set("X-API-KEY", key)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	data, _ := io.ReadAll(res.Body)
	return res.StatusCode, res.Header, data
}

func TestAPIKeys(t *testing.T) {
	ts := newTestServer(t, newStub())
	for _, key := range []string{"", "e2b_0123456789abcdef0124", testKey + "x", strings.Repeat("k", 300)} {
		status, _, body := do(t, ts, "GET", "/v2/sandboxes", "", key)
		var e apiError
		if status != 401 || json.Unmarshal(body, &e) != nil || e.Code != 401 || e.Message == "" {
			t.Fatalf("key %q: %d %s", key, status, body)
		}
	}
	if status, _, body := do(t, ts, "GET", "/v2/sandboxes", "", testKey); status != 200 {
		t.Fatalf("right key: %d %s", status, body)
	}
	if status, _, _ := do(t, ts, "GET", "/health", "", ""); status != 200 {
		t.Fatalf("health: %d", status)
	}
}

func TestCreateMapsE2BToFirkin(t *testing.T) {
	api := newStub()
	ts := newTestServer(t, api)
	body := `{"templateID":"base","timeout":60,"metadata":{"a":"b"},"envVars":{"X":"1"},"autoPause":true,"autoResume":{"enabled":true},
		"allow_internet_access":false,"network":{"allowOut":["1.1.1.1"],"allowPublicTraffic":false},"mcp":null}`
	status, _, data := do(t, ts, "POST", "/v2/sandboxes", body, testKey)
	if status != 201 {
		t.Fatalf("create: %d %s", status, data)
	}
	var sb sandbox
	if err := json.Unmarshal(data, &sb); err != nil {
		t.Fatal(err)
	}
	if sb.SandboxID == "" || sb.TemplateID != "base" || sb.EnvdVersion != EnvdVersion || sb.EnvdAccessToken != "envd" ||
		sb.TrafficAccessToken == nil || *sb.TrafficAccessToken != "traffic" || sb.Domain == nil || *sb.Domain != "localhost:8080" || sb.ClientID == "" {
		t.Fatalf("reply %s", data)
	}
	req := api.created[0]
	if req.TemplateID != "tiny" || req.TimeoutS != 60 || req.Metadata["a"] != "b" || req.Env["X"] != "1" || !req.Secure ||
		req.OnTimeout != subjects.OnTimeoutPause || !req.AutoResume || req.PublicTraffic == nil || *req.PublicTraffic ||
		req.Egress == nil || strings.Join(req.Egress.Allow, ",") != "1.1.1.1" || strings.Join(req.Egress.Deny, ",") != "0.0.0.0/0,::/0" {
		t.Fatalf("firkin request %+v egress %+v", req, req.Egress)
	}
	// v1 defaults: 15 s, and secure even when asked not to be (the
	// sandbox API of a sandbox that is not secure wants the traffic
	// token, which the SDK never sends there).
	if status, _, data := do(t, ts, "POST", "/sandboxes", `{"templateID":"base","secure":false}`, testKey); status != 201 {
		t.Fatalf("v1 create: %d %s", status, data)
	}
	if req := api.created[1]; req.TimeoutS != 15 || !req.Secure {
		t.Fatalf("v1 request %+v", req)
	}
	// getInfo hands back the envd token of the instance it created.
	status, _, data = do(t, ts, "GET", "/sandboxes/"+sb.SandboxID, "", testKey)
	var d sandboxDetail
	if status != 200 || json.Unmarshal(data, &d) != nil || d.EnvdAccessToken != "envd" || d.State != "running" || d.TemplateID != "base" || d.Metadata["a"] != "b" {
		t.Fatalf("get: %d %s", status, data)
	}
}

func TestCreateRefusesWhatFirkinCannotDo(t *testing.T) {
	ts := newTestServer(t, newStub())
	for _, tc := range []struct{ body, want string }{
		{`{"templateID":"base","timeout":0}`, "timeout"},
		{`{"templateID":"base","timeout":86401}`, "timeout"},
		{`{"templateID":"base","mcp":{"x":1}}`, "mcp"},
		{`{"templateID":"base","volumeMounts":[{"name":"v","path":"/v"}]}`, "volumeMounts"},
		{`{"templateID":"base","autoPause":true,"autoPauseMemory":false}`, "autoPauseMemory"},
		{`{"templateID":"base","autoResume":{"enabled":true}}`, "autoResume"},
		{`{"templateID":"base","network":{"rules":{"a.com":[]}}}`, "rules"},
		{`{"templateID":"base","network":{"denyOut":["not an address!"]}}`, "network"},
		{`{"templateID":"base","metadata":{"":"x"}}`, "metadata"},
		{`{"templateID":"bad id!"}`, "templateID"},
		{`{"templateID":"base","timeout":"x"}`, "request body"},
		{`{"templateID":"missing"}`, "unknown template"},
	} {
		status, _, data := do(t, ts, "POST", "/v2/sandboxes", tc.body, testKey)
		var e apiError
		if status != 400 || json.Unmarshal(data, &e) != nil || e.Code != 400 || !strings.Contains(e.Message, tc.want) {
			t.Errorf("%s: %d %s, want 400 about %s", tc.body, status, data, tc.want)
		}
	}
	big := `{"templateID":"base","metadata":{"k":"` + strings.Repeat("x", maxCreateBody) + `"}}`
	if status, _, data := do(t, ts, "POST", "/v2/sandboxes", big, testKey); status != 400 || !strings.Contains(string(data), "over") {
		t.Errorf("oversized body: %d %s", status, data)
	}
	if status, _, data := do(t, ts, "POST", "/v2/sandboxes", `{"templateID":"full"}`, testKey); status != 429 {
		t.Errorf("capacity_rejected: %d %s, want 429", status, data)
	}
}

func TestLifecycleStatuses(t *testing.T) {
	api := newStub()
	ts := newTestServer(t, api)
	_, _, data := do(t, ts, "POST", "/v2/sandboxes", `{"templateID":"base","metadata":{"user":"a b&c=d"}}`, testKey)
	var sb sandbox
	if err := json.Unmarshal(data, &sb); err != nil {
		t.Fatal(err)
	}
	id := sb.SandboxID
	steps := []struct {
		method, path, body string
		want               int
	}{
		{"POST", "/sandboxes/" + id + "/timeout", `{"timeout":120}`, 204},
		{"POST", "/sandboxes/" + id + "/timeout", `{}`, 400},
		{"POST", "/sandboxes/" + id + "/resume", `{}`, 409}, // running
		{"POST", "/v2/sandboxes/" + id + "/connect", `{"timeout":60}`, 200},
		{"POST", "/sandboxes/" + id + "/pause", `{}`, 204},
		{"POST", "/sandboxes/" + id + "/pause", `{}`, 409}, // already paused
		{"POST", "/v2/sandboxes/" + id + "/connect", `{"timeout":60}`, 201},
		{"PUT", "/sandboxes/" + id + "/network", `{}`, 501},
		{"GET", "/sandboxes/" + id + "/metrics", "", 200},
		{"GET", "/sandboxes/metrics?sandbox_ids=" + id, "", 200},
		{"POST", "/sandboxes/" + id + "/fork", `{"count":99}`, 400},
		{"POST", "/sandboxes/" + id + "/snapshots", `{"name":"snap-1"}`, 201},
		{"GET", "/snapshots?sandboxID=" + id, "", 200},
		{"DELETE", "/templates/snap-1", "", 204},
		{"DELETE", "/sandboxes/" + id, "", 204},
		{"DELETE", "/sandboxes/" + id, "", 404},
		{"GET", "/sandboxes/" + id, "", 404},
		{"GET", "/sandboxes/NOT..AN..ID", "", 404},
		{"POST", "/v2/sandboxes/" + id + "/connect", `{}`, 404},
		{"GET", "/no/such/path", "", 404},
	}
	for _, st := range steps {
		status, _, data := do(t, ts, st.method, st.path, st.body, testKey)
		if status != st.want {
			t.Errorf("%s %s %s: %d %s, want %d", st.method, st.path, st.body, status, data, st.want)
		}
		if status >= 400 {
			var e apiError
			if json.Unmarshal(data, &e) != nil || e.Code != status || e.Message == "" {
				t.Errorf("%s %s: error body %s not E2B's shape", st.method, st.path, data)
			}
		}
	}
	if api.timeouts[id] == 0 || len(api.resumed) != 1 {
		t.Fatalf("timeouts %v resumed %v", api.timeouts, api.resumed)
	}
}

func TestListFiltersAndPages(t *testing.T) {
	api := newStub()
	ts := newTestServer(t, api)
	now := time.Now()
	for i, id := range []string{"sba", "sbb", "sbc"} {
		api.sandboxes[id] = subjects.Sandbox{SandboxID: id, TemplateID: "tiny", State: subjects.StateRunning, StartedAt: now.Add(time.Duration(i) * time.Second),
			Metadata: map[string]string{"user": "a b&c=d", "n": id}}
	}
	api.sandboxes["sbp"] = subjects.Sandbox{SandboxID: "sbp", TemplateID: "tiny", State: subjects.StatePaused, Paused: &subjects.PausedInfo{}}
	api.sandboxes["sbl"] = subjects.Sandbox{SandboxID: "sbl", TemplateID: "tiny", State: "lost"}
	// As the SDK encodes it: URLSearchParams of encodeURIComponent'd pairs.
	md := "user%3Da%2520b%2526c%253Dd"
	status, hdr, data := do(t, ts, "GET", "/v2/sandboxes?metadata="+md+"&limit=2", "", testKey)
	var page []sandboxDetail
	if status != 200 || json.Unmarshal(data, &page) != nil || len(page) != 2 || hdr.Get("X-Next-Token") != "sbb" {
		t.Fatalf("page 1: %d %v %s", status, hdr, data)
	}
	if page[0].SandboxID != "sbb" || page[1].SandboxID != "sba" { // newest first within the page
		t.Fatalf("page 1 order: %s", data)
	}
	if got := api.lists[0].Metadata["user"]; got != "a b&c=d" {
		t.Fatalf("metadata filter decoded as %q", got)
	}
	_, hdr, data = do(t, ts, "GET", "/v2/sandboxes?metadata="+md+"&limit=2&nextToken=sbb", "", testKey)
	if json.Unmarshal(data, &page) != nil || len(page) != 1 || page[0].SandboxID != "sbc" || hdr.Get("X-Next-Token") != "" {
		t.Fatalf("page 2: %v %s", hdr, data)
	}
	_, _, data = do(t, ts, "GET", "/v2/sandboxes?state=paused", "", testKey)
	if json.Unmarshal(data, &page) != nil || len(page) != 1 || page[0].SandboxID != "sbp" || page[0].State != "paused" {
		t.Fatalf("paused: %s", data)
	}
	_, _, data = do(t, ts, "GET", "/v2/sandboxes?state=running,paused", "", testKey)
	if json.Unmarshal(data, &page) != nil || len(page) != 4 { // not the lost one
		t.Fatalf("running,paused: %s", data)
	}
	_, _, data = do(t, ts, "GET", "/sandboxes", "", testKey)
	if json.Unmarshal(data, &page) != nil || len(page) != 3 || page[0].TemplateID != "base" {
		t.Fatalf("v1 list: %s", data)
	}
	for _, q := range []string{"state=lost", "limit=0", "limit=1001", "nextToken=..", "order=sideways", "startedAfter=yesterday", "metadata=a%3D%25ZZ"} {
		if status, _, data := do(t, ts, "GET", "/v2/sandboxes?"+q, "", testKey); status != 400 {
			t.Errorf("%s: %d %s, want 400", q, status, data)
		}
	}
}

func TestE2BTemplate(t *testing.T) {
	srv, err := New(Config{API: newStub(), Keys: mustKeys(t)})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		sb   subjects.Sandbox
		want string
	}{
		{subjects.Sandbox{TemplateID: "tiny", SnapshotID: "tiny"}, "base"},
		{subjects.Sandbox{TemplateID: "py", SnapshotID: "py"}, "py"},
		{subjects.Sandbox{TemplateID: "tiny", SnapshotID: "my-snap"}, "my-snap"},
		{subjects.Sandbox{TemplateID: "tiny", SnapshotID: "sbx-fork-abc", ForkedFrom: "sbx"}, "base"},
		{subjects.Sandbox{TemplateID: "tiny", SnapshotID: "sbx-pause-abc"}, "base"},
		{subjects.Sandbox{SnapshotID: "old"}, "old"},
	} {
		if got := srv.e2bTemplate(tc.sb); got != tc.want {
			t.Errorf("%+v: %q, want %q", tc.sb, got, tc.want)
		}
	}
}

func mustKeys(t *testing.T) *Keys {
	t.Helper()
	k, err := NewKeys([]string{testKey})
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestLoadOrCreateKey(t *testing.T) {
	dir := t.TempDir()
	key, path, created, err := LoadOrCreateKey(dir)
	if err != nil || !created || !strings.HasPrefix(key, "e2b_") || len(key) != 44 {
		t.Fatalf("first: %q %v %v", key, created, err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 || path != filepath.Join(dir, KeyFile) {
		t.Fatalf("key file %s: %v %v", path, fi.Mode(), err)
	}
	again, _, created, err := LoadOrCreateKey(dir)
	if err != nil || created || again != key {
		t.Fatalf("second: %q %v %v", again, created, err)
	}
	keys, err := LoadKeys("", "", dir, nil)
	if err != nil || !keys.Check(key) || keys.Check(key[:len(key)-1]) {
		t.Fatalf("LoadKeys from the state dir: %v", err)
	}
}

func TestKeysFromFileAndEnv(t *testing.T) {
	file := filepath.Join(t.TempDir(), "keys")
	if err := os.WriteFile(file, []byte("# comment\nfirst-key-0123456789\n\nsecond-key-0123456789, third-key-0123456789\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	keys, err := LoadKeys(file, "", t.TempDir(), nil)
	if err != nil || keys.Len() != 3 || !keys.Check("third-key-0123456789") || keys.Check("# comment") {
		t.Fatalf("file: %v", err)
	}
	keys, err = LoadKeys("", "env-key-0123456789abc,other-key-0123456789", t.TempDir(), nil)
	if err != nil || keys.Len() != 2 || !keys.Check("other-key-0123456789") {
		t.Fatalf("env: %v", err)
	}
	for _, bad := range [][]string{{"short"}, {"has space in it 0123456789"}, {strings.Repeat("x", 257)}} {
		if _, err := NewKeys(bad); err == nil {
			t.Errorf("key %q accepted", bad[0])
		}
	}
	if _, err := LoadKeys(file, "env-key-0123456789abc", t.TempDir(), nil); err == nil {
		t.Error("a file and the env both accepted")
	}
}

func TestParseTemplates(t *testing.T) {
	m, err := ParseTemplates("base=tiny, python=py")
	if err != nil || m["base"] != "tiny" || m["python"] != "py" {
		t.Fatalf("%v %v", m, err)
	}
	for _, bad := range []string{"base", "base=", "=tiny", "base=../x", "ba se=tiny"} {
		if _, err := ParseTemplates(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
