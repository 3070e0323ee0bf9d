package main

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/firkin-dev/firkin-worker/internal/procstat"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// pauseResume is (n) and (o): pause (a save with the machine stopped) and
// resume of a running sandbox, each timed from request to reply.
func (b *bench) pauseResume() ([]Result, error) {
	var pauses, resumes []float64
	err := b.withSandbox(func(id string) error {
		for range b.n {
			start := time.Now()
			if _, err := b.c.Pause(b.ctx, id); err != nil {
				return fmt.Errorf("pause: %w", err)
			}
			pauses = append(pauses, ms(time.Since(start)))
			start = time.Now()
			if _, err := b.c.Resume(b.ctx, id, subjects.ResumeRequest{}); err != nil {
				return fmt.Errorf("resume: %w", err)
			}
			resumes = append(resumes, ms(time.Since(start)))
			r, err := b.c.Exec(b.ctx, id, subjects.ExecRequest{Command: "echo hi"})
			if err != nil {
				return err
			}
			if r.Stdout != "hi\n" {
				return fmt.Errorf("echo hi after resume gave %q", r.Stdout)
			}
		}
		return nil
	})
	return []Result{
		summarize("(n) pause (save, machine stopped)", "ms", pauses, "p95 <= 100", func(r Result) bool { return r.P95 <= 100 }),
		summarize("(o) resume of a paused sandbox", "ms", resumes, "", nil),
	}, err
}

// burst is (p): 8 creates at once with a warm pool of 1, timed until every
// one has answered `echo hi`; repeated b.n/2 times (at least 2).
func (b *bench) burst() (Result, error) {
	const count = 8
	if _, err := b.c.SetPool(b.ctx, "tiny", 1); err != nil {
		return Result{}, err
	}
	defer func() { _, _ = b.c.SetPool(context.Background(), "tiny", 0) }()
	var samples []float64
	for range max(b.n/2, 2) {
		if err := b.waitPool("tiny", 1); err != nil {
			return Result{}, err
		}
		ctx, cancel := context.WithTimeout(b.ctx, 5*time.Minute)
		var wg sync.WaitGroup
		errs := make([]error, count)
		ids := make([]string, count)
		start := time.Now()
		for i := range count {
			wg.Add(1)
			go func() {
				defer wg.Done()
				sb, err := b.c.Create(ctx, subjects.CreateSandboxRequest{TemplateID: "tiny"})
				if err != nil {
					errs[i] = err
					return
				}
				ids[i] = sb.SandboxID
				r, err := b.c.Exec(ctx, sb.SandboxID, subjects.ExecRequest{Command: "echo hi"})
				if err == nil && r.Stdout != "hi\n" {
					err = fmt.Errorf("echo hi gave %q", r.Stdout)
				}
				errs[i] = err
			}()
		}
		wg.Wait()
		d := time.Since(start)
		for _, id := range ids {
			if id != "" {
				_ = b.c.Kill(context.Background(), id)
			}
		}
		cancel()
		if err := errors.Join(errs...); err != nil {
			return Result{}, err
		}
		samples = append(samples, ms(d))
	}
	return summarize("(p) burst: 8 concurrent creates, pool of 1, all to first stdout", "ms", samples, "<= 1000",
		func(r Result) bool { return r.P95 <= 1000 }), nil
}

// density is (q): for each level, that many idle sandboxes run; it gives
// the host CPU all their QEMU processes take over idleWindow (percent of
// one core), the mean PSS per sandbox, and create and exec latency at that
// density. Sandboxes are added level by level and killed at the end.
func (b *bench) density(levels []int, idleWindow time.Duration) ([]Result, error) {
	if _, err := b.c.SetPool(b.ctx, "tiny", 0); err != nil {
		return nil, err
	}
	var ids []string
	defer func() {
		for _, id := range ids {
			_ = b.c.Kill(context.Background(), id)
		}
	}()
	var results []Result
	for _, level := range levels {
		for len(ids) < level {
			ctx, cancel := context.WithTimeout(b.ctx, 3*time.Minute)
			sb, err := b.c.Create(ctx, subjects.CreateSandboxRequest{TemplateID: "tiny", TimeoutS: 3600})
			cancel()
			if err != nil {
				return results, fmt.Errorf("sandbox %d of %d: %w", len(ids)+1, level, err)
			}
			ids = append(ids, sb.SandboxID)
		}
		pids := make([]int, 0, len(ids))
		for _, id := range ids {
			sb, err := b.c.Get(b.ctx, id)
			if err != nil {
				return results, err
			}
			pid, err := qemuPID(sb.Dir)
			if err != nil {
				return results, err
			}
			pids = append(pids, pid)
		}
		time.Sleep(5 * time.Second) // let restores and refills settle
		cpu0, err := cpuTicks(pids)
		if err != nil {
			return results, err
		}
		time.Sleep(idleWindow)
		cpu1, err := cpuTicks(pids)
		if err != nil {
			return results, err
		}
		idlePct := 100 * float64(cpu1-cpu0) / procstat.ClockTicks / idleWindow.Seconds()
		var pss []float64
		for _, pid := range pids {
			kib, err := pssKiB(pid)
			if err != nil {
				return results, err
			}
			pss = append(pss, float64(kib)/1024)
		}
		var execs []float64
		for i := range 20 {
			id := ids[i%len(ids)]
			start := time.Now()
			r, err := b.c.Exec(b.ctx, id, subjects.ExecRequest{Command: "echo hi"})
			if err != nil {
				return results, err
			}
			if r.Stdout != "hi\n" {
				return results, fmt.Errorf("echo hi gave %q", r.Stdout)
			}
			execs = append(execs, ms(time.Since(start)))
		}
		var creates []float64
		for range 5 {
			d, _, err := b.firstStdout(subjects.CreateSandboxRequest{TemplateID: "tiny"})
			if err != nil {
				return results, err
			}
			creates = append(creates, ms(d))
		}
		var cpuTarget string
		var cpuMet func(Result) bool
		if level >= 64 { // the target is for 64 idle sandboxes
			cpuTarget, cpuMet = "<= 10", func(r Result) bool { return r.P50 <= 10 }
		}
		cpu := summarize(fmt.Sprintf("(q) %d idle: host CPU of all, %% of one core", level), "%", []float64{idlePct}, cpuTarget, cpuMet)
		results = append(results,
			cpu,
			summarize(fmt.Sprintf("(q) %d idle: PSS per sandbox", level), "MiB", pss, "<= 48", func(r Result) bool { return r.Mean <= 48 }),
			summarize(fmt.Sprintf("(q) %d idle: exec round trip", level), "ms", execs, "", nil),
			summarize(fmt.Sprintf("(q) %d idle: restore create -> first stdout", level), "ms", creates, "", nil),
		)
	}
	return results, nil
}

// cpuTicks sums the CPU time of pids, in clock ticks.
func cpuTicks(pids []int) (int64, error) {
	var sum int64
	for _, pid := range pids {
		st, err := procstat.Read(pid)
		if err != nil {
			return 0, err
		}
		sum += int64(st.CPUTicks())
	}
	return sum, nil
}

// parseLevels reads "8,16,32" as density levels, ascending.
func parseLevels(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 || n > 256 {
			return nil, fmt.Errorf("density level %q: want 1..256", f)
		}
		if len(out) > 0 && n <= out[len(out)-1] {
			return nil, fmt.Errorf("density levels must ascend: %q", s)
		}
		out = append(out, n)
	}
	return out, nil
}
