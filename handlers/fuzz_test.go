package handlers

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"strings"
	"testing"

	"github.com/nats-io/nats.go/micro"

	"github.com/firkin-dev/firkin-worker/subjects"
)

// fuzzRequest is a request as micro hands it to a handler; it keeps the
// reply.
type fuzzRequest struct {
	subject string
	data    []byte
	ok      []byte
	code    string
	body    []byte
}

func (r *fuzzRequest) Respond(b []byte, _ ...micro.RespondOpt) error { r.ok = b; return nil }
func (r *fuzzRequest) RespondJSON(v any, _ ...micro.RespondOpt) error {
	b, err := json.Marshal(v)
	r.ok = b
	return err
}
func (r *fuzzRequest) Error(code, _ string, data []byte, _ ...micro.RespondOpt) error {
	r.code, r.body = code, data
	return nil
}
func (r *fuzzRequest) Data() []byte           { return r.data }
func (r *fuzzRequest) Headers() micro.Headers { return nil }
func (r *fuzzRequest) Subject() string        { return r.subject }
func (r *fuzzRequest) Reply() string          { return "_INBOX.fuzz" }

// fuzzRuntime records the sandbox ids, snapshot ids and log limits the
// handlers pass on.
type fuzzRuntime struct {
	fakeRuntime
	ids, sids []string
	limits    []int
	calls     int
}

func (f *fuzzRuntime) sandbox(id string) { f.ids = append(f.ids, id); f.calls++ }
func (f *fuzzRuntime) Create(context.Context, subjects.CreateSandboxRequest) (subjects.Sandbox, error) {
	f.calls++
	return subjects.Sandbox{}, nil
}
func (f *fuzzRuntime) List(context.Context) ([]subjects.Sandbox, error) { f.calls++; return nil, nil }
func (f *fuzzRuntime) Get(_ context.Context, id string) (subjects.Sandbox, error) {
	f.sandbox(id)
	return subjects.Sandbox{}, nil
}
func (f *fuzzRuntime) Exec(_ context.Context, id string, _ subjects.ExecRequest) (subjects.ExecReply, error) {
	f.sandbox(id)
	return subjects.ExecReply{}, nil
}
func (f *fuzzRuntime) Kill(_ context.Context, id string) (subjects.KillReply, error) {
	f.sandbox(id)
	return subjects.KillReply{}, nil
}
func (f *fuzzRuntime) SetTimeout(_ context.Context, id string, _ subjects.TimeoutRequest) (subjects.Sandbox, error) {
	f.sandbox(id)
	return subjects.Sandbox{}, nil
}
func (f *fuzzRuntime) Logs(_ context.Context, id string, req subjects.LogsRequest) (subjects.LogsReply, error) {
	f.sandbox(id)
	f.limits = append(f.limits, req.Limit)
	return subjects.LogsReply{}, nil
}
func (f *fuzzRuntime) Snapshot(_ context.Context, id string, _ subjects.SnapshotRequest) (subjects.SnapshotRecord, error) {
	f.sandbox(id)
	return subjects.SnapshotRecord{}, nil
}
func (f *fuzzRuntime) Route(_ context.Context, id string, _ subjects.RouteRequest) (subjects.RouteReply, error) {
	f.sandbox(id)
	return subjects.RouteReply{}, nil
}
func (f *fuzzRuntime) BuildTemplate(context.Context, subjects.BuildTemplateRequest) (subjects.SnapshotRecord, error) {
	f.calls++
	return subjects.SnapshotRecord{}, nil
}
func (f *fuzzRuntime) ListSnapshots(context.Context) ([]subjects.SnapshotRecord, error) {
	f.calls++
	return nil, nil
}
func (f *fuzzRuntime) GetSnapshot(_ context.Context, sid string) (subjects.SnapshotRecord, error) {
	f.sids = append(f.sids, sid)
	f.calls++
	return subjects.SnapshotRecord{}, nil
}
func (f *fuzzRuntime) DeleteSnapshot(_ context.Context, sid string) (subjects.DeleteSnapshotReply, error) {
	f.sids = append(f.sids, sid)
	f.calls++
	return subjects.DeleteSnapshotReply{}, nil
}
func (f *fuzzRuntime) PoolStatus() subjects.PoolStatusReply {
	f.calls++
	return subjects.PoolStatusReply{}
}
func (f *fuzzRuntime) SetPool(context.Context, subjects.PoolSetRequest) (subjects.PoolStatusReply, error) {
	f.calls++
	return subjects.PoolStatusReply{}, nil
}

func (f *fuzzRuntime) FSStat(_ context.Context, id string, _ subjects.FSPathRequest) (subjects.FileInfo, error) {
	f.sandbox(id)
	return subjects.FileInfo{Type: subjects.FileTypeFile, Size: 2}, nil
}
func (f *fuzzRuntime) FSList(_ context.Context, id string, _ subjects.FSListRequest) (subjects.FSListReply, error) {
	f.sandbox(id)
	return subjects.FSListReply{}, nil
}
func (f *fuzzRuntime) FSMkdir(_ context.Context, id string, _ subjects.FSMkdirRequest) (subjects.FSReply, error) {
	f.sandbox(id)
	return subjects.FSReply{OK: true}, nil
}
func (f *fuzzRuntime) FSRemove(_ context.Context, id string, _ subjects.FSRemoveRequest) (subjects.FSReply, error) {
	f.sandbox(id)
	return subjects.FSReply{OK: true}, nil
}
func (f *fuzzRuntime) FSRename(_ context.Context, id string, _ subjects.FSRenameRequest) (subjects.FSReply, error) {
	f.sandbox(id)
	return subjects.FSReply{OK: true}, nil
}
func (f *fuzzRuntime) FSReadTo(_ context.Context, id string, _ subjects.FSReadRequest, w io.Writer) (int64, error) {
	f.sandbox(id)
	n, err := w.Write([]byte("hi"))
	return int64(n), err
}
func (f *fuzzRuntime) FSWriteFrom(_ context.Context, id string, _ subjects.FSWriteRequest, r io.Reader, _ func() string) (subjects.FSWriteReply, error) {
	f.sandbox(id)
	n, err := io.Copy(io.Discard, r)
	return subjects.FSWriteReply{Size: n}, err
}
func (f *fuzzRuntime) FSWatch(_ context.Context, id string, _ subjects.FSWatchRequest, ready func(), _ func([]subjects.WatchEvent)) error {
	f.sandbox(id)
	ready()
	return nil
}

// subjectMatch reports whether subject matches the NATS pattern (with *
// and >), as the server routes requests.
func subjectMatch(pattern, subject string) bool {
	p, s := strings.Split(pattern, "."), strings.Split(subject, ".")
	for i, tok := range p {
		if tok == ">" {
			return len(s) > i
		}
		if i >= len(s) || (tok != "*" && tok != s[i]) || s[i] == "" {
			return false
		}
	}
	return len(p) == len(s)
}

// FuzzHandlers sends a request body on a subject to the handler the NATS
// server would route it to (the service's endpoints, or the per-sandbox
// subscription <prefix>.sandbox.<id>.*). The runtime only ever gets valid
// sandbox ids and snapshot names and a logs limit of 1..1000; a request the
// handlers refuse without asking the runtime is an invalid_request reply
// (never a 5xx that logs an error a client can provoke at will); every
// error reply carries a decodable body with its code.
func FuzzHandlers(f *testing.F) {
	for _, s := range []struct{ subject, data string }{
		{"firkin.sandbox.create", `{"template_id":"tiny"}`},
		{"firkin.sandbox.list", ``},
		{"firkin.sandbox.sb1.logs", `{"limit":1000}`},
		{"firkin.sandbox.sb1.logs", `{"limit":1001}`},
		{"firkin.sandbox.sb1.logs", `{"limit":-1}`},
		{"firkin.sandbox.SB1.logs", `{}`},
		{"firkin.sandbox.sb1.exec", `{"command":"x"}`},
		{"firkin.sandbox.sb1.nope", `{}`},
		{"firkin.sandbox.sb1.get", `{"x":1}`},
		{"firkin.snapshot.list", ``},
		{"firkin.snapshot.a.b.get", ``},
		{"firkin.snapshot.a..b.delete", ``},
		{"firkin.snapshot.x", ``},
		{"firkin.snapshot.x.y", ``},
		{"firkin.template.build", `{"template_id":"t"}`},
		{"firkin.pool.set", `{"template_id":"t","target":1}`},
		{"firkin.pool.status", `[]`},
		{"firkin.sandbox.sb1.proc.start", `{"command":"sh","output_subject":"firkin.logs.x"}`},
		{"firkin.sandbox.sb1.proc.k1234567890a.stdin", `{"data":"x"}`},
		{"firkin.sandbox.sb1.proc.k1234567890a.signal", `{"signal":"TERM"}`},
		{"firkin.sandbox.sb1.proc.BAD.resize", `{"cols":1,"rows":1}`},
		{"firkin.sandbox.sb1.fs.read", `{"path":"/etc/hostname"}`},
		{"firkin.sandbox.sb1.fs.write", `{"path":"/x","data":"AAE=","mode":420}`},
		{"firkin.sandbox.sb1.fs.list", `{"path":"/","depth":33}`},
		{"firkin.sandbox.sb1.fs.watch", `{"path":"/","subject":"firkin.events.x"}`},
		{"firkin.sandbox.sb1.fs.watch", `{"path":"/","subject":"_INBOX.w"}`},
		{"firkin.sandbox.sb1.fs.chunk.t1", `x`},
		{"firkin.sandbox.sb1.fs.nope", `{}`},
	} {
		f.Add(s.subject, []byte(s.data))
	}
	f.Fuzz(func(t *testing.T, subject string, data []byte) {
		rt := &fuzzRuntime{}
		s := &Service{subj: subjects.Default, rt: rt, log: slog.New(slog.DiscardHandler), ctx: context.Background()}
		var stream struct {
			Stream bool `json:"stream"`
		}
		if strings.Contains(subject, ".fs.") && json.Unmarshal(data, &stream) == nil && stream.Stream {
			return // streamed transfers need a live connection: worker/fs_e2e_test.go
		}
		var handle func(context.Context, micro.Request) (any, error)
		for _, ep := range s.endpoints() {
			if subjectMatch(ep.subject, subject) {
				handle = ep.handle
				break
			}
		}
		if handle == nil && subjectMatch(s.subj.SandboxAll("*"), subject) {
			handle = s.sandboxVerb
		}
		if handle == nil {
			return // nothing subscribes to subject
		}
		req := &fuzzRequest{subject: subject, data: data}
		v, err := handle(context.Background(), req)
		s.reply(req, v, err)
		for _, id := range rt.ids {
			if subjects.ValidateSandboxID(id) != nil {
				t.Fatalf("%s: the runtime got sandbox id %q", subject, id)
			}
		}
		for _, sid := range rt.sids {
			if subjects.ValidateSnapshotName(sid) != nil {
				t.Fatalf("%s: the runtime got snapshot id %q", subject, sid)
			}
		}
		for _, l := range rt.limits {
			if l < 1 || l > 1000 {
				t.Fatalf("%s %q: the runtime got a logs limit of %d", subject, data, l)
			}
		}
		if err == nil {
			if rt.calls == 0 || req.ok == nil {
				t.Fatalf("%s %q: answered without the runtime", subject, data)
			}
			return
		}
		var body subjects.ErrorBody
		if json.Unmarshal(req.body, &body) != nil || body.Error.Code == "" || req.code == "" {
			t.Fatalf("%s %q: error reply %q (code %q)", subject, data, req.body, req.code)
		}
		if rt.calls == 0 && body.Error.Code != subjects.CodeInvalidRequest {
			t.Fatalf("%s %q: refused as %s (%s), want invalid_request", subject, data, body.Error.Code, body.Error.Message)
		}
	})
}
