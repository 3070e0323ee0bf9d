//go:build linux

package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/jail"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// Reattach connects to the machine whose private directory is dir: a QEMU
// started by this or an earlier worker process (with KeepOnExit). It checks
// that the pid recorded in dir/machine.json is still that QEMU (command line
// and start time), then connects QMP and starts a new agent session. It
// fails with errdefs.ErrNotFound when the machine is gone, and when it is
// there but does not answer within ctx: then it is killed, so a failed
// Reattach never leaves a process behind (the caller removes dir).
func (d *Driver) Reattach(ctx context.Context, dir string) (vmpool.Machine, error) {
	m, err := d.reattach(ctx, dir)
	if err != nil {
		return nil, err
	}
	return m, nil
}

func (d *Driver) reattach(ctx context.Context, dir string) (*Machine, error) {
	var st machineState
	if err := readJSON(filepath.Join(dir, stateFile), &st); err != nil {
		return nil, fmt.Errorf("qemu: reattach %s: %w", dir, err)
	}
	if filepath.Clean(st.Dir) != filepath.Clean(dir) {
		return nil, errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("qemu: reattach %s: machine.json is for %s", dir, st.Dir))
	}
	gone := func(why string) error {
		return errdefs.Wrap(errdefs.ErrNotFound, fmt.Errorf("qemu: reattach %s: machine %s is gone: %s", dir, st.ID, why))
	}
	if st.PID <= 0 {
		return nil, gone("no pid")
	}
	// machine.json is root's (its directory too, see ownFiles), yet the
	// ids it names go to the allocator and the console socket's group:
	// both none (unconfined), or both of the machine ranges.
	if (st.UID != 0 || st.GID != 0) && (!jail.InAnyRange(st.UID) || !jail.InAnyRange(st.GID)) {
		return nil, errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("qemu: reattach %s: machine.json names uid %d, gid %d outside the machine uid ranges", dir, st.UID, st.GID))
	}
	// Open a pidfd first, then check the process behind it: a pid reused
	// after this check cannot be signalled by mistake.
	pidfd, err := unix.PidfdOpen(st.PID, 0)
	if err != nil {
		return nil, gone(fmt.Sprintf("pid %d: %v", st.PID, err))
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", st.PID))
	want := append([]string{st.Binary}, st.Args...)
	if err != nil || !bytes.Equal(cmdline, []byte(joinNUL(want))) {
		unix.Close(pidfd)
		return nil, gone(fmt.Sprintf("pid %d is not its QEMU", st.PID))
	}
	if t, err := startTime(st.PID); err != nil || t != st.StartTime {
		unix.Close(pidfd)
		return nil, gone(fmt.Sprintf("pid %d was started at another time", st.PID))
	}
	m := &Machine{d: d, log: d.log.With("machine", st.ID), id: st.ID, dir: st.Dir, sockDir: st.SockDir,
		binary: st.Binary, args: st.Args, cfg: st.Config, image: st.Image, pid: st.PID, started: st.StartTime,
		done: make(chan struct{}), top: st.Top, topNode: st.TopNode, layer: st.Layer, diskSize: st.DiskSize}
	m.kill = func() error { return unix.PidfdSendSignal(pidfd, syscall.SIGKILL, nil, 0) }
	m.uid, m.gid = st.UID, st.GID
	if c := d.conf; c != nil && c.alloc != nil {
		c.alloc.Reserve(st.UID)
	}
	if len(st.Cgroup) > 0 {
		if d.conf == nil || d.conf.cg == nil {
			m.log.Warn("machine has a cgroup this driver does not manage; it stays until a confined driver sweeps it", "cgroup", st.Cgroup)
		} else if g, err := d.conf.cg.Load(st.Cgroup, st.ID); err != nil {
			m.log.Warn("machine.json names a cgroup that is not the machine's; ignored", "err", err)
		} else {
			m.cgroup = g
		}
	}
	go func() {
		defer close(m.done)
		defer unix.Close(pidfd)
		fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
		for {
			_, err := unix.Poll(fds, -1)
			if err == nil || !errors.Is(err, syscall.EINTR) {
				return
			}
		}
	}()
	// A machine that is there but does not answer is of no use to anyone:
	// kill it rather than leave an orphan behind a failed Reattach.
	fail := func(step string, err error) (*Machine, error) {
		m.closeConns()
		m.console.close()
		select {
		case <-m.done:
		default:
			m.log.Warn("machine does not answer; killing it", "step", step, "err", err)
			_ = m.kill()
			select {
			case <-m.done:
			case <-time.After(10 * time.Second):
			}
		}
		if err := m.releaseConfinement(); err != nil {
			m.log.Warn("remove cgroup", "err", err)
		}
		if st.SockDir != "" {
			_ = os.RemoveAll(st.SockDir)
		}
		err = stepError("reattach", st.ID, step, err, st.Config.Console, filepath.Join(dir, qemuLogFile))
		return nil, errdefs.Wrap(errdefs.ErrNotFound, err)
	}
	if st.Starting {
		// Its worker stopped before the machine was up: nothing to adopt.
		return fail("start", errors.New("the worker that started it stopped before the machine was up"))
	}
	// Listen on the console socket again: QEMU has been retrying it since
	// the last worker let go.
	if st.Config.ConsoleSock != "" {
		if m.console, err = listenConsole(st.Config.ConsoleSock, st.Config.Console, d.cfg.ConsoleCap, m.gid, m.done, m.log); err != nil {
			return fail("listen console", err)
		}
		m.console.expect(m.pid)
	}
	q, err := dialQMP(ctx, st.Config.QMP, m.pid, m.done)
	if err != nil {
		return fail("connect qmp", err)
	}
	m.qmp = q
	var status struct {
		Status  string `json:"status"`
		Running bool   `json:"running"`
	}
	if err := q.Run(ctx, "query-status", nil, &status); err != nil {
		return fail("query status", err)
	}
	if !status.Running {
		// A save that was cut short leaves the machine paused.
		m.log.Warn("machine was paused; continuing it", "status", status.Status)
		if _, err := q.Execute(ctx, "cont", nil); err != nil {
			return fail("continue", err)
		}
	}
	conn, err := dialUnix(ctx, st.Config.Agent, m.pid, m.done)
	if err != nil {
		return fail("connect agent", err)
	}
	m.agentConn = conn
	c, err := connectAgent(ctx, conn, m.done)
	if err != nil {
		return fail("agent handshake", err)
	}
	m.agent = c
	if err := c.Ping(ctx); err != nil {
		return fail("ping agent", err)
	}
	m.log.Info("machine reattached", "pid", m.pid)
	return m, nil
}

func joinNUL(args []string) string {
	var b bytes.Buffer
	for _, a := range args {
		b.WriteString(a)
		b.WriteByte(0)
	}
	return b.String()
}
