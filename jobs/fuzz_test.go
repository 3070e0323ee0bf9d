package jobs

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"regexp"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// FuzzJobRoundTrip: a job Decode accepts encodes to JSON that Decode
// accepts again, to the same encoding and the same file contents and modes
// (what a worker that dead-letters or re-publishes a job sends is the job).
func FuzzJobRoundTrip(f *testing.F) {
	for _, s := range []string{
		`{"template_id":"tiny","commands":["echo hi"]}`,
		`{"snapshot_id":"a.b","commands":[{"command":"x","env":{"A":"b"},"cwd":"/w","user":"u","stdin":"in","timeout_ms":9}],"files":[{"path":"/x","content_b64":"eA==","mode":"0755"},{"path":"/y","content":"y"}],"snapshot":true}`,
		`{"job_id":"j","template_id":"t","commands":["x"],"snapshot":{"name":"n"},"keep_going":true,"timeout_s":5,"env":{"K":"v"},"resources":{"vcpus":1}}`,
		`{"template_id":"t","commands":[" x "],"files":[{"path":"/a","content_b64":""}]}`,
		`{"template_id":"t","commands":["x"],"snapshot":{}}`,
		`{"template_id":"t","commands":["x"],"snapshot":false}`,
		`{"template_id":"t","commands":["\u00e9\ud800"]}`,
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
		enc, err := json.Marshal(j)
		if err != nil {
			t.Fatalf("accepted %q does not encode: %v", data, err)
		}
		k, err := Decode(enc)
		if err != nil {
			t.Fatalf("accepted %q, its encoding %s is refused: %v", data, enc, err)
		}
		again, _ := json.Marshal(k)
		if !bytes.Equal(enc, again) {
			t.Fatalf("%q encodes to %s, then to %s", data, enc, again)
		}
		for i := range j.Files {
			if !bytes.Equal(j.Files[i].data, k.Files[i].data) || j.Files[i].mode != k.Files[i].mode {
				t.Fatalf("file %d changed in the round trip: %+v, %+v", i, j.Files[i], k.Files[i])
			}
		}
		for _, c := range j.Commands {
			if c.Command == "" || strings.ContainsRune(c.Command, 0) {
				t.Fatalf("accepted command %q", c.Command)
			}
		}
	})
}

var kvKey = regexp.MustCompile(`^[-/_=\.a-zA-Z0-9]+$`)

// FuzzValidateJobIDQueue: an accepted job id is one subject token and a KV
// key of its own (never "cancel.<x>", the cancel markers' keys, as it has no
// dot) and builds a result subject of exactly one more token; an accepted
// queue is one token and none of the reserved ones, and its queue, dead
// letter and consumer names are valid.
func FuzzValidateJobIDQueue(f *testing.F) {
	for _, s := range []string{"j1", "A_b-9", strings.Repeat("x", 128), strings.Repeat("x", 129), "a.b", "cancel.x", "status",
		"dead", "q", "-q", "Q", "a b", "a*", "a>", "", "é"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if err := ValidateJobID(s); err == nil {
			if len(s) > 128 || strings.ContainsAny(s, ".*> \t\r\n\x00/") || !kvKey.MatchString(s) || strings.HasPrefix(s, "cancel.") {
				t.Fatalf("job id %q accepted", s)
			}
			subj := resultSubject(subjects.Default, s)
			if strings.Count(subj, ".") != strings.Count(resultSubject(subjects.Default, "x"), ".") {
				t.Fatalf("result subject %q of job %q has extra tokens", subj, s)
			}
		} else if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Fatalf("job id %q: unclassified error %v", s, err)
		}
		if err := ValidateQueue(s); err == nil {
			if len(s) > 32 || strings.ContainsAny(s, ".*> \t\r\n\x00/") || reservedQueues[s] || strings.ToLower(s) != s {
				t.Fatalf("queue %q accepted", s)
			}
			for _, subj := range []string{queueSubject(subjects.Default, s), deadSubject(subjects.Default, s)} {
				if !strings.HasSuffix(subj, "."+s) || strings.Count(subj, ".") > 3 {
					t.Fatalf("queue %q: subject %q", s, subj)
				}
			}
			if !kvKey.MatchString(ConsumerName(s)) {
				t.Fatalf("queue %q: consumer name %q", s, ConsumerName(s))
			}
		} else if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Fatalf("queue %q: unclassified error %v", s, err)
		}
	})
}

// FuzzResultBounds builds the largest results a job can have, n commands
// of text (repeated to the command bound) with outputs cut by head, and
// checks that encodeResult keeps every one under MaxResultBytes and
// decodable, whatever the bytes (the worst escape sixfold in JSON); and
// that head keeps at most OutputHead bytes of the output's start, valid
// UTF-8 text staying valid.
func FuzzResultBounds(f *testing.F) {
	f.Add([]byte("echo hi"), []byte("hi\n"), uint8(1), false)
	f.Add([]byte("<"), []byte("<>&\u2028"), uint8(100), false)
	f.Add([]byte("\xff"), []byte("\xff\xfe"), uint8(100), true)
	f.Add([]byte("\x00"), []byte("é"), uint8(255), false)
	f.Fuzz(func(t *testing.T, unit, out []byte, n uint8, b64 bool) {
		if len(unit) == 0 {
			return
		}
		text := strings.Repeat(string(unit), MaxCommandBytes/len(unit)+1)[:MaxCommandBytes]
		output := strings.Repeat(string(out)+"x", OutputHead/(len(out)+1)+2)
		var o, o64 string
		if b64 {
			o64 = base64.StdEncoding.EncodeToString([]byte(output))
		} else {
			o = output
		}
		hs, h64, truncated := head(o, o64)
		if !truncated || len(hs) > OutputHead || !strings.HasPrefix(output, hs) {
			t.Fatalf("head kept %d bytes of text (truncated %v)", len(hs), truncated)
		}
		if utf8.ValidString(output) && !utf8.ValidString(hs) {
			t.Fatalf("head cut valid text into invalid UTF-8")
		}
		if raw, err := base64.StdEncoding.DecodeString(h64); err != nil || len(raw) > OutputHead || !strings.HasPrefix(output, string(raw)) {
			t.Fatalf("head kept %d bytes of base64 output: %v", len(raw), err)
		}
		res := Result{JobID: strings.Repeat("j", 128), Queue: "default", Status: "failed", Error: text, WorkerID: "w1"}
		for range min(int(n), MaxCommands) {
			res.Commands = append(res.Commands, CommandResult{Command: text, Stdout: hs, StdoutB64: h64, Stderr: hs, StderrB64: h64, Error: text, CommandID: "c1"})
		}
		data, err := encodeResult(res)
		if err != nil {
			t.Fatal(err)
		}
		if len(data) > MaxResultBytes {
			t.Fatalf("result of %d commands encodes to %d bytes", len(res.Commands), len(data))
		}
		var back Result
		if err := json.Unmarshal(data, &back); err != nil || len(back.Commands) != len(res.Commands) || back.JobID != res.JobID {
			t.Fatalf("encoded result does not decode to its commands: %v", err)
		}
	})
}
