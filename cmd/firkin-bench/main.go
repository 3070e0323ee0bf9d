// Command firkin-bench measures a real worker through the real NATS path:
// cold boot, restore and pool creates to first stdout, exec round trips,
// continuation snapshot saves, host memory per idle sandbox, the port proxy,
// the raw NATS request round trip that is the floor under every subject,
// exec output throughput into the log stream, jobs, a restore on a second
// worker of a snapshot saved on the first, pause and resume, a burst of
// creates, and density (idle host CPU, PSS, latency at 8..64 sandboxes).
// It prints a table and writes the figures as JSON.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/client"
	"github.com/firkin-dev/firkin-worker/jail"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/worker"
)

func main() {
	jail.Main() // a QEMU jail started by this binary: set up and exec QEMU
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "firkin-bench:", err)
		os.Exit(1)
	}
}

// Result is one measured quantity.
type Result struct {
	Name    string    `json:"name"`
	Unit    string    `json:"unit"`
	N       int       `json:"n"`
	P50     float64   `json:"p50"`
	P95     float64   `json:"p95"`
	P99     float64   `json:"p99"`
	Mean    float64   `json:"mean"`
	Target  string    `json:"target,omitempty"`
	Met     *bool     `json:"met,omitempty"`
	Samples []float64 `json:"samples,omitempty"`
}

// Report is what the JSON file holds.
type Report struct {
	When    time.Time          `json:"when"`
	Host    string             `json:"host"`
	Accel   string             `json:"accel"`
	Results []Result           `json:"results"`
	Ratios  map[string]float64 `json:"ratios"`
}

type bench struct {
	ctx context.Context
	c   *client.Client
	nc  *nats.Conn
	w   *worker.Worker
	log *slog.Logger
	n   int
	// stateDir holds the worker's nkey identities.
	stateDir string
}

func run() error {
	var (
		out      = flag.String("out", "bench-results.json", "write the figures as JSON here")
		stateDir = flag.String("state-dir", filepath.Join(os.TempDir(), "firkin-bench"), "worker state (images are kept here between runs)")
		agent    = flag.String("agent", filepath.Join("bin", "firkin-agent-linux-"+runtime.GOARCH), "guest agent binary")
		n        = flag.Int("n", 10, "samples for create and snapshot figures")
		nExec    = flag.Int("exec-n", 100, "samples for exec and NATS round trips")
		accel    = flag.String("accel", "auto", "qemu accelerator")
		only     = flag.String("only", "", "run only these measures, e.g. \"d,i\" (default all)")
		cross    = flag.Bool("cross-worker", true, "also measure restores on a second worker that joins the first (l, m)")
		levels   = flag.String("density", "8,16", "idle sandbox counts for the density measure (q), ascending; by hand: 8,16,32,64")
		idleWin  = flag.Duration("idle-window", 10*time.Second, "how long (q) measures idle host CPU at each level")
	)
	flag.Parse()
	densityLevels, err := parseLevels(*levels)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ctx := context.Background()
	// Sandboxes of an earlier run are swept at start; start from clean state
	// but keep the images.
	_ = os.RemoveAll(filepath.Join(*stateDir, "sandboxes"))
	_ = os.RemoveAll(filepath.Join(*stateDir, "nats"))
	secret, err := benchSecret(*stateDir)
	if err != nil {
		return err
	}
	fmt.Fprintln(os.Stderr, "starting worker (builds images and the tiny template snapshot on first run)...")
	w, err := worker.Start(ctx, worker.Config{
		StateDir: *stateDir, NATSListen: "127.0.0.1:-1", ProxyListen: "127.0.0.1:0", AgentBinary: *agent,
		Accel: *accel, Pool: map[string]int{}, WaitTemplates: true, Logger: log, TokenSecret: secret,
	})
	if err != nil {
		return err
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_ = w.Stop(sctx)
	}()
	nc, err := nats.Connect(w.NATSURL(), w.ClientOptions()...)
	if err != nil {
		return err
	}
	defer nc.Close()
	b := &bench{ctx: ctx, c: client.New(nc), nc: nc, w: w, log: log, n: *n, stateDir: *stateDir}
	report := Report{When: time.Now().UTC(), Host: hostDescription(), Ratios: map[string]float64{}}

	one := func(fn func() (Result, error)) func() ([]Result, error) {
		return func() ([]Result, error) {
			r, err := fn()
			return []Result{r}, err
		}
	}
	steps := []struct {
		name string
		fn   func() ([]Result, error)
	}{
		{"a", one(b.coldBoot)},
		{"b", one(b.restoreCreate)},
		{"c", one(b.poolCreate)},
		{"d", one(func() (Result, error) { return b.execRoundTrip(*nExec) })},
		{"e", one(b.snapshotSave)},
		{"f", one(b.idleRSS)},
		{"g", one(func() (Result, error) { return b.natsFloor(*nExec) })},
		{"h", one(b.proxyThroughput)},
		{"i", one(b.outputThroughput)},
		{"j", one(b.jobLatency)},
		{"k", one(b.jobThroughput)},
		{"r", one(func() (Result, error) { return b.execArgvRoundTrip(*nExec) })},
		{"s", one(func() (Result, error) { return b.execPaced(*nExec/2, 100*time.Millisecond) })},
		{"n", b.pauseResume},
		{"p", one(b.burst)},
		{"q", func() ([]Result, error) { return b.density(densityLevels, *idleWin) }},
	}
	byKey := map[string]Result{}
	for _, s := range steps {
		if *only != "" && !strings.Contains(","+*only+",", ","+s.name+",") {
			continue
		}
		fmt.Fprintf(os.Stderr, "measuring (%s)...\n", s.name)
		rs, err := s.fn()
		if err != nil {
			return fmt.Errorf("(%s): %w", s.name, err)
		}
		byKey[s.name] = rs[0]
		report.Results = append(report.Results, rs...)
		if report.Accel == "" {
			report.Accel = w.Backend().Accelerator()
		}
	}
	if *cross && (*only == "" || strings.Contains(","+*only+",", ",l,") || strings.Contains(","+*only+",", ",m,")) {
		fmt.Fprintln(os.Stderr, "measuring (l, m): a second worker joins...")
		first, cached, err := b.crossWorker(*agent, *accel, secret)
		if err != nil {
			return fmt.Errorf("(l, m): %w", err)
		}
		report.Results = append(report.Results, first, cached)
	}
	if c := byKey["c"].P50; c > 0 {
		report.Ratios["cold_boot_over_pool_p50"] = byKey["a"].P50 / c
	}
	if g := byKey["g"].P50; g > 0 {
		report.Ratios["exec_over_nats_p50"] = byKey["d"].P50 / g
	}
	printTable(os.Stdout, report)
	data, _ := json.MarshalIndent(report, "", "  ")
	if err := os.WriteFile(*out, data, 0o644); err != nil {
		return err
	}
	fmt.Printf("\nwrote %s\n", *out)
	return nil
}

func summarize(name, unit string, samples []float64, target string, met func(Result) bool) Result {
	s := append([]float64(nil), samples...)
	sort.Float64s(s)
	pct := func(p float64) float64 {
		if len(s) == 0 {
			return 0
		}
		i := int(p*float64(len(s))+0.5) - 1
		return s[min(max(i, 0), len(s)-1)]
	}
	var sum float64
	for _, v := range s {
		sum += v
	}
	r := Result{Name: name, Unit: unit, N: len(s), P50: pct(0.50), P95: pct(0.95), P99: pct(0.99), Target: target, Samples: samples}
	if len(s) > 0 {
		r.Mean = sum / float64(len(s))
	}
	if met != nil {
		ok := met(r)
		r.Met = &ok
	}
	return r
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func printTable(w io.Writer, r Report) {
	fmt.Fprintf(w, "firkin-bench  %s  accel=%s  %s\n\n", r.When.Format(time.RFC3339), r.Accel, r.Host)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "measure\tunit\tn\tp50\tp95\tp99\ttarget\tmet\t")
	for _, x := range r.Results {
		met := ""
		if x.Met != nil {
			met = map[bool]string{true: "yes", false: "NO"}[*x.Met]
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%.2f\t%.2f\t%.2f\t%s\t%s\t\n", x.Name, x.Unit, x.N, x.P50, x.P95, x.P99, x.Target, met)
	}
	tw.Flush()
	keys := make([]string, 0, len(r.Ratios))
	for k := range r.Ratios {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	fmt.Fprintln(w)
	for _, k := range keys {
		fmt.Fprintf(w, "%s = %.1f\n", k, r.Ratios[k])
	}
}

func hostDescription() string {
	model := "unknown cpu"
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if strings.HasPrefix(line, "model name") {
				model = strings.TrimSpace(strings.SplitN(line, ":", 2)[1])
				break
			}
		}
	}
	return fmt.Sprintf("%d cores, %s", runtime.NumCPU(), model)
}

// firstStdout creates a sandbox with req and runs `echo hi` in it; the time
// until its output arrives is "create to first stdout".
func (b *bench) firstStdout(req subjects.CreateSandboxRequest) (time.Duration, string, error) {
	ctx, cancel := context.WithTimeout(b.ctx, 3*time.Minute)
	defer cancel()
	start := time.Now()
	sb, err := b.c.Create(ctx, req)
	if err != nil {
		return 0, "", err
	}
	r, err := b.c.Exec(ctx, sb.SandboxID, subjects.ExecRequest{Command: "echo hi"})
	d := time.Since(start)
	_ = b.c.Kill(ctx, sb.SandboxID)
	if err != nil {
		return 0, "", err
	}
	if r.Stdout != "hi\n" {
		return 0, "", fmt.Errorf("echo hi gave %q", r.Stdout)
	}
	return d, sb.Source, nil
}
