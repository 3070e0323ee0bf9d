package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/firkin-dev/firkin-worker/images"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/worker"
)

// benchSecret returns the worker secret both bench workers share (records
// one signs, the other must authenticate), kept in the state directory.
func benchSecret(stateDir string) (string, error) {
	path := filepath.Join(stateDir, "bench-secret")
	if data, err := os.ReadFile(path); err == nil && len(strings.TrimSpace(string(data))) >= 32 {
		return strings.TrimSpace(string(data)), nil
	}
	buf := make([]byte, 32)
	_, _ = rand.Read(buf)
	secret := hex.EncodeToString(buf)
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return "", err
	}
	return secret, os.WriteFile(path, []byte(secret+"\n"), 0o600)
}

// crossWorker is (l) and (m): a second worker joins the first's embedded
// server (its worker identities and secret, a state directory of its own);
// a continuation snapshot saved on the first is created on the second,
// create to first stdout: the first time with the fetch from the object
// store (right after the save, so the upload may still run), then from the
// second worker's cached copy.
func (b *bench) crossWorker(agent, accel, secret string) (first, cached Result, err error) {
	second := filepath.Join(b.stateDir, "second")
	_ = os.RemoveAll(second)
	// Workers that share snapshots run the same guest image (its base disk
	// is not shipped with them): the first worker's, already built.
	img, err := images.Build(b.ctx, images.Config{StateDir: b.stateDir, AgentBinary: agent, Logger: b.log})
	if err != nil {
		return first, cached, err
	}
	w2, err := worker.Start(b.ctx, worker.Config{
		Image:    &img,
		StateDir: second, NATSURL: b.w.NATSURL(),
		NATSNkey: filepath.Join(b.stateDir, worker.WorkerSeedFile), NATSServiceNkey: filepath.Join(b.stateDir, worker.ServiceSeedFile),
		TokenSecret: secret, ProxyListen: "127.0.0.1:0", AgentBinary: agent, Accel: accel,
		Pool: map[string]int{}, WaitTemplates: true, Logger: b.log,
	})
	if err != nil {
		return first, cached, fmt.Errorf("second worker: %w", err)
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_ = w2.Stop(sctx)
		_ = os.RemoveAll(second)
	}()
	var firstS, cachedS []float64
	onSecond := func(sid string) (time.Duration, error) {
		ctx, cancel := context.WithTimeout(b.ctx, 5*time.Minute)
		defer cancel()
		t0 := time.Now()
		sb, err := w2.Backend().Create(ctx, subjects.CreateSandboxRequest{SnapshotID: sid})
		if err != nil {
			return 0, err
		}
		defer func() { _, _ = w2.Backend().Kill(context.Background(), sb.SandboxID) }()
		r, err := b.c.Exec(ctx, sb.SandboxID, subjects.ExecRequest{Command: "cat /root/bench"})
		d := time.Since(t0)
		if err == nil && r.Stdout != "saved on the first worker\n" {
			err = fmt.Errorf("restored sandbox sees %q", r.Stdout)
		}
		return d, err
	}
	for i := range max(b.n/3, 2) {
		ctx, cancel := context.WithTimeout(b.ctx, 3*time.Minute)
		src, err := b.w.Backend().Create(ctx, subjects.CreateSandboxRequest{TemplateID: "tiny"})
		if err != nil {
			cancel()
			return first, cached, err
		}
		sid := fmt.Sprintf("bench-x-%d-%d", time.Now().UnixNano(), i)
		_, err = b.c.Exec(ctx, src.SandboxID, subjects.ExecRequest{Command: "echo saved on the first worker > /root/bench; sync"})
		if err == nil {
			_, err = b.c.Snapshot(ctx, src.SandboxID, subjects.SnapshotRequest{Name: sid, Stop: true})
		}
		cancel()
		if err != nil {
			return first, cached, err
		}
		d1, err1 := onSecond(sid)
		d2, err2 := onSecond(sid)
		_ = b.c.DeleteSnapshot(context.Background(), sid)
		if err := errors.Join(err1, err2); err != nil {
			return first, cached, err
		}
		firstS, cachedS = append(firstS, ms(d1)), append(cachedS, ms(d2))
	}
	return summarize("(l) cross-worker restore, first use (fetch) → first stdout", "ms", firstS, "", nil),
		summarize("(m) cross-worker restore, cached → first stdout", "ms", cachedS, "", nil), nil
}
