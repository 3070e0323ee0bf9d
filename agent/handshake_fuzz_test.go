package agent

import (
	"bufio"
	"bytes"
	"net"
	"strings"
	"testing"
	"time"
)

// FuzzHostHandshake plays a guest that answers the host's hello with any
// bytes (console noise, forged ready lines), then, unless noReady, the ready
// line of the hello's nonce, then more bytes, in writes of chunk bytes. The
// host's handshake never completes without the real ready line (the nonce
// is fresh, so the fuzzer cannot forge it), and when it completes it hands
// on exactly a prefix of what followed that line.
func FuzzHostHandshake(f *testing.F) {
	f.Add([]byte(""), []byte(""), uint8(0), false)
	f.Add([]byte("boot noise\nFIRKIN/1 READY x\nFIRKIN/1 READY "), []byte("\x00\x00yamux"), uint8(3), false)
	f.Add([]byte("FIRKIN/1 READY FIRKIN/1 READY "), []byte("rest"), uint8(1), false)
	f.Add([]byte("FIRKIN/1 READY abc\n"), []byte(""), uint8(7), true)
	f.Add(bytes.Repeat([]byte("x"), 5000), []byte("y"), uint8(255), false)
	f.Fuzz(func(t *testing.T, pre, post []byte, chunk uint8, noReady bool) {
		host, guest := net.Pipe()
		t.Cleanup(func() { host.Close(); guest.Close() })
		_ = host.SetDeadline(time.Now().Add(10 * time.Second))
		go func() {
			defer guest.Close()
			line, err := bufio.NewReader(guest).ReadString('\n')
			if err != nil {
				return
			}
			nonce := strings.TrimSuffix(strings.TrimPrefix(line, helloPrefix), "\n")
			stream := append([]byte(nil), pre...)
			if !noReady {
				stream = append(stream, readyPrefix+nonce+"\n"...)
			}
			stream = append(stream, post...)
			n := max(1, int(chunk))
			for len(stream) > 0 {
				k := min(n, len(stream))
				if _, err := guest.Write(stream[:k]); err != nil {
					return
				}
				stream = stream[k:]
			}
		}()
		nonce, err := newNonce()
		if err != nil {
			t.Fatal(err)
		}
		pending, err := handshake(host, nonce)
		if noReady {
			if err == nil {
				t.Fatalf("handshake completed without the ready line (noise %q)", pre)
			}
			return
		}
		if err != nil {
			t.Fatalf("handshake failed: %v (noise %q)", err, pre)
		}
		if !bytes.HasPrefix(post, pending) {
			t.Fatalf("handed on %q, which is not a prefix of %q", pending, post)
		}
	})
}
