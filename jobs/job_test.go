package jobs

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

func TestDecodeValid(t *testing.T) {
	j, err := Decode([]byte(`{"job_id":"a-1","template_id":"tiny","env":{"A":"b"},"keep_going":true,"timeout_s":60,
		"commands":["echo hi",{"command":"cat","stdin":"x","env":{"B":"c"},"cwd":"/tmp","user":"nobody","timeout_ms":1000}],
		"files":[{"path":"/a/b","content":"hi"},{"path":"/c","content_b64":"aGk=","mode":"0755"}],
		"resources":{"vcpus":2,"memory_mb":512},"snapshot":{"name":"s-1"}}`))
	if err != nil {
		t.Fatal(err)
	}
	if j.JobID != "a-1" || len(j.Commands) != 2 || j.Commands[0].Command != "echo hi" || j.Commands[1].User != "nobody" ||
		j.Commands[1].TimeoutMS != 1000 || j.Snapshot.Name != "s-1" || !j.KeepGoing || j.Resources.VCPUs != 2 {
		t.Fatalf("decoded %+v", j)
	}
	if string(j.Files[1].data) != "hi" || j.Files[1].mode != 0o755 || j.Files[0].mode != 0o644 {
		t.Fatalf("files %+v", j.Files)
	}
	j, err = Decode([]byte(`{"snapshot_id":"web.v2","commands":["true"],"snapshot":true}`))
	if err != nil || j.Snapshot == nil || j.Snapshot.Name != "" {
		t.Fatalf("snapshot:true = %+v, %v", j, err)
	}
}

func TestDecodeInvalid(t *testing.T) {
	long := strings.Repeat("x", MaxCommandBytes+1)
	for name, body := range map[string]string{
		"not json":             `{`,
		"unknown field":        `{"template_id":"tiny","commands":["true"],"x":1}`,
		"unknown command key":  `{"template_id":"tiny","commands":[{"command":"true","shell":"bash"}]}`,
		"trailing data":        `{"template_id":"tiny","commands":["true"]} {}`,
		"no source":            `{"commands":["true"]}`,
		"both sources":         `{"template_id":"tiny","snapshot_id":"s","commands":["true"]}`,
		"bad template":         `{"template_id":"Tiny!","commands":["true"]}`,
		"bad snapshot":         `{"snapshot_id":"..","commands":["true"]}`,
		"no commands":          `{"template_id":"tiny","commands":[]}`,
		"empty command":        `{"template_id":"tiny","commands":[""]}`,
		"command too long":     `{"template_id":"tiny","commands":["` + long + `"]}`,
		"command wrong type":   `{"template_id":"tiny","commands":[3]}`,
		"bad job id":           `{"job_id":"a.b","template_id":"tiny","commands":["true"]}`,
		"negative timeout":     `{"template_id":"tiny","commands":["true"],"timeout_s":-1}`,
		"huge timeout":         `{"template_id":"tiny","commands":["true"],"timeout_s":86401}`,
		"command timeout":      `{"template_id":"tiny","commands":[{"command":"true","timeout_ms":3600001}]}`,
		"relative path":        `{"template_id":"tiny","commands":["true"],"files":[{"path":"a"}]}`,
		"unclean path":         `{"template_id":"tiny","commands":["true"],"files":[{"path":"/a/../b"}]}`,
		"both contents":        `{"template_id":"tiny","commands":["true"],"files":[{"path":"/a","content":"x","content_b64":"eA=="}]}`,
		"bad base64":           `{"template_id":"tiny","commands":["true"],"files":[{"path":"/a","content_b64":"!!"}]}`,
		"bad mode":             `{"template_id":"tiny","commands":["true"],"files":[{"path":"/a","mode":"999"}]}`,
		"env key with =":       `{"template_id":"tiny","commands":["true"],"env":{"A=B":"c"}}`,
		"snapshot false":       `{"template_id":"tiny","commands":["true"],"snapshot":false}`,
		"bad snapshot name":    `{"template_id":"tiny","commands":["true"],"snapshot":{"name":"a/b"}}`,
		"negative resources":   `{"template_id":"tiny","commands":["true"],"resources":{"vcpus":-1}}`,
		"snapshot unknown key": `{"template_id":"tiny","commands":["true"],"snapshot":{"name":"a","x":1}}`,
	} {
		if _, err := Decode([]byte(body)); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%s: err = %v, want invalid argument", name, err)
		}
	}
	var cmds []string
	for range MaxCommands + 1 {
		cmds = append(cmds, `"true"`)
	}
	if _, err := Decode([]byte(`{"template_id":"tiny","commands":[` + strings.Join(cmds, ",") + `]}`)); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("too many commands: %v", err)
	}
}

func TestQueueNames(t *testing.T) {
	for _, q := range []string{"default", "gpu", "a_b-1"} {
		if err := ValidateQueue(q); err != nil {
			t.Errorf("%q: %v", q, err)
		}
	}
	for _, q := range []string{"", "status", "dead", "cancel", "submit", "a.b", "*", ">", "A", strings.Repeat("a", 33)} {
		if ValidateQueue(q) == nil {
			t.Errorf("%q accepted", q)
		}
	}
}

func TestHead(t *testing.T) {
	text := strings.Repeat("é", OutputHead) // 2 bytes each
	got, b64, cut := head(text, "")
	if !cut || b64 != "" || len(got) > OutputHead || len(got) < OutputHead-1 || !strings.HasPrefix(text, got) {
		t.Fatalf("head cut %d bytes, %v", len(got), cut)
	}
	if got, _, cut := head("short", ""); got != "short" || cut {
		t.Fatal(got)
	}
}

func TestBackoff(t *testing.T) {
	r := &Runner{cfg: Config{Backoff: time.Second}}
	for n, want := range map[int]time.Duration{1: time.Second, 2: 2 * time.Second, 3: 4 * time.Second, 10: time.Minute} {
		if got := r.backoff(n); got != want {
			t.Errorf("backoff(%d) = %s, want %s", n, got, want)
		}
	}
}

// FuzzDecode: the decoder never panics, and what it accepts is within
// bounds.
func FuzzDecode(f *testing.F) {
	for _, s := range []string{
		`{"template_id":"tiny","commands":["echo hi"]}`,
		`{"snapshot_id":"a.b","commands":[{"command":"x","env":{"A":"b"}}],"files":[{"path":"/x","content_b64":"eA==","mode":"755"}],"snapshot":true}`,
		`{"job_id":"j","template_id":"t","commands":["x"],"snapshot":{"name":"n"},"keep_going":true,"timeout_s":5}`,
		`[]`, `null`, `{"commands":[null]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		j, err := Decode(data)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("error of another class: %v", err)
			}
			return
		}
		if (j.TemplateID == "") == (j.SnapshotID == "") || len(j.Commands) == 0 || len(j.Commands) > MaxCommands {
			t.Fatalf("accepted %+v", j)
		}
		total := 0
		for _, f := range j.Files {
			if !strings.HasPrefix(f.Path, "/") || len(f.data) > MaxFileBytes || f.mode < 0 || f.mode > 0o7777 {
				t.Fatalf("accepted file %+v", f)
			}
			total += len(f.data)
		}
		if total > MaxTotalFileBytes {
			t.Fatalf("accepted %d bytes of files", total)
		}
	})
}

func TestEncodeResultBounded(t *testing.T) {
	small := Result{JobID: "j", Commands: []CommandResult{{Command: "echo hi", Stdout: "hi\n"}}}
	data, err := encodeResult(small)
	if err != nil || !strings.Contains(string(data), `"stdout":"hi\n"`) {
		t.Fatalf("small result changed: %s, %v", data, err)
	}
	// Commands of '<' escape sixfold: 100 of them far exceed the bound.
	big := Result{JobID: "j"}
	for range MaxCommands {
		big.Commands = append(big.Commands, CommandResult{Command: strings.Repeat("<", MaxCommandBytes), Stdout: strings.Repeat("x", OutputHead)})
	}
	data, err = encodeResult(big)
	if err != nil {
		t.Fatal(err)
	}
	if len(data) > MaxResultBytes {
		t.Fatalf("result is %d bytes, want at most %d", len(data), MaxResultBytes)
	}
	var back Result
	if err := json.Unmarshal(data, &back); err != nil || len(back.Commands) != MaxCommands || !back.Commands[0].Truncated || back.Commands[0].Stdout != "" {
		t.Fatalf("shrunk result: %d commands, %+v, %v", len(back.Commands), back.Commands[0].Truncated, err)
	}
}
