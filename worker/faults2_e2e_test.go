package worker_test

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/worker"
)

// poolEntry is template's entry of the worker's pool status.
func (e *env) poolEntry(template string) subjects.PoolTemplateStatus {
	e.t.Helper()
	st, err := e.c.PoolStatus(e.ctx(10 * time.Second))
	if err != nil {
		e.t.Fatalf("pool.status: %v", err)
	}
	for _, p := range st.Templates {
		if p.TemplateID == template {
			return p
		}
	}
	return subjects.PoolTemplateStatus{TemplateID: template}
}

// TestWarmFillGuestNeverAnswers: a template whose real guest restores and
// answers the agent handshake but never finishes the fill's warm-up command
// (its /etc/profile sleeps in every login shell once armed). The fill's
// deadline stops that machine and counts it (pool.status fill_timeouts),
// while the fill of another template and a create of it go on meanwhile.
func TestWarmFillGuestNeverAnswers(t *testing.T) {
	const fillTimeout = 10 * time.Second
	e := startWorker(t, func(c *worker.Config) { c.FillTimeout = fillTimeout })
	// Armed by the ready command, after the build's last login shell read
	// the profile: the template's snapshot has it armed, the build did not
	// hang.
	_, err := e.c.BuildTemplate(e.ctx(3*time.Minute), subjects.BuildTemplateRequest{
		TemplateID: "mute",
		Steps:      []string{`printf '[ -e /etc/firkin-mute ] && exec sleep 100000\n' >>/etc/profile`},
		ReadyCmd:   "touch /etc/firkin-mute",
	})
	if err != nil {
		t.Fatalf("build the mute template: %v", err)
	}
	if _, err := e.c.SetPool(e.ctx(10*time.Second), "mute", 1); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "the mute template's fill started", func() error {
		if p := e.poolEntry("mute"); p.InProgress != 1 {
			return fmt.Errorf("%+v", p)
		}
		return nil
	})
	muteStarted := time.Now()
	if _, err := e.c.SetPool(e.ctx(10*time.Second), "tiny", 1); err != nil {
		t.Fatal(err)
	}
	// Meanwhile: tiny's fill completes and a create of tiny answers, both
	// before the mute fill's deadline.
	sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
	if out := e.exec(sb.SandboxID, "echo meanwhile"); out.Stdout != "meanwhile\n" {
		t.Fatalf("exec in a tiny sandbox during the mute fill: %+v", out)
	}
	created := time.Since(muteStarted)
	var tinyReady time.Duration
	eventually(t, 2*fillTimeout, "tiny's pool filled", func() error {
		if p := e.poolEntry("tiny"); p.Ready < 1 {
			return fmt.Errorf("%+v", p)
		}
		tinyReady = time.Since(muteStarted)
		return nil
	})
	if m := e.poolEntry("mute"); m.FillTimeouts != 0 || m.Ready != 0 {
		t.Fatalf("mute %+v when tiny was ready, want its first fill still running", m)
	}
	t.Logf("during the hung fill: a tiny create and exec answered %s, tiny's pool filled %s after the mute fill started",
		created.Round(time.Millisecond), tinyReady.Round(time.Millisecond))

	var mute subjects.PoolTemplateStatus
	eventually(t, 3*fillTimeout, "the mute fill timed out", func() error {
		if mute = e.poolEntry("mute"); mute.FillTimeouts < 1 {
			return fmt.Errorf("%+v", mute)
		}
		return nil
	})
	counted := time.Since(muteStarted)
	if _, err := e.c.SetPool(e.ctx(10*time.Second), "mute", 0); err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`fill timed out after ([0-9.]+m?s)`).FindStringSubmatch(mute.LastError)
	if m == nil {
		t.Fatalf("mute last_error %q, want the fill's timeout", mute.LastError)
	}
	took, err := time.ParseDuration(m[1])
	if err != nil {
		t.Fatal(err)
	}
	// took is the fill's time with its machine stopped: the deadline, then
	// the kill of the warm-up command and the stop.
	t.Logf("mute fill: %s until stopped and counted (deadline %s, %s from deadline to stopped); counted %s after it started; last_error %q",
		took, fillTimeout, (took - fillTimeout).Round(time.Millisecond), counted.Round(time.Millisecond), mute.LastError)
	if took < fillTimeout || took > fillTimeout+10*time.Second {
		t.Errorf("mute fill took %s, want its deadline %s plus at most 10 s to stop the machine", took, fillTimeout)
	}

	// The mute machines (the counted one, and a refill started before the
	// target went to 0) end; tiny's warm machine and the sandbox remain.
	if err := e.c.Kill(e.ctx(time.Minute), sb.SandboxID); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*fillTimeout+30*time.Second, "only tiny's warm machine left", func() error {
		if p := e.poolEntry("mute"); p.InProgress != 0 || p.Ready != 0 {
			return fmt.Errorf("mute %+v", p)
		}
		if u := e.w.Backend().Usage(); u.Sandboxes != 0 || u.Warm != 1 {
			return fmt.Errorf("admission %+v", u)
		}
		if p := qemuProcesses(filepath.Join(e.state, "sandboxes")); len(p) != 1 {
			return fmt.Errorf("QEMU processes: %q", p)
		}
		entries, _ := os.ReadDir(filepath.Join(e.state, "sandboxes"))
		if len(entries) != 1 {
			return fmt.Errorf("machine dirs: %v", entries)
		}
		return nil
	})
}
