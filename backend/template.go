package backend

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"

	"github.com/firkin-dev/firkin-worker/agent"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// templates is this worker's registry of template snapshots: template id →
// the record of the snapshot it restores from. Snapshot files are local to
// the worker that saved them, so the registry is kept in the state directory
// (the KV bucket holds the same records for the cluster to see).
type templates struct {
	dir string
	mu  sync.Mutex
	m   map[string]subjects.SnapshotRecord
	// building serialises builds of one template id.
	building map[string]*sync.Mutex
}

// loadTemplates reads the registry kept in dir. A record that verify refuses
// (unsigned, forged, or not the file's template) is left out and logged; a
// built-in template is then rebuilt at start.
func loadTemplates(dir string, verify func(sid string, rec subjects.SnapshotRecord) error, log *slog.Logger) (*templates, error) {
	t := &templates{dir: dir, m: map[string]subjects.SnapshotRecord{}, building: map[string]*sync.Mutex{}}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("templates dir: %w", err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("templates dir: %w", err)
	}
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			return nil, err
		}
		var rec subjects.SnapshotRecord
		if err := json.Unmarshal(data, &rec); err != nil {
			continue // a torn write; the template is rebuilt
		}
		id := strings.TrimSuffix(e.Name(), ".json")
		if err := verify(id, rec); err != nil {
			log.Warn("template record refused; the template must be rebuilt", "template", id, "err", err)
			continue
		}
		if rec.TemplateID != id {
			log.Warn("template record refused: it names another template", "template", id)
			continue
		}
		t.m[id] = rec
	}
	return t, nil
}

func (t *templates) get(id string) (subjects.SnapshotRecord, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	rec, ok := t.m[id]
	return rec, ok
}

// put records id's new snapshot and returns the one it replaces, if any.
func (t *templates) put(id string, rec subjects.SnapshotRecord) (subjects.SnapshotRecord, bool, error) {
	data, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return subjects.SnapshotRecord{}, false, err
	}
	// Under the lock: a build and the watch of the snapshots bucket put
	// the same template at once.
	t.mu.Lock()
	defer t.mu.Unlock()
	tmp := filepath.Join(t.dir, id+".json.tmp")
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return subjects.SnapshotRecord{}, false, err
	}
	if err := os.Rename(tmp, filepath.Join(t.dir, id+".json")); err != nil {
		return subjects.SnapshotRecord{}, false, err
	}
	old, had := t.m[id]
	t.m[id] = rec
	return old, had, nil
}

// ids returns the template ids in the registry.
func (t *templates) ids() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]string, 0, len(t.m))
	for id := range t.m {
		out = append(out, id)
	}
	return out
}

func (t *templates) remove(id string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.m, id)
	_ = os.Remove(filepath.Join(t.dir, id+".json"))
}

func (t *templates) lock(id string) func() {
	t.mu.Lock()
	mu, ok := t.building[id]
	if !ok {
		mu = &sync.Mutex{}
		t.building[id] = mu
	}
	t.mu.Unlock()
	mu.Lock()
	return mu.Unlock
}

// EnsureBuiltinTemplates turns every built-in image template that has no
// usable template snapshot yet into one (boot, init, save), so that creates
// restore instead of cold-booting. A template snapshot in the cluster's
// snapshots bucket (the registry follows it, see Start), made by this
// driver, is used when it restores here — fetched from the artifact store
// when another worker made it — so workers that start together do not
// rebuild and overwrite each other's; only a missing or unrestorable one is
// built. Another worker's template that this host cannot run (unsupported:
// another build of the guest image, another accelerator) is not replaced:
// the worker reports it and goes without.
func (b *Backend) EnsureBuiltinTemplates(ctx context.Context) error {
	var errs []error
	for id := range b.cfg.Images {
		if rec, ok := b.templates.get(id); ok && rec.Driver == b.cfg.Driver.Name() {
			why, err := b.templateOutdated(ctx, rec, b.cfg.Images[id])
			switch {
			case err == nil && why == "":
				continue
			case err == nil && rec.WorkerID != b.cfg.WorkerID:
				// Rebuilding would replace the cluster's template for every
				// worker, and a worker of the other version would replace
				// it back: the worker that made it rebuilds it.
				b.log.Warn("the cluster's built-in template is outdated for this worker; used as it is", "template", id, "saved_by", rec.WorkerID, "reason", why)
				continue
			case err == nil:
				b.log.Info("built-in template snapshot is outdated; rebuilding it", "template", id, "reason", why)
			case rec.WorkerID != b.cfg.WorkerID && errors.Is(err, errdefs.ErrUnsupported):
				// Another worker's template this host cannot run (another
				// build of the guest image, another accelerator): rebuilding
				// would replace it for the whole cluster.
				errs = append(errs, fmt.Errorf("template %s: the cluster's template snapshot (saved by worker %s) does not run on this worker, and is not replaced: give the workers the same guest image and accelerator: %w", id, rec.WorkerID, err))
				continue
			default:
				b.log.Warn("built-in template snapshot cannot be restored; rebuilding it", "template", id, "err", err)
			}
		}
		if _, err := b.BuildTemplate(ctx, subjects.BuildTemplateRequest{TemplateID: id, From: id, Replace: true}); err != nil {
			errs = append(errs, fmt.Errorf("template %s: %w", id, err))
		}
	}
	return errors.Join(errs...)
}

// templateOutdated says why the built-in template snapshot rec is outdated
// ("" when it is not), or that it does not restore (the error). A snapshot
// resumes the agent it was saved with and keeps the kernel arguments its
// guest booted with: one saved from other guest image files than img, or
// whose guest booted with other arguments than the driver's, is outdated.
// The image is compared first, which needs no restore.
func (b *Backend) templateOutdated(ctx context.Context, rec subjects.SnapshotRecord, img vmpool.Image) (string, error) {
	changed, err := imageChanged(rec, img)
	switch {
	case err != nil:
		// The snapshot has boot files of its own: try it.
		b.log.Warn("built-in template: cannot compare with the guest image", "template", rec.SnapshotID, "err", err)
	case changed:
		return "saved from another guest image (kernel or agent)", nil
	}
	return b.tryRestore(ctx, rec)
}

// primeWarmShells runs a command that has the agent start its warm shells
// (a command line runs in a login shell started ahead) before it answers,
// so that the snapshot has them and the first command of every machine
// restored from it skips a shell's start. Best effort: without them the
// first command starts its own shell.
func primeWarmShells(ctx context.Context, m vmpool.Machine) {
	_, _ = m.Exec(ctx, agent.ExecRequest{Command: "true", Timeout: 10 * time.Second, WarmShells: true}, func(agent.Stream, []byte) {})
}

// imageChanged says whether the template snapshot rec was saved from other
// guest image files (kernel, initramfs with the agent) than img has now.
// Artifacts the record does not name are not compared.
func imageChanged(rec subjects.SnapshotRecord, img vmpool.Image) (bool, error) {
	for _, f := range []struct{ name, path string }{{"kernel", img.Kernel}, {"initramfs", img.Initramfs}} {
		i := slices.IndexFunc(rec.Artifacts, func(a subjects.Artifact) bool { return a.Name == f.name })
		if i < 0 || f.path == "" {
			continue
		}
		_, sum, err := digestOf(f.path, vmpool.Digest{})
		if err != nil {
			return false, fmt.Errorf("guest image: %w", err)
		}
		if sum != rec.Artifacts[i].SHA256 {
			return true, nil
		}
	}
	return false, nil
}

// tryRestore restores a template snapshot once and stops the machine: a
// snapshot made by an older driver, or whose files were damaged, is found at
// start rather than by every create. It also says why the machine's guest
// booted with other kernel arguments than the driver's ("" when it did not).
func (b *Backend) tryRestore(ctx context.Context, rec subjects.SnapshotRecord) (outdated string, err error) {
	id := "check-" + NewID(12)
	m, err := b.restore(ctx, id, filepath.Join(b.cfg.StateDir, "sandboxes", id), rec, true, false)
	if err != nil {
		return "", err
	}
	if o, ok := m.(vmpool.BootChecker); ok {
		outdated = o.OutdatedBoot()
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	return outdated, m.Stop(sctx)
}

// BuildTemplate makes a template snapshot: it starts a machine from the
// template `from` (restore, or boot of a built-in image), runs the steps,
// starts start_cmd detached, polls ready_cmd until it succeeds, and saves the
// machine as the template snapshot named template_id. Warm machines of the
// previous version of the template are drained.
func (b *Backend) BuildTemplate(ctx context.Context, req subjects.BuildTemplateRequest) (subjects.SnapshotRecord, error) {
	if err := subjects.ValidateTemplateID(req.TemplateID); err != nil {
		return subjects.SnapshotRecord{}, err
	}
	from := req.From
	if from == "" {
		from = "tiny"
	}
	if err := subjects.ValidateTemplateID(from); err != nil {
		return subjects.SnapshotRecord{}, fmt.Errorf("from: %w", err)
	}
	readyTimeout := 60 * time.Second
	if req.ReadyTimeoutS < 0 || req.ReadyTimeoutS > 1800 {
		return subjects.SnapshotRecord{}, invalid("ready_timeout_s %d: want 0..1800", req.ReadyTimeoutS)
	} else if req.ReadyTimeoutS > 0 {
		readyTimeout = time.Duration(req.ReadyTimeoutS) * time.Second
	}
	if req.ReadyCmd == "" && req.StartCmd != "" {
		// Nothing says when the start command is up; one no-op check.
		req.ReadyCmd = "true"
	}
	res := b.cfg.DefaultResources
	if r := req.Resources; r != nil {
		if r.VCPUs != 0 {
			res.VCPUs = r.VCPUs
		}
		if r.MemoryMB != 0 {
			res.MemoryMB = r.MemoryMB
		}
	}
	if res.VCPUs < 1 || res.VCPUs > MaxVCPUs || res.MemoryMB < MinMemoryMB || res.MemoryMB > MaxMemoryMB {
		return subjects.SnapshotRecord{}, invalid("resources %d vCPUs / %d MiB out of range", res.VCPUs, res.MemoryMB)
	}
	unlock := b.templates.lock(req.TemplateID)
	defer unlock()
	// The record this build replaces, if any: checked now, before the
	// build's work, and replaced at the end only if nobody changed it.
	prev, prevRev, err := b.cfg.Store.GetSnapshotRevision(ctx, req.TemplateID)
	switch {
	case errors.Is(err, subjects.ErrSnapshotNotFound):
		prevRev = 0
	case err != nil:
		return subjects.SnapshotRecord{}, err
	case prev.Kind != subjects.KindTemplate:
		return subjects.SnapshotRecord{}, errdefs.Wrap(errdefs.ErrConflict, fmt.Errorf("snapshot %s exists and is a %s snapshot, not a template: template.build never replaces it (delete it, or build under another id)", req.TemplateID, prev.Kind))
	case !req.Replace:
		return subjects.SnapshotRecord{}, errdefs.Wrap(errdefs.ErrConflict, fmt.Errorf("template %s exists: build with \"replace\": true to replace it", req.TemplateID))
	}

	logs := b.cfg.Store.BuildLogs(req.TemplateID)
	progress := func(format string, args ...any) {
		msg := fmt.Sprintf(format, args...)
		ev := subjects.NewLogEvent(subjects.SourceBuild, "", "", []byte(msg))
		ev.TemplateID = req.TemplateID
		logs.Publish(ev)
		b.log.Info("template build", "template", req.TemplateID, "step", msg)
	}
	defer func() {
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = logs.Flush(fctx)
	}()
	fail := func(err error) (subjects.SnapshotRecord, error) {
		progress("build failed: %v", err)
		return subjects.SnapshotRecord{}, err
	}

	id := "build-" + NewID(12)
	evict, err := b.admission.Admit(id, res)
	if err != nil {
		return fail(err)
	}
	b.evictWarm(ctx, evict)
	defer b.admission.Release(id)
	if err := b.checkDisk(); err != nil {
		return fail(err)
	}
	dir := filepath.Join(b.cfg.StateDir, "sandboxes", id)
	envs := mergeEnv(nil, req.Envs)
	var m vmpool.Machine
	if base, ok := b.templates.get(from); ok && from != req.TemplateID {
		progress("restoring %s from its template snapshot", from)
		envs = mergeEnv(base.TemplateMetadata.Envs, req.Envs)
		m, err = b.restore(ctx, id, dir, base, true, true)
	} else if img, ok := b.cfg.Images[from]; ok {
		progress("booting image %s", from)
		m, err = b.cfg.Driver.Boot(ctx, vmpool.BootSpec{ID: id, Dir: dir, Image: img, Resources: res, Network: true, SnapshotReady: true})
	} else {
		return fail(invalid("from: template %q not found on worker %s", from, b.cfg.WorkerID))
	}
	if err != nil {
		return fail(fmt.Errorf("start build machine: %w", err))
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if err := m.Stop(sctx); err != nil {
			b.log.Warn("stop build machine", "template", req.TemplateID, "err", err)
		}
	}()
	if err := m.Init(ctx, initRequest(id, envs)); err != nil {
		return fail(fmt.Errorf("init build machine: %w", err))
	}
	out := func(stream agent.Stream, data []byte) {
		ev := subjects.NewLogEvent(subjects.SourceBuild, "", "", data)
		ev.TemplateID = req.TemplateID
		logs.Publish(ev)
	}
	for i, step := range req.Steps {
		progress("step %d/%d: %s", i+1, len(req.Steps), step)
		res, err := m.Exec(ctx, agent.ExecRequest{Command: step, Timeout: 30 * time.Minute}, out)
		if err != nil {
			return fail(errdefs.Wrap(errdefs.ErrTemplateBuild, fmt.Errorf("step %d (%q): %w", i+1, step, err)))
		}
		if res.ExitCode != 0 {
			return fail(errdefs.Wrap(errdefs.ErrTemplateBuild, fmt.Errorf("step %d (%q) exited with %d", i+1, step, res.ExitCode)))
		}
	}
	if req.StartCmd != "" {
		progress("starting %q", req.StartCmd)
		if _, err := m.Exec(ctx, agent.ExecRequest{Command: req.StartCmd, Detach: true}, nil); err != nil {
			return fail(errdefs.Wrap(errdefs.ErrTemplateBuild, fmt.Errorf("start command %q: %w", req.StartCmd, err)))
		}
	}
	if req.ReadyCmd != "" {
		progress("waiting up to %s for %q to succeed", readyTimeout, req.ReadyCmd)
		if err := waitReady(ctx, m, req.ReadyCmd, readyTimeout); err != nil {
			return fail(errdefs.Wrap(errdefs.ErrTemplateBuild, err))
		}
	}
	primeWarmShells(ctx, m)
	progress("saving template snapshot")
	meta := subjects.TemplateMetadata{Envs: envs, StartCmd: req.StartCmd, ReadyCmd: req.ReadyCmd}
	if meta.Envs == nil {
		meta.Envs = map[string]string{}
	}
	src := subjects.Sandbox{SandboxID: id, TemplateID: req.TemplateID, Dir: dir}
	s := &session{rec: src, machine: m}
	rec, err := b.save(ctx, s, req.TemplateID, vmpool.SaveOptions{Kind: vmpool.Template, Stop: true}, meta)
	if err != nil {
		return fail(err)
	}
	rec.TemplateID = req.TemplateID
	rec.Resources = subjects.Resources{VCPUs: res.VCPUs, MemoryMB: res.MemoryMB}
	if rec, err = b.signRecord(rec); err != nil {
		_ = os.RemoveAll(b.recordDir(rec))
		return fail(err)
	}
	if prevRev == 0 {
		err = b.cfg.Store.CreateSnapshot(ctx, rec)
	} else {
		err = b.cfg.Store.ReplaceSnapshot(ctx, rec, prevRev)
	}
	if err != nil {
		_ = os.RemoveAll(b.recordDir(rec))
		return fail(fmt.Errorf("store snapshot record: %w", err))
	}
	b.upload(rec)
	old, had, err := b.templates.put(req.TemplateID, rec)
	if err != nil {
		return fail(fmt.Errorf("record template: %w", err))
	}
	b.pool.Drain(req.TemplateID)
	if had && old.Generation != rec.Generation {
		b.retire(old, true)
	}
	progress("template %s ready: snapshot %s, %d bytes", req.TemplateID, rec.SnapshotID, rec.SizeBytes)
	return rec, nil
}

// waitReady runs cmd until it exits 0, with backoff, for at most timeout.
func waitReady(ctx context.Context, m vmpool.Machine, cmd string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	bo := backoff.WithContext(backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(100*time.Millisecond), backoff.WithMaxInterval(2*time.Second), backoff.WithMaxElapsedTime(0)), ctx)
	var last string
	err := backoff.Retry(func() error {
		var stderr strings.Builder
		res, err := m.Exec(ctx, agent.ExecRequest{Command: cmd, Timeout: 10 * time.Second}, func(s agent.Stream, d []byte) {
			if s == agent.Stderr && stderr.Len() < 512 {
				stderr.Write(d)
			}
		})
		switch {
		case err != nil:
			last = err.Error()
		case res.ExitCode != 0:
			last = fmt.Sprintf("exit code %d %s", res.ExitCode, strings.TrimSpace(stderr.String()))
		default:
			return nil
		}
		return errors.New(last)
	}, bo)
	if err != nil {
		return fmt.Errorf("ready command %q did not succeed within %s (last: %s)", cmd, timeout, last)
	}
	return nil
}

// startTemplateCommand starts a template's start command in a new sandbox.
func (b *Backend) startTemplateCommand(id string, m vmpool.Machine, cmd string) {
	ctx, cancel := context.WithTimeout(b.ctx, 30*time.Second)
	defer cancel()
	if _, err := m.Exec(ctx, agent.ExecRequest{Command: cmd, Detach: true}, nil); err != nil {
		b.log.Warn("start template command", "sandbox", id, "err", err)
	}
}

// retire removes a replaced template snapshot's files once nothing uses
// them, and its objects too when objects is set (the worker that replaced
// it; the others only drop their copies). old is an authenticated record
// (from the registry); its directory is derived, and the records it is
// compared with are only compared.
func (b *Backend) retire(old subjects.SnapshotRecord, objects bool) {
	ctx, cancel := context.WithTimeout(b.ctx, 10*time.Second)
	defer cancel()
	dir := b.recordDir(old)
	sessions, err := b.cfg.Store.ListSessions(ctx)
	if err != nil {
		return
	}
	for _, s := range sessions {
		if s.DiskParent == old.SnapshotID && s.DiskParentLocation == dir {
			b.log.Info("replaced template kept: a sandbox's disk sits on it", "template", old.TemplateID, "sandbox", s.SandboxID)
			return
		}
	}
	snaps, err := b.listSnapshots(ctx)
	if err != nil {
		return
	}
	for _, r := range snaps {
		if r.Parent == old.SnapshotID && r.ParentLocation == dir {
			b.log.Info("replaced template kept: a snapshot is layered on it", "template", old.TemplateID, "snapshot", r.SnapshotID)
			return
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		b.log.Warn("remove replaced template", "template", old.TemplateID, "err", err)
	}
	if objects {
		b.deleteObjects(ctx, old)
	}
}
