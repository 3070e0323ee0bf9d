//go:build unix

package agent

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// hostileGuest answers the handshake on the guest end of a socket pair and
// then runs reply on every stream the host opens, with the request decoded.
// It stands for a guest whose agent was replaced by code that lies.
func hostileGuest(t *testing.T, reply func(st *yamux.Stream, req request)) *Client {
	t.Helper()
	host, guest := socketPair(t)
	go func() {
		// The hello line, byte by byte: nothing follows it before READY.
		var line []byte
		b := make([]byte, 1)
		for len(line) < 256 {
			if _, err := guest.Read(b); err != nil {
				return
			}
			if b[0] == '\n' {
				break
			}
			line = append(line, b[0])
		}
		nonce := strings.TrimPrefix(string(line), helloPrefix)
		if _, err := io.WriteString(guest, readyPrefix+nonce+"\n"); err != nil {
			return
		}
		sess, err := yamux.Server(guest, yamuxConfig())
		if err != nil {
			return
		}
		defer sess.Close()
		for {
			st, err := sess.AcceptStream()
			if err != nil {
				return
			}
			go func() {
				defer st.Close()
				_, payload, err := readFrame(st)
				if err != nil {
					return
				}
				var req request
				if json.Unmarshal(payload, &req) != nil {
					return
				}
				reply(st, req)
			}()
		}
	}()
	return connect(t, host)
}

// header writes a frame header that announces n payload bytes.
func header(w io.Writer, typ byte, n uint32) {
	var hdr [frameHeaderSize]byte
	hdr[0] = typ
	binary.BigEndian.PutUint32(hdr[1:], n)
	_, _ = w.Write(hdr[:])
}

func wantProtocol(t *testing.T, what string, err error) {
	t.Helper()
	if !errors.Is(err, errdefs.ErrProtocol) {
		t.Errorf("%s: %v, want a protocol error", what, err)
	}
}

func bctx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// TestOversizeFrameHeaders: a reply frame that announces more than its type
// may carry fails at once (the payload is never sent, nor allocated).
func TestOversizeFrameHeaders(t *testing.T) {
	for _, tt := range []struct {
		name string
		typ  byte
		n    uint32
		op   func(c *Client) error
	}{
		{"4 GiB OK", frameOK, 0xffffffff, func(c *Client) error { return c.Ping(bctx(t)) }},
		{"over MaxFramePayload", frameData, MaxFramePayload + 1, func(c *Client) error { _, err := c.ReadFile(bctx(t), "/x"); return err }},
		{"JSON error frame over the control bound", frameError, maxControlPayload + 1, func(c *Client) error { return c.Ping(bctx(t)) }},
		{"exit frame over the control bound", frameExit, maxControlPayload + 1, func(c *Client) error {
			_, err := c.Exec(bctx(t), ExecRequest{Command: "true"}, nil)
			return err
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := hostileGuest(t, func(st *yamux.Stream, _ request) { header(st, tt.typ, tt.n) })
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			err := tt.op(c)
			runtime.ReadMemStats(&after)
			wantProtocol(t, tt.name, err)
			if !errors.Is(err, ErrFrameTooLarge) {
				t.Errorf("%s: %v, want ErrFrameTooLarge", tt.name, err)
			}
			if d := after.TotalAlloc - before.TotalAlloc; d > 512<<10 {
				t.Errorf("%s: %d bytes allocated for a refused frame", tt.name, d)
			}
		})
	}
}

// TestReadFileBound: a guest that streams a file without end is cut off at
// the bound.
func TestReadFileBound(t *testing.T) {
	sent := make(chan int, 1)
	c := hostileGuest(t, func(st *yamux.Stream, _ request) {
		chunk := bytes.Repeat([]byte("x"), 256<<10)
		n := 0
		_ = st.SetWriteDeadline(time.Now().Add(5 * time.Second))
		for range 64 { // 16 MiB at most
			if writeFrame(st, frameData, chunk) != nil {
				break
			}
			n += len(chunk)
		}
		sent <- n
	})
	_, err := c.readFile(bctx(t), "/big", 1<<20)
	wantProtocol(t, "read of an endless file", err)
	if err == nil || !strings.Contains(err.Error(), "larger than 1048576 bytes") {
		t.Errorf("error %v does not say the bound", err)
	}
}

// TestRemoteErrorBound: a guest error's message is cut, its code kept to
// the known ones.
func TestRemoteErrorBound(t *testing.T) {
	c := hostileGuest(t, func(st *yamux.Stream, _ request) {
		_ = writeJSONFrame(st, frameError, RemoteError{Code: "made-up", Message: strings.Repeat("m", 60<<10)})
	})
	err := c.Ping(bctx(t))
	var re *RemoteError
	if !errors.As(err, &re) {
		t.Fatalf("Ping: %v, want a RemoteError", err)
	}
	if len(re.Message) > maxRemoteMessage+16 || re.Code != codeInternal {
		t.Errorf("remote error of %d bytes, code %q", len(re.Message), re.Code)
	}
	wantProtocol(t, "unknown code", err)
}

// TestDialAnswerBound: a dial answer without end, or with terminal control
// sequences, is a protocol error that carries only printable text.
func TestDialAnswerBound(t *testing.T) {
	c := hostileGuest(t, func(st *yamux.Stream, req request) {
		if req.Port == 1 {
			_ = st.SetWriteDeadline(time.Now().Add(5 * time.Second))
			_, _ = st.Write(bytes.Repeat([]byte("A"), 1<<20))
			return
		}
		_, _ = io.WriteString(st, "ERR port 2: connection refused \x1b[2J\x00\n")
	})
	_, err := c.DialGuest(bctx(t), 1)
	wantProtocol(t, "endless dial answer", err)
	if err == nil || len(err.Error()) > 2*maxDialAnswer {
		t.Errorf("endless dial answer: %d-byte error %.200q", len(err.Error()), err)
	}
	_, err = c.DialGuest(bctx(t), 2)
	wantProtocol(t, "refused dial", err)
	if !errors.Is(err, ErrRefused) || strings.ContainsAny(err.Error(), "\x1b\x00") {
		t.Errorf("refused dial: %q", err)
	}
}

// TestExitFrameBound: an exit frame whose signal name is not one is refused.
func TestExitFrameBound(t *testing.T) {
	c := hostileGuest(t, func(st *yamux.Stream, _ request) {
		_ = writeJSONFrame(st, frameExit, ExecResult{ExitCode: 1, Signal: strings.Repeat("s", 1000)})
	})
	res, err := c.Exec(bctx(t), ExecRequest{Command: "true"}, nil)
	wantProtocol(t, "long signal name", err)
	if res.Signal != "" {
		t.Errorf("signal of %d bytes passed on", len(res.Signal))
	}
}

func FuzzReadReply(f *testing.F) {
	var seed bytes.Buffer
	_ = writeFrame(&seed, frameData, []byte("abc"))
	_ = writeJSONFrame(&seed, frameError, RemoteError{Code: codeNotFound, Message: "no"})
	f.Add(seed.Bytes())
	seed.Reset()
	_ = writeFrame(&seed, frameOK, []byte(`{}`))
	f.Add(seed.Bytes())
	f.Add([]byte{'O', 0, 1, 0, 1})
	f.Add([]byte{'E', 0, 0, 0, 2, '{', '}'})
	f.Fuzz(func(t *testing.T, data []byte) {
		const max = 100
		total := 0
		payload, err := readReply(bytes.NewReader(data), func(b []byte) error {
			if len(b) > max-total {
				return protocolError("over %d", max)
			}
			total += len(b)
			return nil
		})
		if total > max {
			t.Fatalf("%d bytes of data accepted", total)
		}
		if err == nil && len(payload) > maxControlPayload {
			t.Fatalf("reply of %d bytes accepted", len(payload))
		}
		var re *RemoteError
		if errors.As(err, &re) {
			if len(re.Message) > maxRemoteMessage+len(" (cut)") {
				t.Fatalf("remote message of %d bytes", len(re.Message))
			}
			switch re.Code {
			case codeInvalid, codeNotFound, codeUnsupported, codeInternal:
			default:
				t.Fatalf("remote code %q", re.Code)
			}
		}
	})
}

func FuzzParseDialAnswer(f *testing.F) {
	f.Add([]byte("OK\n"))
	f.Add([]byte("ERR port 1: connection refused\n"))
	f.Add([]byte("ERR \x1b[2J\n"))
	f.Add([]byte("OK"))
	f.Fuzz(func(t *testing.T, line []byte) {
		err := parseDialAnswer(line, 80)
		if err == nil {
			if s := string(line); s != "OK\n" && s != "OK" {
				t.Fatalf("answer %q accepted", line)
			}
			return
		}
		if !errors.Is(err, errdefs.ErrProtocol) {
			t.Fatalf("error %v is not a protocol error", err)
		}
		for _, r := range err.Error() {
			if r < 0x20 || r == 0x7f {
				t.Fatalf("control character in %q", err)
			}
		}
		if len(err.Error()) > maxDialAnswer+128 {
			t.Fatalf("error of %d bytes", len(err.Error()))
		}
	})
}
