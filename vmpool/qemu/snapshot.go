package qemu

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/vmpool"
	"github.com/firkin-dev/firkin-worker/vmpool/qemu/qmp"
)

// Snapshot formats (vmpool.Snapshot.Format).
const (
	FormatSharedMemory = "shared-memory"
	FormatStream       = "stream"
)

// Files inside a snapshot directory.
const (
	snapConfig = "config.json"
	snapState  = "state"
	snapDisk   = "disk.qcow2" // the frozen top layer (a link to layer-<depth>.qcow2)
	snapMem    = "mem"
)

// migrationTimeout bounds a save's or restore's migration when ctx has no
// deadline of its own.
const migrationTimeout = 5 * time.Minute

// snapshotMeta is config.json in a snapshot directory: what a restore needs
// to build the same machine.
type snapshotMeta struct {
	Version  int          `json:"version"`
	Depth    int          `json:"depth"` // of disk.qcow2: layer-1..layer-<depth>.qcow2 are here
	Format   string       `json:"format"`
	Kind     string       `json:"kind"`
	Config   vmConfig     `json:"config"`
	DiskSize int64        `json:"disk_size"`
	Image    vmpool.Image `json:"image"`
	Created  time.Time    `json:"created"`
	SaveTime string       `json:"save_time"`
}

// Save pauses m, freezes its disk, writes its state into dir and resumes m
// (or stops it when opts.Stop). See the package doc for the layout.
func (d *Driver) Save(ctx context.Context, vm vmpool.Machine, dir string, opts vmpool.SaveOptions) (vmpool.Snapshot, error) {
	m, ok := vm.(*Machine)
	if !ok {
		return vmpool.Snapshot{}, invalid("qemu: save: %T is not a qemu machine", vm)
	}
	switch opts.Kind {
	case vmpool.Continuation, vmpool.Template:
	case "":
		opts.Kind = vmpool.Continuation
	default:
		return vmpool.Snapshot{}, invalid("qemu: save: snapshot kind %q", opts.Kind)
	}
	if !filepath.IsAbs(dir) {
		return vmpool.Snapshot{}, invalid("qemu: save: snapshot dir %q is not absolute", dir)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return vmpool.Snapshot{}, fmt.Errorf("qemu: save: %w", err)
	}
	if ents, err := os.ReadDir(dir); err != nil || len(ents) > 0 {
		return vmpool.Snapshot{}, errdefs.Wrap(errdefs.ErrConflict, fmt.Errorf("qemu: save: snapshot dir %s is not empty (%v)", dir, err))
	}
	m.opMu.Lock()
	defer m.opMu.Unlock()
	if m.stopped || m.released {
		return vmpool.Snapshot{}, errdefs.Wrap(errdefs.ErrFailedPrecondition, fmt.Errorf("qemu: save: machine %s is stopped", m.id))
	}
	select {
	case <-m.done:
		return vmpool.Snapshot{}, errdefs.Wrap(errdefs.ErrFailedPrecondition, fmt.Errorf("qemu: save: machine %s has exited", m.id))
	default:
	}
	return m.save(ctx, dir, opts)
}

func (m *Machine) save(ctx context.Context, dir string, opts vmpool.SaveOptions) (snap vmpool.Snapshot, err error) {
	start := time.Now()
	m.mu.Lock()
	c, q := m.agent, m.qmp
	m.agent, m.saving = nil, true
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		m.saving = false
		m.mu.Unlock()
	}()
	step := ""
	paused := false
	defer func() {
		if err == nil || step == "resume" {
			return
		}
		err = stepError("save", m.id, step, err, m.cfg.Console, filepath.Join(m.dir, qemuLogFile))
		if step == "migrate" {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			_, _ = q.Execute(cctx, "migrate_cancel", nil)
			cancel()
		}
		// Leave the source usable: running, with a new agent session.
		if rerr := m.resume(context.WithoutCancel(ctx), q, paused); rerr != nil {
			m.log.Warn("cannot resume the machine after a failed save", "err", rerr)
		}
	}()

	// The next overlay is made before the pause: its header only names
	// the layer that is about to be frozen, which need not exist yet.
	step = "create overlay"
	next, err := m.nextOverlay(ctx)
	if err != nil {
		return snap, err
	}
	defer func() {
		if err != nil && !next.used {
			os.Remove(next.path)
		}
	}()
	step = "quiesce agent"
	if c != nil {
		if err := c.Quiesce(ctx); err != nil {
			return snap, err
		}
	}
	step = "pause"
	if _, err := q.Execute(ctx, "stop", nil); err != nil {
		return snap, err
	}
	paused = true
	tPaused := time.Now()

	step = "freeze disk"
	depth, err := m.freezeDisk(ctx, q, next, dir)
	if err != nil {
		return snap, err
	}
	tFrozen := time.Now()

	format := FormatStream
	if opts.Kind == vmpool.Template && m.cfg.Memory == MemoryShared {
		format = FormatSharedMemory
	}
	step = "migrate"
	// The worker makes the state file (root's, 0600, in the snapshot
	// directory) and QEMU writes it through a descriptor: confined or not,
	// it needs no permission on it.
	stateDigest, err := migrateOut(ctx, q, format == FormatSharedMemory, filepath.Join(dir, snapState))
	if err != nil {
		return snap, err
	}
	tMigrated := time.Now()
	artifacts := []string{snapConfig, snapState, snapDisk}
	for k := 1; k <= depth; k++ {
		artifacts = append(artifacts, layerName(k))
	}
	if format == FormatSharedMemory {
		step = "save memory file"
		dst := filepath.Join(dir, snapMem)
		if opts.Stop {
			err = linkOrCopy(m.cfg.MemPath, dst)
		} else {
			err = copySparse(m.cfg.MemPath, dst)
		}
		if err != nil {
			return snap, err
		}
		// QEMU made it for itself: it becomes the worker's, open to the
		// clones (which map it by path) when they are confined.
		if err := m.d.seal(dst, templateMemMode); err != nil {
			return snap, err
		}
		artifacts = append(artifacts, snapMem)
	}
	elapsed := time.Since(tPaused)
	// The kernel and initramfs go along (hard links), so the snapshot
	// outlives an image rebuild.
	step = "link boot files"
	if _, _, err := linkBootFiles(m.cfg.Kernel, m.cfg.Initramfs, dir); err != nil {
		return snap, err
	}
	artifacts = append(artifacts, kernelFile, initramfsFile)
	step = "write config"
	meta := snapshotMeta{Version: 1, Depth: depth, Format: format, Kind: string(opts.Kind), Config: m.cfg,
		DiskSize: m.diskSize, Image: m.image, Created: time.Now().UTC(), SaveTime: elapsed.Round(time.Microsecond).String()}
	if err := writeJSON(filepath.Join(dir, snapConfig), meta); err != nil {
		return snap, err
	}
	snap = vmpool.Snapshot{Dir: dir, Artifacts: artifacts, Disk: filepath.Join(dir, snapDisk), Format: format,
		Resources: vmpool.Resources{VCPUs: m.cfg.VCPUs, MemoryMB: m.cfg.MemoryMB}, Image: m.image,
		Digests: map[string]vmpool.Digest{snapState: stateDigest}}
	if m.cfg.Network {
		snap.NetworkMACs = []string{m.cfg.MAC}
	}
	if opts.Stop {
		step = "stop"
		if err := m.stopLocked(ctx); err != nil {
			m.log.Warn("stop after save", "err", err)
		}
	} else {
		step = "resume"
		if err := m.resume(ctx, q, true); err != nil {
			// The snapshot is good; the source is not answering.
			return snap, stepError("save", m.id, step, err, m.cfg.Console, filepath.Join(m.dir, qemuLogFile))
		}
	}
	m.log.Info("machine saved", "dir", dir, "format", format, "kind", opts.Kind, "paused", elapsed.Round(time.Microsecond),
		"freeze", tFrozen.Sub(tPaused).Round(time.Microsecond), "migrate", tMigrated.Sub(tFrozen).Round(time.Microsecond), "memory_file", tPaused.Add(elapsed).Sub(tMigrated).Round(time.Microsecond),
		"total", time.Since(start).Round(time.Millisecond), "stop", opts.Stop)
	return snap, nil
}

// The disk of a machine is a chain of qcow2 layers on the template's raw
// base. Layer k's header names its backing file by a relative name,
// layer-<k-1>.qcow2 (layer 1 names the base by its absolute path), and
// every directory that holds a layer also holds hard links to all layers
// below it under those names: a machine's directory, and each snapshot. So a
// snapshot is whole by itself: deleting the snapshot a machine or another
// snapshot came from breaks nothing, and no header ever needs a rewrite.

// layerName is the name of the frozen layer at depth k.
func layerName(k int) string { return fmt.Sprintf("layer-%d.qcow2", k) }

// overlayName is the name of a writable top overlay at depth k.
func overlayName(k int) string { return fmt.Sprintf("overlay-%d.qcow2", k) }

// nodeName is the block node name of the layer at depth k.
func nodeName(k int) string { return fmt.Sprintf("ov%d", k) }

// linkLayers hard-links (or copies) layer-1..layer-<depth> from src to dst.
func linkLayers(src, dst string, depth int) error {
	for k := 1; k <= depth; k++ {
		if err := linkOrCopy(filepath.Join(src, layerName(k)), filepath.Join(dst, layerName(k))); err != nil {
			return err
		}
	}
	return nil
}

// overlay is a new top overlay made ahead of a freeze.
type overlay struct {
	path, node string
	layer      int
	used       bool
}

// nextOverlay creates the overlay that goes on top at the next freeze; its
// backing file is the current top under its frozen name.
func (m *Machine) nextOverlay(ctx context.Context) (*overlay, error) {
	m.mu.Lock()
	depth, size := m.layer, m.diskSize
	m.mu.Unlock()
	o := &overlay{path: filepath.Join(m.dir, overlayName(depth+1)), node: nodeName(depth + 1), layer: depth + 1}
	os.Remove(o.path) // a leftover of a failed save
	if err := m.d.createOverlay(ctx, o.path, layerName(depth), "qcow2", size); err != nil {
		return nil, err
	}
	if err := m.own(o.path); err != nil {
		os.Remove(o.path)
		return nil, err
	}
	return o, nil
}

// freezeDisk makes the current top overlay read-only and puts next above it
// (blockdev-add + blockdev-snapshot, as libvirt does for external
// snapshots), then links the frozen chain into snapDir. It returns the depth
// of the frozen top.
func (m *Machine) freezeDisk(ctx context.Context, q *qmp.Client, next *overlay, snapDir string) (int, error) {
	m.mu.Lock()
	oldTop, oldNode, depth := m.top, m.topNode, m.layer
	m.mu.Unlock()
	add := map[string]any{"driver": "qcow2", "node-name": next.node, "backing": nil,
		"file": map[string]any{"driver": "file", "filename": next.path}}
	if _, err := q.Execute(ctx, "blockdev-add", add); err != nil {
		return 0, err
	}
	if _, err := q.Execute(ctx, "blockdev-snapshot", map[string]any{"node": oldNode, "overlay": next.node}); err != nil {
		_, _ = q.Execute(ctx, "blockdev-del", map[string]any{"node-name": next.node})
		return 0, err
	}
	next.used = true
	m.mu.Lock()
	m.top, m.topNode, m.layer = next.path, next.node, next.layer
	m.mu.Unlock()
	// The old top is now a read-only backing node (QEMU flushed it when it
	// reopened it), and its content is what the guest had at the pause.
	if err := os.Link(oldTop, filepath.Join(m.dir, layerName(depth))); err != nil {
		return 0, err
	}
	// QEMU holds it open read-only and never writes it again: from now on
	// it is snapshot data, the worker's only (machines get layers as
	// descriptors, never by path).
	if err := ownPrivate(oldTop); err != nil {
		return 0, err
	}
	if err := m.saveState(); err != nil {
		return 0, err
	}
	if err := linkLayers(m.dir, snapDir, depth); err != nil {
		return 0, err
	}
	return depth, os.Link(filepath.Join(snapDir, layerName(depth)), filepath.Join(snapDir, snapDisk))
}

// resume continues a paused machine and starts a new agent session.
func (m *Machine) resume(ctx context.Context, q *qmp.Client, paused bool) error {
	if paused {
		if _, err := q.Execute(ctx, "cont", nil); err != nil {
			return err
		}
	}
	m.mu.Lock()
	conn := m.agentConn
	m.mu.Unlock()
	if conn == nil {
		return errdefs.Wrap(errdefs.ErrFailedPrecondition, errors.New("no agent channel"))
	}
	c, err := connectAgent(ctx, conn, m.done)
	if err != nil {
		return err
	}
	m.mu.Lock()
	m.agent = c
	m.mu.Unlock()
	return nil
}

// setIgnoreShared sets the x-ignore-shared migration capability (RAM in a
// shared file is not sent: the file is the memory) and the speed limit.
func setMigration(ctx context.Context, q *qmp.Client, ignoreShared bool) error {
	caps := map[string]any{"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": ignoreShared}}}
	if _, err := q.Execute(ctx, "migrate-set-capabilities", caps); err != nil {
		return err
	}
	// The default limit (32 MiB/s) would make a stream save of 1 GiB take
	// half a minute.
	_, err := q.Execute(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(64) << 30})
	return err
}

// migrationFD is the name under which QEMU holds a migration stream's
// descriptor (getfd).
const migrationFD = "migration"

// passFD hands f to QEMU as the descriptor named migrationFD: the worker
// opens snapshot files itself, QEMU never opens one by path (and, with
// spawn=deny, could not run a command to do it either).
func passFD(ctx context.Context, q *qmp.Client, f *os.File) error {
	_, err := q.ExecuteWithFile(ctx, "getfd", map[string]any{"fdname": migrationFD}, f)
	return err
}

// dropFD makes QEMU close the descriptor passFD gave it, when a migration
// did not take it.
func dropFD(ctx context.Context, q *qmp.Client) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	_, _ = q.Execute(cctx, "closefd", map[string]any{"fdname": migrationFD})
}

// migrateOut writes the machine's state into a new file at path (mode
// 0600, created by the worker and passed to QEMU as a descriptor) and waits
// for the end. While QEMU writes, the worker reads what is already written
// and hashes it: the returned sha256 (hex) is ready almost as soon as the
// migration is, with no second read of the whole file afterwards and
// nothing in QEMU's write path.
func migrateOut(ctx context.Context, q *qmp.Client, ignoreShared bool, path string) (vmpool.Digest, error) {
	if err := setMigration(ctx, q, ignoreShared); err != nil {
		return vmpool.Digest{}, err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return vmpool.Digest{}, err
	}
	defer f.Close() // QEMU writes through its own copy
	rf, err := os.Open(path)
	if err != nil {
		return vmpool.Digest{}, err
	}
	defer rf.Close()
	written := make(chan struct{})
	hashed := make(chan hashResult, 1)
	go func() { hashed <- hashGrowing(rf, written) }()
	err = migrateFD(ctx, q, "migrate", f)
	close(written)
	res := <-hashed
	if err != nil {
		return vmpool.Digest{}, err
	}
	if res.err != nil {
		return vmpool.Digest{}, fmt.Errorf("hash migration stream: %w", res.err)
	}
	return vmpool.Digest{SHA256: res.sum, Size: res.size}, nil
}

type hashResult struct {
	sum  string
	size int64
	err  error
}

// hashGrowing hashes f while another writer appends to it: it reads to the
// current end, waits a little when there is nothing new, and once written
// is closed (the writer is done) reads to the end one last time. What it
// has read it also sends on to the disk (startWriteback).
func hashGrowing(f *os.File, written <-chan struct{}) hashResult {
	h := sha256.New()
	buf := make([]byte, 1<<20)
	idle := time.NewTicker(time.Millisecond)
	defer idle.Stop()
	done := false
	var off, flushed, end int64
	for {
		b := buf
		if done && end-off < int64(len(b)) {
			b = buf[:max(end-off, 0)]
		}
		n, err := f.Read(b)
		h.Write(b[:n])
		if off += int64(n); off-flushed >= 8<<20 {
			startWriteback(f, flushed, off-flushed)
			flushed = off
		}
		switch {
		case done && off >= end:
			return hashResult{sum: hex.EncodeToString(h.Sum(nil)), size: off}
		case err == nil:
			continue
		case !errors.Is(err, io.EOF):
			return hashResult{err: err}
		case done: // shorter than it was when the writer finished
			return hashResult{err: fmt.Errorf("state file shrank to %d bytes from %d", off, end)}
		}
		select {
		case <-written:
			// One more pass, to the size the file has now: a writer that
			// goes on after it said it was done is not followed.
			st, err := f.Stat()
			if err != nil {
				return hashResult{err: err}
			}
			done, end = true, st.Size()
		case <-idle.C:
		}
	}
}

// migrateIn loads the machine's state from the file at path (opened by the
// worker, passed to QEMU as a descriptor) and waits for the end.
func migrateIn(ctx context.Context, q *qmp.Client, ignoreShared bool, path string) error {
	if err := setMigration(ctx, q, ignoreShared); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil {
		return err
	} else if !st.Mode().IsRegular() {
		return errdefs.Wrap(errdefs.ErrIntegrity, errors.New("snapshot state is not a regular file"))
	}
	return migrateFD(ctx, q, "migrate-incoming", f)
}

// migrateFD passes f to QEMU, runs command ("migrate" or
// "migrate-incoming") on it and waits for the end.
func migrateFD(ctx context.Context, q *qmp.Client, command string, f *os.File) error {
	if err := passFD(ctx, q, f); err != nil {
		return err
	}
	if _, err := q.Execute(ctx, command, map[string]any{"uri": "fd:" + migrationFD}); err != nil {
		dropFD(ctx, q)
		return err
	}
	return waitMigration(ctx, q)
}

// waitMigration polls query-migrate until the migration completed or failed.
func waitMigration(ctx context.Context, q *qmp.Client) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, migrationTimeout)
		defer cancel()
	}
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for {
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := q.Run(ctx, "query-migrate", nil, &st); err != nil {
			return err
		}
		switch st.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			return errdefs.Wrap(errdefs.ErrFailedPrecondition, fmt.Errorf("migration %s: %s", st.Status, st.ErrorDesc))
		}
		select {
		case <-ctx.Done():
			return errdefs.Wrap(errdefs.ErrTimeout, fmt.Errorf("migration still %q: %w", st.Status, ctx.Err()))
		case <-q.Done():
			return errdefs.Wrap(errdefs.ErrFailedPrecondition, errors.New("qemu exited during migration"))
		case <-tick.C:
		}
	}
}

// Restore starts a machine from a snapshot made by Save and returns it once
// a new agent session answered.
func (d *Driver) Restore(ctx context.Context, spec vmpool.RestoreSpec) (vmpool.Machine, error) {
	m, err := d.restore(ctx, spec)
	if err != nil {
		return nil, err
	}
	return m, nil
}

func (d *Driver) restore(ctx context.Context, spec vmpool.RestoreSpec) (*Machine, error) {
	if err := checkID(spec.ID); err != nil {
		return nil, err
	}
	snapDir := spec.Snapshot.Dir
	if !filepath.IsAbs(snapDir) {
		return nil, invalid("qemu: restore: snapshot dir %q is not absolute", snapDir)
	}
	var meta snapshotMeta
	if err := readJSON(filepath.Join(snapDir, snapConfig), &meta); err != nil {
		return nil, fmt.Errorf("qemu: restore %s: snapshot %s: %w", spec.ID, snapDir, err)
	}
	if meta.Format != FormatStream && meta.Format != FormatSharedMemory {
		return nil, errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("qemu: restore %s: snapshot format %q", spec.ID, meta.Format))
	}
	if meta.Depth < 1 {
		return nil, errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("qemu: restore %s: snapshot disk depth %d", spec.ID, meta.Depth))
	}
	if meta.Depth > MaxLayers { // before any layer is linked: QEMU could not take the chain
		return nil, invalid("qemu: restore %s: snapshot has %d disk layers: at most %d", spec.ID, meta.Depth, MaxLayers)
	}
	for _, f := range []string{filepath.Join(snapDir, layerName(meta.Depth)), filepath.Join(snapDir, snapState)} {
		if _, err := os.Stat(f); err != nil {
			return nil, errdefs.Wrap(errdefs.ErrNotFound, fmt.Errorf("qemu: restore %s: %w", spec.ID, err))
		}
	}
	src := meta.Config
	// The boot files are the snapshot's own copies when it has them (the
	// source machine's links are gone once it stopped).
	kernel, initramfs := src.Kernel, src.Initramfs
	if _, err := os.Stat(filepath.Join(snapDir, kernelFile)); err == nil {
		kernel, initramfs = filepath.Join(snapDir, kernelFile), filepath.Join(snapDir, initramfsFile)
	}
	accel, err := d.accel(ctx, src.Arch, vmpool.Image{Kernel: kernel, Initramfs: initramfs, Arch: src.Arch})
	if err != nil {
		return nil, fmt.Errorf("qemu: restore %s: accelerator: %w", spec.ID, err)
	}
	if accel != src.Accel {
		return nil, errdefs.Wrap(errdefs.ErrUnsupported, fmt.Errorf("qemu: restore %s: snapshot was made under %s, this host runs %s", spec.ID, src.Accel, accel))
	}

	u := &undo{log: d.log}
	fail := func(step string, err error) (*Machine, error) {
		u.run()
		return nil, stepError("restore", spec.ID, step, err, "", "")
	}
	sockDir, cleanup, err := d.prepareDir(spec.ID, spec.Dir)
	if err != nil {
		return fail("create dir", err)
	}
	u.add("remove dir", cleanup)
	if err := linkLayers(snapDir, spec.Dir, meta.Depth); err != nil {
		return fail("link disk layers", err)
	}
	depth := meta.Depth + 1
	overlay := filepath.Join(spec.Dir, overlayName(depth))
	if err := d.createOverlay(ctx, overlay, layerName(meta.Depth), "qcow2", meta.DiskSize); err != nil {
		return fail("create overlay", err)
	}
	cfg := d.baseConfig(spec.ID, src.Arch, accel, vmpool.Resources{VCPUs: src.VCPUs, MemoryMB: src.MemoryMB},
		meta.Image, spec.Dir, sockDir, src.Network)
	// The devices are the source's; the boot files are the snapshot's own
	// copies when it has them.
	cfg.Machine, cfg.Kernel, cfg.Initramfs, cfg.Append, cfg.BIOS, cfg.MAC = src.Machine, src.Kernel, src.Initramfs, src.Append, src.BIOS, src.MAC
	if cfg.Kernel, cfg.Initramfs, err = linkBootFiles(kernel, initramfs, spec.Dir); err != nil {
		return fail("link boot files", err)
	}
	cfg.Disk, cfg.Node, cfg.Incoming = overlay, nodeName(depth), true
	// The chain is the worker's: the template's base and the layers linked
	// here, whatever their headers name.
	cfg.Base, cfg.Layers = meta.Image.RootDisk, nil
	for k := 1; k <= meta.Depth; k++ {
		cfg.Layers = append(cfg.Layers, filepath.Join(spec.Dir, layerName(k)))
	}
	switch {
	case src.Network && !spec.Network:
		cfg.NetOff = true
	case !src.Network && spec.Network:
		d.log.Warn("snapshot has no network device; the restored machine runs without network", "machine", spec.ID, "snapshot", snapDir)
	}
	memDst := filepath.Join(spec.Dir, memFile)
	switch {
	case meta.Format == FormatSharedMemory && spec.SnapshotReady:
		if err := copySparse(filepath.Join(snapDir, snapMem), memDst); err != nil {
			return fail("copy memory file", err)
		}
		cfg.Memory, cfg.MemPath = MemoryShared, memDst
	case meta.Format == FormatSharedMemory:
		cfg.Memory, cfg.MemPath = MemoryPrivate, filepath.Join(snapDir, snapMem)
	case spec.SnapshotReady:
		cfg.Memory, cfg.MemPath = MemoryShared, memDst
	default:
		cfg.Memory = MemoryRAM
	}
	state := filepath.Join(snapDir, snapState)
	load := func(ctx context.Context, m *Machine) error {
		t0 := time.Now()
		if err := migrateIn(ctx, m.qmp, meta.Format == FormatSharedMemory, state); err != nil {
			return err
		}
		var st struct {
			Running bool `json:"running"`
		}
		if err := m.qmp.Run(ctx, "query-status", nil, &st); err != nil {
			return err
		}
		if !st.Running {
			if _, err := m.qmp.Execute(ctx, "cont", nil); err != nil {
				return err
			}
		}
		m.log.Debug("state loaded", "elapsed", time.Since(t0).Round(time.Microsecond))
		return nil
	}
	return d.start(ctx, &launch{op: "restore", id: spec.ID, dir: spec.Dir, cfg: cfg, image: meta.Image,
		setup: load, diskSize: meta.DiskSize, depth: depth}, u)
}

// readSnapshotMeta reads config.json of the snapshot in dir.
func readSnapshotMeta(dir string) (snapshotMeta, error) {
	var meta snapshotMeta
	err := readJSON(filepath.Join(dir, snapConfig), &meta)
	return meta, err
}
