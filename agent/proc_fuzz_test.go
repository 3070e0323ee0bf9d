//go:build unix

package agent

import (
	"bytes"
	"errors"
	"testing"

	"github.com/hashicorp/yamux"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// FuzzProcStreams plays a guest that answers proc_wait, proc_list,
// proc_start and proc_stdin with the bytes of stream. The host never
// panics or hangs, passes on no more output than the guest sent, and keeps
// its bounds: signal names, list entries (valid ids, bounded fields, at
// most MaxProcs), a positive pid, a written count within what it sent; its
// errors are protocol errors or the guest's with a known code.
func FuzzProcStreams(f *testing.F) {
	frame := func(typ byte, p string) []byte {
		var b bytes.Buffer
		_ = writeFrame(&b, typ, []byte(p))
		return b.Bytes()
	}
	cat := func(bs ...[]byte) []byte { return bytes.Join(bs, nil) }
	f.Add(cat(frame(frameStarted, `{"pid":7}`), frame(frameStdout, "out"), frame(frameExit, `{"exit_code":143,"signal":"terminated"}`)))
	f.Add(cat(frame(frameData, `{"id":"k1234567890a","pid":3,"command":"sh","started_at":"2026-11-30T00:00:00Z","running":true}`), frame(frameOK, ``)))
	f.Add(cat(frame(frameData, `{"id":"../x","pid":3}`), frame(frameOK, ``)))
	f.Add(cat(frame(frameOK, `{"pid":-1}`)))
	f.Add(cat(frame(frameOK, `{"written":99999}`)))
	f.Add(cat(frame(frameError, `{"code":"not_found","message":"no process"}`)))
	f.Add([]byte{frameData, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, stream []byte) {
		c := hostileGuest(t, func(st *yamux.Stream, _ request) { _, _ = st.Write(stream) })
		total := 0
		res, err := c.ProcWait(bctx(t), "k1234567890a", func(_ Stream, b []byte) { total += len(b) })
		if total > len(stream) {
			t.Fatalf("%d bytes of output from a stream of %d", total, len(stream))
		}
		if len(res.Signal) > maxSignalName {
			t.Fatalf("signal name of %d bytes passed on", len(res.Signal))
		}
		checkErr(t, "proc_wait", err)
		list, err := c.ProcList(bctx(t))
		if len(list) > MaxProcs {
			t.Fatalf("%d processes listed", len(list))
		}
		for _, pi := range list {
			if !validProcID(pi.ID) || len(pi.Command) > maxProcInfoField || len(pi.Tag) > maxProcInfoField {
				t.Fatalf("entry out of bounds passed on: %+v", pi)
			}
		}
		checkErr(t, "proc_list", err)
		pid, err := c.ProcStart(bctx(t), ProcStartRequest{ID: "k1234567890a", Command: "true"})
		if err == nil && pid <= 0 {
			t.Fatalf("pid %d accepted", pid)
		}
		checkErr(t, "proc_start", err)
		n, err := c.ProcStdin(bctx(t), "k1234567890a", []byte("abc"), false)
		if err == nil && (n < 0 || n > 3) {
			t.Fatalf("written %d of 3", n)
		}
		checkErr(t, "proc_stdin", err)
	})
}

func checkErr(t *testing.T, what string, err error) {
	t.Helper()
	if err == nil {
		return
	}
	if errors.Is(err, errdefs.ErrTimeout) {
		t.Fatalf("%s hung: %v", what, err)
	}
	var re *RemoteError
	if errors.As(err, &re) {
		switch re.Code {
		case codeInvalid, codeNotFound, codeUnsupported, codeInternal:
		default:
			t.Fatalf("%s: remote code %q passed on", what, re.Code)
		}
		return
	}
	if !errors.Is(err, errdefs.ErrProtocol) {
		t.Fatalf("%s: unclassified error %v", what, err)
	}
}
