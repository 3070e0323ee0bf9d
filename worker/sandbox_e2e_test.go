package worker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/subjects"
)

// TestSandboxLifecycle drives one real VM through NATS: exec semantics, logs,
// list/get, kill and cleanup.
func TestSandboxLifecycle(t *testing.T) {
	e := startWorker(t)
	sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", Env: map[string]string{"GREETING": "hi there"}})
	if sb.State != subjects.StateRunning || sb.ClientID != e.w.ID() || sb.TrafficAccessToken == "" || sb.Generation == "" || !sb.EndAt.After(sb.StartedAt) {
		t.Fatalf("create reply = %+v", sb)
	}
	if subjects.ValidateSandboxID(sb.SandboxID) != nil {
		t.Fatalf("generated id %q is not a valid sandbox id", sb.SandboxID)
	}
	id := sb.SandboxID

	t.Run("first command in a warm shell", func(t *testing.T) {
		// The template snapshot (and a warm machine's fill) has the
		// agent's warm shells: the first command does not start a shell,
		// and sees this sandbox's id.
		// (A sandbox with env of its own, like the one above, starts its
		// own: its shells' env differs.)
		// Their $RANDOM is reseeded: sandboxes restored from one snapshot
		// draw different numbers.
		var randoms []string
		for range 2 {
			plain := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
			defer e.c.Kill(context.Background(), plain.SandboxID)
			r := e.exec(plain.SandboxID, `echo $FIRKIN_SANDBOX_ID; tr '\0' ' ' </proc/$$/cmdline; echo; echo $RANDOM`)
			lines := strings.Split(r.Stdout, "\n")
			if len(lines) != 4 || lines[0] != plain.SandboxID || lines[1] != "/bin/sh -lc . /proc/self/fd/3 " {
				t.Fatalf("first command of a %s sandbox = %+v", plain.Source, r)
			}
			randoms = append(randoms, lines[2])
		}
		if randoms[0] == randoms[1] {
			t.Errorf("two sandboxes' first $RANDOM are both %s", randoms[0])
		}
	})
	t.Run("echo", func(t *testing.T) {
		r := e.exec(id, "echo hello")
		if r.Stdout != "hello\n" || r.ExitCode != 0 || r.Stderr != "" {
			t.Fatalf("echo hello = %+v", r)
		}
	})
	t.Run("exit code", func(t *testing.T) {
		if r := e.exec(id, "exit 3"); r.ExitCode != 3 {
			t.Fatalf("exit 3 = %+v", r)
		}
	})
	t.Run("stdout and stderr apart", func(t *testing.T) {
		r := e.exec(id, "echo out; echo err >&2; echo out2")
		if r.Stdout != "out\nout2\n" || r.Stderr != "err\n" {
			t.Fatalf("got %+v", r)
		}
	})
	t.Run("env and cwd", func(t *testing.T) {
		r, err := e.c.Exec(e.ctx(time.Minute), id, subjects.ExecRequest{Command: `echo "$FOO|$GREETING|$(pwd)"`, Env: map[string]string{"FOO": "bar"}, Cwd: "/tmp"})
		if err != nil || r.Stdout != "bar|hi there|/tmp\n" {
			t.Fatalf("got %+v, %v", r, err)
		}
	})
	t.Run("user and stdin", func(t *testing.T) {
		r, err := e.c.Exec(e.ctx(time.Minute), id, subjects.ExecRequest{Command: `id -u; cat`, User: "nobody", Stdin: "piped\n"})
		if err != nil || r.Stdout != "65534\npiped\n" {
			t.Fatalf("got %+v, %v", r, err)
		}
	})
	t.Run("argv with no shell", func(t *testing.T) {
		// $GREETING comes from the create's env; no shell expands it here.
		r, err := e.c.Exec(e.ctx(time.Minute), id, subjects.ExecRequest{Command: "printf", Args: []string{"%s|", "a b", "$GREETING", "x;y"}, Cwd: "/tmp"})
		if err != nil || r.Stdout != "a b|$GREETING|x;y|" || r.ExitCode != 0 {
			t.Fatalf("got %+v, %v", r, err)
		}
		_, err = e.c.Exec(e.ctx(time.Minute), id, subjects.ExecRequest{Command: "no-such-program", Args: []string{}})
		if subjects.CodeOf(err) != subjects.CodeInvalidRequest || !strings.Contains(err.Error(), "not found in PATH") {
			t.Fatalf("unknown program: %v", err)
		}
	})
	t.Run("warm shells", func(t *testing.T) {
		// Commands after the first run in login shells the agent started
		// ahead; they see this sandbox's env and id (not the template's),
		// their own cwd and stdin, and nothing of the command before.
		const warmCmdline = "/bin/sh -lc . /proc/self/fd/3 "
		warm := 0
		for i := range 8 {
			time.Sleep(100 * time.Millisecond) // room for the shells' start-up
			r, err := e.c.Exec(e.ctx(time.Minute), id, subjects.ExecRequest{
				Command: fmt.Sprintf(`echo "$GREETING|$FIRKIN_SANDBOX_ID|$(pwd)|$LEFT"; LEFT=%d; cat; tr '\0' ' ' </proc/$$/cmdline; echo; echo e >&2; exit %d`, i, i),
				Cwd:     "/tmp", Stdin: "in\n",
			})
			if err != nil {
				t.Fatal(err)
			}
			first, cmdline, _ := strings.Cut(r.Stdout, "in\n")
			if first != "hi there|"+id+"|/tmp|\n" || r.Stderr != "e\n" || r.ExitCode != i {
				t.Fatalf("exec %d = %+v", i, r)
			}
			if cmdline == warmCmdline+"\n" {
				warm++
			}
		}
		if warm == 0 {
			t.Fatal("no command ran in a warm shell")
		}
		t.Logf("%d of 8 commands ran in a warm shell", warm)
	})
	t.Run("hostname is the sandbox id", func(t *testing.T) {
		if r := e.exec(id, "hostname"); r.Stdout != id+"\n" {
			t.Fatalf("hostname = %q", r.Stdout)
		}
	})
	t.Run("four concurrent execs", func(t *testing.T) {
		var wg sync.WaitGroup
		errs := make([]error, 4)
		for i := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				want := fmt.Sprintf("n%d\n", i)
				r, err := e.c.Exec(context.Background(), id, subjects.ExecRequest{Command: fmt.Sprintf("sleep 0.%d; echo n%d", 3-i, i)})
				if err == nil && (r.Stdout != want || r.ExitCode != 0) {
					err = fmt.Errorf("got %+v, want %q", r, want)
				}
				errs[i] = err
			}()
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Errorf("exec %d: %v", i, err)
			}
		}
	})
	t.Run("large output is cut in the reply and whole in the log stream", func(t *testing.T) {
		// 4 MiB of numbered lines.
		r := e.exec(id, `awk 'BEGIN { for (i = 0; i < 65536; i++) printf "%063d\n", i }'`)
		if !r.Truncated || len(r.Stdout) == 0 || len(r.Stdout) > 1<<20 {
			t.Fatalf("reply: truncated=%v, %d bytes", r.Truncated, len(r.Stdout))
		}
		var got strings.Builder
		var cursor uint64
		for {
			page, err := e.c.Logs(e.ctx(time.Minute), id, subjects.LogsRequest{Cursor: cursor, Limit: 1000})
			if err != nil {
				t.Fatal(err)
			}
			for _, ev := range page.Events {
				if ev.CommandID == r.CommandID && ev.Source == subjects.SourceStdout {
					got.WriteString(ev.Message)
				}
			}
			if len(page.Events) == 0 {
				break
			}
			cursor = page.NextCursor
		}
		if got.Len() != 65536*64 {
			t.Fatalf("log stream holds %d bytes of the output, want %d", got.Len(), 65536*64)
		}
		lines := strings.Split(strings.TrimSuffix(got.String(), "\n"), "\n")
		if lines[0] != fmt.Sprintf("%063d", 0) || lines[65535] != fmt.Sprintf("%063d", 65535) {
			t.Fatalf("log output out of order: first %q last %q", lines[0], lines[len(lines)-1])
		}
	})
	t.Run("non-UTF-8 output comes as base64", func(t *testing.T) {
		r := e.exec(id, `printf '\377\376'`)
		if r.StdoutB64 != "//4=" || r.Stdout != "" {
			t.Fatalf("got %+v", r)
		}
	})
	t.Run("list and get agree with reality", func(t *testing.T) {
		got, err := e.c.Get(e.ctx(10*time.Second), id)
		if err != nil || got.SandboxID != id || got.State != subjects.StateRunning || got.Resources.MemoryMB != 256 {
			t.Fatalf("get = %+v, %v", got, err)
		}
		list, err := e.c.List(e.ctx(10 * time.Second))
		if err != nil || len(list) != 1 || list[0].SandboxID != id {
			t.Fatalf("list = %+v, %v", list, err)
		}
	})
	t.Run("timeout moves the deadline", func(t *testing.T) {
		got, err := e.c.SetTimeout(e.ctx(10*time.Second), id, 3600)
		if err != nil || time.Until(got.EndAt) < 59*time.Minute {
			t.Fatalf("timeout = %+v, %v", got, err)
		}
	})

	dir := filepath.Join(e.state, "sandboxes")
	if len(qemuProcesses(dir)) != 1 {
		t.Fatalf("want one QEMU process for the sandbox, have %v", qemuProcesses(dir))
	}
	if err := e.c.Kill(e.ctx(time.Minute), id); err != nil {
		t.Fatal(err)
	}
	if procs := qemuProcesses(dir); len(procs) != 0 {
		t.Errorf("QEMU still running after kill: %v", procs)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("machine files left after kill: %v", entries)
	}
	if _, err := e.c.Get(e.ctx(10*time.Second), id); subjects.CodeOf(err) != subjects.CodeSandboxNotFound {
		t.Errorf("get after kill: %v", err)
	}
	list, err := e.c.List(e.ctx(10 * time.Second))
	if err != nil || len(list) != 0 {
		t.Errorf("list after kill = %v, %v", list, err)
	}
	// Logs outlive the sandbox and hold its lifecycle.
	page, err := e.c.Logs(e.ctx(10*time.Second), id, subjects.LogsRequest{Limit: 5})
	if err != nil || len(page.Events) == 0 || page.Events[0].Source != subjects.SourceSystem {
		t.Errorf("logs after kill = %+v, %v", page, err)
	}
}

// TestBadInput sends every kind of bad request and wants the contract's
// error code quickly, with no panic, hang or leaked machine.
func TestBadInput(t *testing.T) {
	e := startWorker(t)
	sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
	exec := func(body string) string { return fmt.Sprintf("firkin.sandbox.%s.exec|%s", sb.SandboxID, body) }
	cases := []struct {
		name, subjBody string
		code           subjects.Code
	}{
		{"malformed JSON", "firkin.sandbox.create|{", subjects.CodeInvalidRequest},
		{"unknown field", `firkin.sandbox.create|{"template_id":"tiny","bogus":1}`, subjects.CodeInvalidRequest},
		{"wrong type", `firkin.sandbox.create|{"template_id":7}`, subjects.CodeInvalidRequest},
		{"missing template", `firkin.sandbox.create|{}`, subjects.CodeInvalidRequest},
		{"unknown template", `firkin.sandbox.create|{"template_id":"nope"}`, subjects.CodeInvalidRequest},
		{"template id with a slash", `firkin.sandbox.create|{"template_id":"../etc"}`, subjects.CodeInvalidRequest},
		{"too many vcpus", `firkin.sandbox.create|{"template_id":"tiny","resources":{"vcpus":1000}}`, subjects.CodeInvalidRequest},
		{"too little memory", `firkin.sandbox.create|{"template_id":"tiny","resources":{"memory_mb":1}}`, subjects.CodeInvalidRequest},
		{"negative timeout", `firkin.sandbox.create|{"template_id":"tiny","timeout_s":-1}`, subjects.CodeInvalidRequest},
		{"invalid sandbox id", `firkin.sandbox.create|{"template_id":"tiny","sandbox_id":"Bad_ID"}`, subjects.CodeInvalidRequest},
		{"taken sandbox id", fmt.Sprintf(`firkin.sandbox.create|{"template_id":"tiny","sandbox_id":%q}`, sb.SandboxID), subjects.CodeConflict},
		{"unknown snapshot", `firkin.sandbox.create|{"snapshot_id":"nope"}`, subjects.CodeSnapshotNotFound},
		{"exec without command", exec(`{}`), subjects.CodeInvalidRequest},
		{"exec unknown field", exec(`{"command":"true","shell":"bash"}`), subjects.CodeInvalidRequest},
		{"exec bad timeout", exec(`{"command":"true","timeout_ms":-5}`), subjects.CodeInvalidRequest},
		{"exec that never ends", exec(`{"command":"sleep 1000","timeout_ms":300}`), subjects.CodeTimeout},
		{"bad logs limit", fmt.Sprintf(`firkin.sandbox.%s.logs|{"limit":5000}`, sb.SandboxID), subjects.CodeInvalidRequest},
		{"bad timeout", fmt.Sprintf(`firkin.sandbox.%s.timeout|{"timeout_s":0}`, sb.SandboxID), subjects.CodeInvalidRequest},
		{"bad snapshot name", fmt.Sprintf(`firkin.sandbox.%s.snapshot|{"name":".."}`, sb.SandboxID), subjects.CodeInvalidRequest},
		{"bad snapshot kind", fmt.Sprintf(`firkin.sandbox.%s.snapshot|{"kind":"full"}`, sb.SandboxID), subjects.CodeInvalidRequest},
		{"unknown sandbox verb", fmt.Sprintf(`firkin.sandbox.%s.reboot|{}`, sb.SandboxID), subjects.CodeInvalidRequest},
		{"pool for unknown template", `firkin.pool.set|{"template_id":"nope","target":1}`, subjects.CodeInvalidRequest},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			subject, body, _ := strings.Cut(tc.subjBody, "|")
			start := time.Now()
			err := e.c.RequestRaw(e.ctx(10*time.Second), subject, []byte(body), nil)
			wantCode(t, tc.name, err, tc.code)
			limit := time.Second
			if tc.code == subjects.CodeTimeout {
				limit = 300*time.Millisecond + time.Second
			}
			if d := time.Since(start); d > limit {
				t.Errorf("answered in %s, want under %s", d, limit)
			}
		})
	}
	t.Run("unknown sandbox fails at once", func(t *testing.T) {
		start := time.Now()
		_, err := e.nc.Request("firkin.sandbox.nosuchbox.exec", []byte(`{"command":"true"}`), 5*time.Second)
		if err != nats.ErrNoResponders {
			t.Errorf("err = %v, want no responders", err)
		}
		if d := time.Since(start); d > 500*time.Millisecond {
			t.Errorf("took %s", d)
		}
	})
	t.Run("error reply shape", func(t *testing.T) {
		msg, err := e.nc.Request("firkin.sandbox.create", []byte(`{"template_id":"nope"}`), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var body subjects.ErrorBody
		if err := json.Unmarshal(msg.Data, &body); err != nil || body.Error.Code != subjects.CodeInvalidRequest || body.Error.Message == "" {
			t.Errorf("body %s: %v", msg.Data, err)
		}
		if msg.Header.Get("Nats-Service-Error-Code") != "400" || msg.Header.Get("Nats-Service-Error") == "" {
			t.Errorf("headers %v", msg.Header)
		}
	})
	// The sandbox survived all of it and no other machine was left behind.
	if r := e.exec(sb.SandboxID, "echo alive"); r.Stdout != "alive\n" {
		t.Errorf("sandbox after bad input: %+v", r)
	}
	if procs := qemuProcesses(filepath.Join(e.state, "sandboxes")); len(procs) != 1 {
		t.Errorf("QEMU processes = %d, want 1: %v", len(procs), procs)
	}
}

// TestDeadlineExpires ends a sandbox when its deadline passes while it runs,
// and publishes an expired event.
func TestDeadlineExpires(t *testing.T) {
	e := startWorker(t)
	events, err := e.nc.SubscribeSync("firkin.events.expired.>")
	if err != nil {
		t.Fatal(err)
	}
	sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", TimeoutS: 2})
	if d := sb.EndAt.Sub(sb.StartedAt); d != 2*time.Second {
		t.Fatalf("end_at - started_at = %s, want 2s", d)
	}
	msg, err := events.NextMsg(30 * time.Second)
	if err != nil {
		t.Fatalf("no expired event: %v", err)
	}
	var ev subjects.LifecycleEvent
	if err := json.Unmarshal(msg.Data, &ev); err != nil || ev.SandboxID != sb.SandboxID || ev.Kind != subjects.EventExpired {
		t.Fatalf("event %s: %v", msg.Data, err)
	}
	if _, err := e.c.Get(e.ctx(5*time.Second), sb.SandboxID); subjects.CodeOf(err) != subjects.CodeSandboxNotFound {
		t.Errorf("get after expiry: %v", err)
	}
	eventually(t, 10*time.Second, "machine gone", func() error {
		if procs := qemuProcesses(filepath.Join(e.state, "sandboxes")); len(procs) > 0 {
			return fmt.Errorf("still running: %d", len(procs))
		}
		return nil
	})
}
