package agent

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

func FuzzReadFrame(f *testing.F) {
	var seed bytes.Buffer
	_ = writeFrame(&seed, frameRequest, []byte(`{"op":"ping"}`))
	_ = writeFrame(&seed, frameStdout, []byte("hello\n"))
	_ = writeFrame(&seed, frameEOF, nil)
	f.Add(seed.Bytes())
	f.Add([]byte{})
	f.Add([]byte{'R', 0, 0, 0})
	f.Add([]byte{'R', 0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{'D', 0, 0x10, 0, 1, 'x'})
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		consumed := 0
		for {
			typ, payload, err := readFrame(r)
			if err != nil {
				if errors.Is(err, io.EOF) && consumed != len(data) {
					t.Fatalf("clean EOF after %d of %d bytes", consumed, len(data))
				}
				return
			}
			if len(payload) > MaxFramePayload {
				t.Fatalf("payload of %d bytes accepted", len(payload))
			}
			// Re-encoding gives back the bytes just read.
			var buf bytes.Buffer
			if err := writeFrame(&buf, typ, payload); err != nil {
				t.Fatalf("re-encode: %v", err)
			}
			n := buf.Len()
			if !bytes.Equal(buf.Bytes(), data[consumed:consumed+n]) {
				t.Fatalf("re-encoded frame differs")
			}
			consumed += n
		}
	})
}

func FuzzFindHandshake(f *testing.F) {
	f.Add([]byte("FIRKIN/1 HELLO abc\n"))
	f.Add([]byte("garbage\x00FIRKIN/1 HELLO abc\nrest"))
	f.Add([]byte("FIRKIN/1 HELLO bad nonce\nFIRKIN/1 HELLO good\n"))
	f.Add([]byte("FIRKIN/1 HEL"))
	f.Add([]byte("FIRKIN/1 HELLO FIRKIN/1 HELLO x\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		nonce, rest, keep, ok := findHandshake(data, helloPrefix)
		if !ok {
			if keep < 0 || keep > len(data) {
				t.Fatalf("keep %d of %d", keep, len(data))
			}
			if keep > len(helloPrefix)+maxNonce {
				t.Fatalf("keeps %d bytes", keep)
			}
			// Whatever is dropped cannot hold a complete hello: appending a
			// newline to the kept tail finds what the whole would.
			return
		}
		if !validNonce([]byte(nonce)) {
			t.Fatalf("invalid nonce %q accepted", nonce)
		}
		line := helloPrefix + nonce + "\n"
		end := len(data) - len(rest)
		if end < len(line) || string(data[end-len(line):end]) != line {
			t.Fatalf("rest does not follow the hello line")
		}
		if _, _, _, again := findHandshake(rest, helloPrefix); again {
			t.Fatalf("a later hello was left in rest")
		}
	})
}

func TestFindHandshake(t *testing.T) {
	tests := []struct {
		in    string
		nonce string
		rest  string
		ok    bool
	}{
		{"FIRKIN/1 HELLO abc\n", "abc", "", true},
		{"xx\x00FIRKIN/1 HELLO abc\nyamux", "abc", "yamux", true},
		{"FIRKIN/1 HELLO a b\n", "", "", false},
		{"FIRKIN/1 HELLO old\nFIRKIN/1 HELLO new\nz", "new", "z", true},
		{"FIRKIN/1 HELFIRKIN/1 HELLO n1\n", "n1", "", true},
		{"FIRKIN/1 HELLO abc", "", "", false},
	}
	for _, tt := range tests {
		nonce, rest, _, ok := findHandshake([]byte(tt.in), helloPrefix)
		if ok != tt.ok || nonce != tt.nonce || string(rest) != tt.rest {
			t.Errorf("findHandshake(%q) = %q, %q, %v; want %q, %q, %v", tt.in, nonce, rest, ok, tt.nonce, tt.rest, tt.ok)
		}
	}
}

func TestReadFrameFrom(t *testing.T) {
	buf := make([]byte, frameHeaderSize+4)
	frame, n, err := readFrameFrom(bytes.NewReader([]byte("abcdefgh")), frameStdout, buf)
	if err != nil || n != 4 {
		t.Fatalf("readFrameFrom: %d %v", n, err)
	}
	typ, payload, err := readFrame(bytes.NewReader(frame))
	if err != nil || typ != frameStdout || string(payload) != "abcd" {
		t.Fatalf("round trip: %q %q %v", typ, payload, err)
	}
}
