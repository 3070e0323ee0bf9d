package qmp

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// FuzzStream plays a QEMU that sends greeting as its greeting, accepts
// the capabilities and answers the next command with reply, then hangs up.
// The client never panics or hangs: Connect and Run end within their
// deadline with a classified error or a result, the reader delivers only
// named events, at most EventBuffer of them, and closes Events and Done.
func FuzzStream(f *testing.F) {
	f.Add([]byte(greeting), []byte(`{"return": {"status": "running", "running": true}, "id": "c2"}`+"\n"))
	f.Add([]byte(greeting), []byte(`{"error": {"class": "DeviceNotFound", "desc": "no"}, "id": "c2"}`+"\n"))
	f.Add([]byte(greeting), []byte(`{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}`+"\n"+`{"return": 7, "id": "c2"}`+"\n"))
	f.Add([]byte(greeting), []byte(`{"return": {}, "id": "c9"}`+"\n"+`{"event": ""}`+"\n"+`not json`+"\n"))
	f.Add([]byte(greeting), []byte(`{"return": {}, "id": "c2"`))
	f.Add([]byte(`{"QMP": {"version": {"qemu": {"major": 0}}}}`+"\n"), []byte{})
	f.Add([]byte(`{"QMP": 1}`+"\n"), []byte{})
	f.Add([]byte(greeting[:20]), []byte{})
	// QEMU answers the capabilities early, then sends garbage: the reader
	// closes the connection before the next command is written.
	f.Add([]byte(greeting+`{"return": {}, "id": "c1"}`+"\n"+`not json`+"\n"), []byte{})
	f.Fuzz(func(t *testing.T, greet, reply []byte) {
		a, b := socketpair(t)
		go func() {
			defer b.Close()
			if _, err := b.Write(greet); err != nil || !bytes.Contains(greet, []byte("\n")) {
				return // a greeting cut short: QEMU died
			}
			r := bufio.NewReader(b)
			for n := 0; ; n++ {
				if _, err := r.ReadBytes('\n'); err != nil {
					return
				}
				if n == 0 {
					if _, err := b.Write([]byte(`{"return": {}, "id": "c1"}` + "\n")); err != nil {
						return
					}
					continue
				}
				_, _ = b.Write(reply)
				return
			}
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		start := time.Now()
		c, err := Connect(ctx, a)
		if err != nil {
			var qe *Error
			if !errors.Is(err, errdefs.ErrProtocol) && !errors.Is(err, ErrClosed) && !errors.As(err, &qe) {
				t.Fatalf("Connect: unclassified error %v", err)
			}
			if time.Since(start) > 5*time.Second {
				t.Fatalf("Connect took %v", time.Since(start))
			}
			return
		}
		defer c.Close()
		if c.Greeting().QMP.Version.QEMU.Major == 0 {
			t.Fatalf("connected on a greeting without a version: %q", greet)
		}
		var status struct {
			Status  string `json:"status"`
			Running bool   `json:"running"`
		}
		err = c.Run(ctx, "query-status", nil, &status)
		if ctx.Err() != nil {
			t.Fatalf("Run hung on reply %q", reply)
		}
		var qe *Error
		if err != nil && !errors.Is(err, errdefs.ErrProtocol) && !errors.Is(err, ErrClosed) && !errors.As(err, &qe) {
			t.Fatalf("Run: unclassified error %v", err)
		}
		select {
		case <-c.Done():
		case <-time.After(5 * time.Second):
			t.Fatalf("the reader did not end after QEMU hung up (reply %q)", reply)
		}
		n := 0
		for ev := range c.Events() {
			if ev.Name == "" {
				t.Fatalf("event without a name delivered: %+v", ev)
			}
			n++
		}
		if n > EventBuffer {
			t.Fatalf("%d events buffered", n)
		}
		if _, err := c.Execute(ctx, "cont", nil); !errors.Is(err, ErrClosed) {
			t.Fatalf("Execute after the end: %v", err)
		}
	})
}
