package agent

import (
	"context"
	"os"
	"os/exec"
	"os/signal"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Reaper waits for every child of the process, as PID 1 must: the statuses
// of commands started through it go to their waiters, those of orphans
// re-parented to PID 1 are dropped. Nothing else in the process may wait for
// children while a Reaper runs (os/exec's Wait would lose its status).
type Reaper struct {
	mu      sync.Mutex
	waiters map[int]chan syscall.WaitStatus
	sig     chan os.Signal
	done    chan struct{} // closed when reaping has stopped
}

// NewReaper starts reaping until ctx ends.
func NewReaper(ctx context.Context) *Reaper {
	r := &Reaper{
		waiters: map[int]chan syscall.WaitStatus{},
		sig:     make(chan os.Signal, 1),
		done:    make(chan struct{}),
	}
	signal.Notify(r.sig, syscall.SIGCHLD)
	go r.loop(ctx)
	return r
}

func (r *Reaper) loop(ctx context.Context) {
	defer close(r.done)
	defer signal.Stop(r.sig)
	for {
		r.reapAll()
		select {
		case <-r.sig:
		case <-ctx.Done():
			return
		}
	}
}

// reapAll reaps every child that has exited. SIGCHLD notifications coalesce,
// so it loops until there is none left.
func (r *Reaper) reapAll() {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if err == unix.EINTR {
			continue
		}
		if err != nil || pid <= 0 {
			return
		}
		r.mu.Lock()
		ch, ok := r.waiters[pid]
		delete(r.waiters, pid)
		r.mu.Unlock()
		if ok {
			ch <- syscall.WaitStatus(ws)
		}
	}
}

// start starts cmd and registers for its status. The lock is held across
// the fork, so the status cannot be reaped before the waiter is registered.
func (r *Reaper) start(cmd *exec.Cmd) (<-chan syscall.WaitStatus, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	ch := make(chan syscall.WaitStatus, 1)
	r.waiters[cmd.Process.Pid] = ch
	return ch, nil
}
