package backend

import (
	"bytes"
	"errors"
	"strconv"
	"sync"
	"testing"

	"github.com/firkin-dev/firkin-worker/subjects"
)

// liveRecorder records live messages; subjects in fail refuse them.
type liveRecorder struct {
	mu   sync.Mutex
	msgs []liveMsg
	fail map[string]bool
}

type liveMsg struct {
	subject string
	hdr     map[string][]string
	data    []byte
}

func (l *liveRecorder) PublishLive(subject string, hdr map[string][]string, data []byte) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.fail[subject] {
		return errors.New("refused")
	}
	l.msgs = append(l.msgs, liveMsg{subject, hdr, bytes.Clone(data)})
	return nil
}

func TestPublishLive(t *testing.T) {
	rec := &liveRecorder{fail: map[string]bool{"_INBOX.gone": true}}
	b := &Backend{cfg: Config{Live: rec}}
	p := &proc{id: "k1234567890a", live: []*liveTarget{{subject: "firkin.proc.sb.k1234567890a.out"}, {subject: "_INBOX.gone"}}}
	big := bytes.Repeat([]byte("x"), subjects.MaxLiveChunk*2+10)
	b.publishLive(p, "stdout", []byte("hello"))
	b.publishLive(p, "stderr", big)
	b.publishLive(p, subjects.ProcStreamExit, []byte(`{"exit_code":0}`))
	if len(rec.msgs) != 5 {
		t.Fatalf("%d messages, want 5 (1 + 3 chunks + exit)", len(rec.msgs))
	}
	var got []byte
	for i, m := range rec.msgs {
		if m.subject != "firkin.proc.sb.k1234567890a.out" || m.hdr[subjects.ProcSeqHeader][0] != strconv.Itoa(i+1) ||
			m.hdr[subjects.ProcCommandHeader][0] != "k1234567890a" || len(m.data) > subjects.MaxLiveChunk {
			t.Fatalf("message %d: %s %v (%d bytes)", i, m.subject, m.hdr, len(m.data))
		}
		if m.hdr[subjects.ProcStreamHeader][0] == "stderr" {
			got = append(got, m.data...)
		}
	}
	if !bytes.Equal(got, big) {
		t.Fatalf("stderr chunks carry %d bytes, want %d", len(got), len(big))
	}
	if rec.msgs[4].hdr[subjects.ProcStreamHeader][0] != subjects.ProcStreamExit {
		t.Fatalf("last message %v", rec.msgs[4].hdr)
	}
	// The refused subject's messages are counted, and its numbering goes on.
	if p.unsent != int64(5+len(big)+len(`{"exit_code":0}`)) || p.live[1].seq != 5 {
		t.Fatalf("unsent %d, seq %d", p.unsent, p.live[1].seq)
	}
	// Without a publisher nothing happens.
	(&Backend{}).publishLive(p, "stdout", []byte("x"))
}

func TestCutInfo(t *testing.T) {
	if got := cutInfo("héllo", 2); got != "h…" {
		t.Errorf("cutInfo cut a rune: %q", got)
	}
	if got := cutInfo("abc", 3); got != "abc" {
		t.Errorf("cutInfo(abc, 3) = %q", got)
	}
	args := make([]string, 40)
	for i := range args {
		args[i] = string(bytes.Repeat([]byte("a"), 300))
	}
	got := cutArgs(args)
	if len(got) != maxInfoArgs+1 || len(got[0]) > maxInfoArg+len("…") || got[maxInfoArgs] != "…" {
		t.Errorf("cutArgs: %d args, first %d bytes", len(got), len(got[0]))
	}
}
