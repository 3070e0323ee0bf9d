package worker_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	crpc "connectrpc.com/connect"

	fspb "github.com/firkin-dev/firkin-worker/e2b/envd/gen/filesystem"
	"github.com/firkin-dev/firkin-worker/e2b/envd/gen/filesystem/filesystemconnect"
	pb "github.com/firkin-dev/firkin-worker/e2b/envd/gen/process"
	"github.com/firkin-dev/firkin-worker/e2b/envd/gen/process/processconnect"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// envdTransport adds what the E2B SDK sends with E2B_SANDBOX_URL set: the
// sandbox id and port headers and the access token.
type envdTransport struct {
	id, token string
}

func (t envdTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("E2b-Sandbox-Id", t.id)
	r.Header.Set("E2b-Sandbox-Port", "49983")
	if t.token != "" {
		r.Header.Set("X-Access-Token", t.token)
	}
	return http.DefaultTransport.RoundTrip(r)
}

// envdClients are Connect clients of a sandbox's E2B sandbox API through
// the worker's proxy, speaking the Connect protocol with JSON as the SDK.
type envdClients struct {
	http *http.Client
	base string
	proc processconnect.ProcessClient
	fs   filesystemconnect.FilesystemClient
}

func newEnvdClients(proxyAddr, id, token string) envdClients {
	hc := &http.Client{Transport: envdTransport{id: id, token: token}}
	base := "http://" + proxyAddr
	return envdClients{http: hc, base: base,
		proc: processconnect.NewProcessClient(hc, base, crpc.WithProtoJSON()),
		fs:   filesystemconnect.NewFilesystemClient(hc, base, crpc.WithProtoJSON())}
}

// procEvents collects a Start or Connect stream.
type procEvents struct {
	pid            uint32
	stdout, stderr bytes.Buffer
	pty            bytes.Buffer
	end            *pb.ProcessEvent_EndEvent
}

func (p *procEvents) add(ev *pb.ProcessEvent) {
	switch e := ev.GetEvent().(type) {
	case *pb.ProcessEvent_Start:
		p.pid = e.Start.GetPid()
	case *pb.ProcessEvent_Data:
		p.stdout.Write(e.Data.GetStdout())
		p.stderr.Write(e.Data.GetStderr())
		p.pty.Write(e.Data.GetPty())
	case *pb.ProcessEvent_End:
		p.end = e.End
	}
}

// TestE2BSandboxAPI drives a secure sandbox's E2B sandbox API (port 49983
// through the proxy) with a Connect client of the SDK's wire format:
// processes with streamed output, input, signals and a PTY; files through
// the filesystem service and /files; and the access token.
func TestE2BSandboxAPI(t *testing.T) {
	e := startWorker(t)
	sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", Secure: true})
	if len(sb.EnvdAccessToken) != 64 || sb.EnvdAccessToken == sb.TrafficAccessToken {
		t.Fatalf("secure create: envd access token %q (traffic token %q)", sb.EnvdAccessToken, sb.TrafficAccessToken)
	}
	if got, err := e.c.Get(e.ctx(10*time.Second), sb.SandboxID); err != nil || got.EnvdAccessToken != "" || !got.Secure {
		t.Fatalf("get: %+v, %v: want secure and no token", got, err)
	}
	addr := e.w.ProxyAddr()
	ctx := e.ctx(90 * time.Second)

	// Access: /health is open; no token and a wrong one are refused; the
	// right one is taken.
	for _, c := range []struct {
		name, token string
	}{{"no token", ""}, {"wrong token", strings.Repeat("0", 64)}, {"traffic token", sb.TrafficAccessToken}} {
		_, err := newEnvdClients(addr, sb.SandboxID, c.token).proc.List(ctx, crpc.NewRequest(&pb.ListRequest{}))
		if crpc.CodeOf(err) != crpc.CodeUnauthenticated {
			t.Errorf("%s: list: %v, want unauthenticated", c.name, err)
		}
	}
	{
		cl := newEnvdClients(addr, sb.SandboxID, "")
		resp, err := cl.http.Get(cl.base + "/health")
		if err != nil || resp.StatusCode != http.StatusNoContent {
			t.Fatalf("health: %v %v", resp, err)
		}
		resp.Body.Close()
		resp, err = cl.http.Get(cl.base + "/files?path=/etc/hostname")
		if err != nil || resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("/files without a token: %v %v, want 401", resp, err)
		}
		resp.Body.Close()
	}
	cl := newEnvdClients(addr, sb.SandboxID, sb.EnvdAccessToken)

	// commands.run: /bin/bash -l -c as the SDK sends it, stdin closed.
	no := false
	st, err := cl.proc.Start(ctx, crpc.NewRequest(&pb.StartRequest{
		Process: &pb.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-l", "-c", "echo out; echo err >&2; pwd; exit 3"}},
		Stdin:   &no,
	}))
	if err != nil {
		t.Fatal(err)
	}
	var run procEvents
	for st.Receive() {
		run.add(st.Msg().GetEvent())
	}
	if err := st.Err(); err != nil {
		t.Fatalf("start stream: %v", err)
	}
	if run.pid == 0 || run.stdout.String() != "out\n/home/user\n" || run.stderr.String() != "err\n" || run.end == nil || run.end.GetExitCode() != 3 || !run.end.GetExited() {
		t.Fatalf("run: pid %d stdout %q stderr %q end %v", run.pid, run.stdout.String(), run.stderr.String(), run.end)
	}

	// A background process: input, list, signal.
	yes, tag := true, "cat-1"
	bg, err := cl.proc.Start(ctx, crpc.NewRequest(&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "cat"}, Tag: &tag, Stdin: &yes}))
	if err != nil {
		t.Fatal(err)
	}
	bgEvents := make(chan *pb.ProcessEvent, 64)
	go func() {
		defer close(bgEvents)
		for bg.Receive() {
			bgEvents <- bg.Msg().GetEvent()
		}
	}()
	var cat procEvents
	next := func(what string) {
		t.Helper()
		select {
		case ev, ok := <-bgEvents:
			if !ok {
				t.Fatalf("%s: stream ended: %v", what, bg.Err())
			}
			cat.add(ev)
		case <-time.After(20 * time.Second):
			t.Fatalf("%s: no event", what)
		}
	}
	next("start")
	if cat.pid == 0 {
		t.Fatal("no start event first")
	}
	sel := &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: cat.pid}}
	if _, err := cl.proc.SendInput(ctx, crpc.NewRequest(&pb.SendInputRequest{Process: sel,
		Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("hello\n")}}})); err != nil {
		t.Fatal(err)
	}
	for cat.stdout.String() != "hello\n" {
		next("echoed input")
	}
	// Connect follows the same process; StreamInput writes in order.
	cctx, stopConnect := context.WithCancel(ctx)
	defer stopConnect()
	cs, err := cl.proc.Connect(cctx, crpc.NewRequest(&pb.ConnectRequest{Process: sel}))
	if err != nil {
		t.Fatal(err)
	}
	if !cs.Receive() || cs.Msg().GetEvent().GetStart().GetPid() != cat.pid {
		t.Fatalf("connect: no start event with pid %d: %v", cat.pid, cs.Err())
	}
	in := cl.proc.StreamInput(ctx)
	for _, m := range []*pb.StreamInputRequest{
		{Event: &pb.StreamInputRequest_Start{Start: &pb.StreamInputRequest_StartEvent{Process: sel}}},
		{Event: &pb.StreamInputRequest_Data{Data: &pb.StreamInputRequest_DataEvent{Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("a")}}}}},
		{Event: &pb.StreamInputRequest_Data{Data: &pb.StreamInputRequest_DataEvent{Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("gain\n")}}}}},
	} {
		if err := in.Send(m); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := in.CloseAndReceive(); err != nil {
		t.Fatalf("stream input: %v", err)
	}
	var follower procEvents
	for !strings.Contains(follower.stdout.String(), "again\n") && cs.Receive() {
		follower.add(cs.Msg().GetEvent())
	}
	if follower.stdout.String() != "again\n" {
		t.Errorf("connect: stdout %q, want again (from now on): %v", follower.stdout.String(), cs.Err())
	}
	stopConnect()
	for cat.stdout.String() != "hello\nagain\n" {
		next("streamed input")
	}
	list, err := cl.proc.List(ctx, crpc.NewRequest(&pb.ListRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, p := range list.Msg.GetProcesses() {
		found = found || p.GetPid() == cat.pid && p.GetTag() == tag && p.GetConfig().GetCmd() == "cat"
	}
	if !found {
		t.Errorf("list: %v, want cat with pid %d and tag %s", list.Msg.GetProcesses(), cat.pid, tag)
	}
	if _, err := cl.proc.SendSignal(ctx, crpc.NewRequest(&pb.SendSignalRequest{
		Process: &pb.ProcessSelector{Selector: &pb.ProcessSelector_Tag{Tag: tag}}, Signal: pb.Signal_SIGNAL_SIGKILL})); err != nil {
		t.Fatal(err)
	}
	for cat.end == nil {
		next("end after SIGKILL")
	}
	if cat.end.GetStatus() != "signal: killed" || cat.end.GetExitCode() != -1 {
		t.Errorf("end after SIGKILL: %v", cat.end)
	}

	// CloseStdin: cat sees the end of its input and exits 0.
	cat2, err := cl.proc.Start(ctx, crpc.NewRequest(&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "cat"}, Stdin: &yes}))
	if err != nil {
		t.Fatal(err)
	}
	var closed procEvents
	if !cat2.Receive() {
		t.Fatalf("cat: no start event: %v", cat2.Err())
	}
	closed.add(cat2.Msg().GetEvent())
	if _, err := cl.proc.CloseStdin(ctx, crpc.NewRequest(&pb.CloseStdinRequest{Process: &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: closed.pid}}})); err != nil {
		t.Fatal(err)
	}
	for cat2.Receive() {
		closed.add(cat2.Msg().GetEvent())
	}
	if closed.end == nil || closed.end.GetExitCode() != 0 || closed.end.GetStatus() != "exit status 0" {
		t.Errorf("cat after CloseStdin: end %v: %v", closed.end, cat2.Err())
	}

	// A PTY: resize, then ask the terminal its size.
	pt, err := cl.proc.Start(ctx, crpc.NewRequest(&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "/bin/sh"},
		Pty: &pb.PTY{Size: &pb.PTY_Size{Cols: 80, Rows: 24}}}))
	if err != nil {
		t.Fatal(err)
	}
	if !pt.Receive() {
		t.Fatalf("pty: no start event: %v", pt.Err())
	}
	var term procEvents
	term.add(pt.Msg().GetEvent())
	psel := &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: term.pid}}
	if _, err := cl.proc.Update(ctx, crpc.NewRequest(&pb.UpdateRequest{Process: psel, Pty: &pb.PTY{Size: &pb.PTY_Size{Cols: 100, Rows: 30}}})); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.proc.SendInput(ctx, crpc.NewRequest(&pb.SendInputRequest{Process: psel,
		Input: &pb.ProcessInput{Input: &pb.ProcessInput_Pty{Pty: []byte("stty size; exit 0\n")}}})); err != nil {
		t.Fatal(err)
	}
	for pt.Receive() {
		term.add(pt.Msg().GetEvent())
	}
	if !strings.Contains(term.pty.String(), "30 100") || term.end == nil || term.stdout.Len() != 0 {
		t.Errorf("pty: output %q end %v (stdout %q), want 30 100 in the terminal's output", term.pty.String(), term.end, term.stdout.String())
	}

	// Files: make a dir, watch it, upload into it, read back, move, list,
	// remove.
	dir := "/tmp/e2b"
	if _, err := cl.fs.MakeDir(ctx, crpc.NewRequest(&fspb.MakeDirRequest{Path: dir + "/sub"})); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.fs.MakeDir(ctx, crpc.NewRequest(&fspb.MakeDirRequest{Path: dir + "/sub"})); crpc.CodeOf(err) != crpc.CodeAlreadyExists {
		t.Errorf("make an existing dir: %v, want already exists", err)
	}
	wctx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	ws, err := cl.fs.WatchDir(wctx, crpc.NewRequest(&fspb.WatchDirRequest{Path: dir}))
	if err != nil {
		t.Fatal(err)
	}
	if !ws.Receive() || ws.Msg().GetStart() == nil {
		t.Fatalf("watch: no start event: %v", ws.Err())
	}
	fsEvents := make(chan *fspb.FilesystemEvent, 64)
	go func() {
		defer close(fsEvents)
		for ws.Receive() {
			if fe := ws.Msg().GetFilesystem(); fe != nil {
				fsEvents <- fe
			}
		}
	}()
	data := make([]byte, 3<<16+7) // every byte value, NUL and CR LF included
	for i := range data {
		data[i] = byte(i * 7)
	}
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	part, _ := mw.CreateFormFile("file", dir+"/up.bin") // the SDK names the path in the filename
	part.Write(data)
	mw.Close()
	resp, err := cl.http.Post(cl.base+"/files?username=root", mw.FormDataContentType(), &body)
	if err != nil {
		t.Fatal(err)
	}
	reply, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(reply), `"path":"/tmp/e2b/up.bin"`) {
		t.Fatalf("upload: %d %s", resp.StatusCode, reply)
	}
	sawCreate := false
	for deadline := time.After(20 * time.Second); !sawCreate; {
		select {
		case fe, ok := <-fsEvents:
			if !ok {
				t.Fatalf("watch ended: %v", ws.Err())
			}
			sawCreate = fe.GetName() == "up.bin" && (fe.GetType() == fspb.EventType_EVENT_TYPE_CREATE || fe.GetType() == fspb.EventType_EVENT_TYPE_RENAME)
		case <-deadline:
			t.Fatal("no watch event for the upload")
		}
	}
	resp, err = cl.http.Get(cl.base + "/files?" + url.Values{"path": {dir + "/up.bin"}, "username": {"root"}}.Encode())
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !bytes.Equal(got, data) {
		t.Fatalf("download: %d, %d bytes, equal %v", resp.StatusCode, len(got), bytes.Equal(got, data))
	}
	mv, err := cl.fs.Move(ctx, crpc.NewRequest(&fspb.MoveRequest{Source: dir + "/up.bin", Destination: dir + "/moved.bin"}))
	if err != nil {
		t.Fatal(err)
	}
	if mv.Msg.GetEntry().GetSize() != int64(len(data)) || mv.Msg.GetEntry().GetType() != fspb.FileType_FILE_TYPE_FILE {
		t.Errorf("move: entry %v", mv.Msg.GetEntry())
	}
	ls, err := cl.fs.ListDir(ctx, crpc.NewRequest(&fspb.ListDirRequest{Path: dir, Depth: 1}))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, en := range ls.Msg.GetEntries() {
		names = append(names, fmt.Sprintf("%s:%s", en.GetName(), en.GetType()))
	}
	if strings.Join(names, ",") != "moved.bin:FILE_TYPE_FILE,sub:FILE_TYPE_DIRECTORY" {
		t.Errorf("list dir: %v", names)
	}
	// A polled watcher sees the removal.
	cw, err := cl.fs.CreateWatcher(ctx, crpc.NewRequest(&fspb.CreateWatcherRequest{Path: dir}))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cl.fs.Remove(ctx, crpc.NewRequest(&fspb.RemoveRequest{Path: dir + "/moved.bin"})); err != nil {
		t.Fatal(err)
	}
	sawRemove := false
	for deadline := time.Now().Add(20 * time.Second); !sawRemove && time.Now().Before(deadline); {
		evs, err := cl.fs.GetWatcherEvents(ctx, crpc.NewRequest(&fspb.GetWatcherEventsRequest{WatcherId: cw.Msg.GetWatcherId()}))
		if err != nil {
			t.Fatal(err)
		}
		for _, fe := range evs.Msg.GetEvents() {
			sawRemove = sawRemove || fe.GetName() == "moved.bin" && fe.GetType() == fspb.EventType_EVENT_TYPE_REMOVE
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !sawRemove {
		t.Error("the polled watcher saw no removal")
	}
	if _, err := cl.fs.RemoveWatcher(ctx, crpc.NewRequest(&fspb.RemoveWatcherRequest{WatcherId: cw.Msg.GetWatcherId()})); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.fs.GetWatcherEvents(ctx, crpc.NewRequest(&fspb.GetWatcherEventsRequest{WatcherId: cw.Msg.GetWatcherId()})); crpc.CodeOf(err) != crpc.CodeNotFound {
		t.Errorf("events of a removed watcher: %v, want not found", err)
	}
	if _, err := cl.fs.Remove(ctx, crpc.NewRequest(&fspb.RemoveRequest{Path: dir + "/sub"})); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.fs.Stat(ctx, crpc.NewRequest(&fspb.StatRequest{Path: dir + "/sub"})); crpc.CodeOf(err) != crpc.CodeNotFound {
		t.Errorf("stat a removed dir: %v, want not found", err)
	}
	var ce *crpc.Error
	if _, err := cl.fs.Stat(ctx, crpc.NewRequest(&fspb.StatRequest{Path: "bad\x00path"})); !errors.As(err, &ce) || ce.Code() != crpc.CodeInvalidArgument {
		t.Errorf("stat a path with NUL: %v, want invalid argument", err)
	}

	// Pause and resume keep the instance, so the token: the resume reply
	// hands it out again (E2B's connect does), and it still opens the API.
	if _, err := e.c.Pause(e.ctx(2*time.Minute), sb.SandboxID); err != nil {
		t.Fatal(err)
	}
	res, err := e.c.Resume(e.ctx(2*time.Minute), sb.SandboxID, subjects.ResumeRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if res.EnvdAccessToken != sb.EnvdAccessToken || res.TrafficAccessToken != "" {
		t.Errorf("resume reply: envd token %q traffic token %q, want the create's envd token only", res.EnvdAccessToken, res.TrafficAccessToken)
	}
	if st, err := cl.fs.Stat(e.ctx(30*time.Second), crpc.NewRequest(&fspb.StatRequest{Path: dir})); err != nil || st.Msg.GetEntry().GetType() != fspb.FileType_FILE_TYPE_DIRECTORY {
		t.Errorf("stat after resume: %v, %v", st, err)
	}
	if _, err := newEnvdClients(addr, sb.SandboxID, "").fs.Stat(e.ctx(30*time.Second), crpc.NewRequest(&fspb.StatRequest{Path: dir})); crpc.CodeOf(err) != crpc.CodeUnauthenticated {
		t.Errorf("no token after resume: %v, want unauthenticated", err)
	}
}

// TestE2BSandboxAPIPrivate: a sandbox that is not secure and whose traffic
// is private takes sandbox API requests with its traffic token only.
func TestE2BSandboxAPIPrivate(t *testing.T) {
	e := startWorker(t)
	private := false
	sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", PublicTraffic: &private})
	if sb.EnvdAccessToken != "" {
		t.Fatalf("a create without secure has an envd token")
	}
	ctx := e.ctx(30 * time.Second)
	addr := e.w.ProxyAddr()
	if _, err := newEnvdClients(addr, sb.SandboxID, "").fs.Stat(ctx, crpc.NewRequest(&fspb.StatRequest{Path: "/"})); crpc.CodeOf(err) != crpc.CodeUnauthenticated {
		t.Errorf("no token: %v, want unauthenticated", err)
	}
	st, err := newEnvdClients(addr, sb.SandboxID, sb.TrafficAccessToken).fs.Stat(ctx, crpc.NewRequest(&fspb.StatRequest{Path: "~"}))
	if err != nil || st.Msg.GetEntry().GetPath() != "/home/user" || st.Msg.GetEntry().GetType() != fspb.FileType_FILE_TYPE_DIRECTORY {
		t.Errorf("stat ~ with the traffic token: %v, %v", st, err)
	}
}
