//go:build linux

package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// FuzzReattachState feeds Reattach any machine.json, as a worker finds it
// in a machine directory after a restart. The decode and the checks that
// come before any process is touched never panic, and refuse with
// ErrIntegrity (a malformed file, or one naming another directory or ids
// outside the machine ranges) or ErrNotFound (no such machine). Inputs
// that name a pid that exists are skipped: the fuzzer does not get to
// point the worker at a real process (one whose command line and start
// time it cannot know anyway).
func FuzzReattachState(f *testing.F) {
	for _, s := range []string{
		`{"id":"m1","dir":"DIR","pid":4194305,"start_time":1,"binary":"/usr/bin/qemu-system-x86_64","args":["-name","m1"]}`,
		`{"id":"m1","dir":"DIR/","pid":0}`,
		`{"id":"m1","dir":"/elsewhere","pid":4194305}`,
		`{"id":"m1","dir":"DIR","pid":4194305,"uid":5,"gid":5}`,
		`{"id":"m1","dir":"DIR","pid":-1,"cgroup":["/sys/fs/cgroup/x"]}`,
		`{"dir":"DIR/../DIR/.","pid":4194305,"config":{}}`,
		`{"pid":"1"}`, `[]`, ``,
	} {
		f.Add([]byte(s))
	}
	d := &Driver{log: slog.New(slog.DiscardHandler)}
	base := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		dir := filepath.Join(base, "m")
		if err := os.RemoveAll(dir); err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		// Seeds say DIR where they name the directory they are read from.
		data = []byte(strings.ReplaceAll(string(data), "DIR", dir))
		var st machineState
		if json.Unmarshal(data, &st) == nil && st.PID > 0 {
			if err := syscall.Kill(st.PID, 0); err == nil || errors.Is(err, syscall.EPERM) {
				return
			}
		}
		if err := os.WriteFile(filepath.Join(dir, stateFile), data, 0o600); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		m, err := d.Reattach(ctx, dir)
		if err == nil {
			t.Fatalf("reattached %q", data)
		}
		if m != nil || (!errors.Is(err, errdefs.ErrIntegrity) && !errors.Is(err, errdefs.ErrNotFound)) {
			t.Fatalf("Reattach(%q): %v, want an integrity or not-found error", data, err)
		}
	})
}
