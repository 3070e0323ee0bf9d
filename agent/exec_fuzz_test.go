//go:build unix

package agent

import (
	"bytes"
	"errors"
	"sync"
	"testing"

	"github.com/hashicorp/yamux"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// FuzzExecStream plays a guest that answers an exec with the bytes of
// stream (frames or garbage) and ends the stream. The host's Exec never
// panics or hangs; output it passes on is at most what the guest sent, in
// chunks of at most MaxFramePayload; a result comes only with a signal
// name of at most maxSignalName bytes; an error is a protocol error or the
// guest's error with a known code and a bounded message.
func FuzzExecStream(f *testing.F) {
	frames := func(fs ...func(*bytes.Buffer)) []byte {
		var b bytes.Buffer
		for _, fn := range fs {
			fn(&b)
		}
		return b.Bytes()
	}
	raw := func(typ byte, p string) func(*bytes.Buffer) {
		return func(b *bytes.Buffer) { _ = writeFrame(b, typ, []byte(p)) }
	}
	f.Add(frames(raw(frameStarted, `{"pid":42}`), raw(frameStdout, "hi\n"), raw(frameStderr, "err"), raw(frameExit, `{"exit_code":0}`)))
	f.Add(frames(raw(frameStarted, `{"pid":"x"}`), raw(frameExit, `{"exit_code":137,"signal":"KILL","timed_out":true}`)))
	f.Add(frames(raw(frameExit, `{"exit_code":1,"signal":"`+string(bytes.Repeat([]byte("s"), 40))+`"}`)))
	f.Add(frames(raw(frameError, `{"code":"weird","message":"no"}`)))
	f.Add(frames(raw(frameOK, ``)))
	f.Add(frames(raw(frameStdout, "partial")))
	f.Add(frames(raw(frameExit, `{"exit_code":`)))
	f.Add([]byte{frameStdout, 0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{frameExit, 0, 1, 0, 1})
	f.Fuzz(func(t *testing.T, stream []byte) {
		c := hostileGuest(t, func(st *yamux.Stream, _ request) { _, _ = st.Write(stream) })
		var mu sync.Mutex
		total := 0
		res, err := c.Exec(bctx(t), ExecRequest{Command: "true"}, func(_ Stream, b []byte) {
			mu.Lock()
			defer mu.Unlock()
			if len(b) > MaxFramePayload {
				t.Errorf("output chunk of %d bytes", len(b))
			}
			total += len(b)
		})
		mu.Lock()
		defer mu.Unlock()
		if total > len(stream) {
			t.Fatalf("%d bytes of output from a stream of %d", total, len(stream))
		}
		if len(res.Signal) > maxSignalName {
			t.Fatalf("signal name of %d bytes passed on", len(res.Signal))
		}
		if err == nil {
			if !bytes.Contains(stream, []byte{frameExit}) {
				t.Fatalf("a result without an exit frame: %+v", res)
			}
			return
		}
		if errors.Is(err, errdefs.ErrTimeout) {
			t.Fatalf("Exec hung on %q: %v", stream, err)
		}
		var re *RemoteError
		if errors.As(err, &re) {
			switch re.Code {
			case codeInvalid, codeNotFound, codeUnsupported, codeInternal:
			default:
				t.Fatalf("remote code %q passed on", re.Code)
			}
			if len(re.Message) > maxRemoteMessage+len(" (cut)") {
				t.Fatalf("remote message of %d bytes", len(re.Message))
			}
			return
		}
		if !errors.Is(err, errdefs.ErrProtocol) {
			t.Fatalf("unclassified error %v", err)
		}
	})
}
