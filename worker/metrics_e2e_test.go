package worker_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/worker"
)

// TestMetrics scrapes the Prometheus endpoint and asks firkin.worker.status
// after real requests: the counts, latencies, gauges and the status reply
// must show them.
func TestMetrics(t *testing.T) {
	e := startWorker(t, func(c *worker.Config) {
		c.MetricsListen = "127.0.0.1:0"
		c.Pool = map[string]int{"tiny": 1}
	})
	eventually(t, 2*time.Minute, "a warm tiny machine", func() error {
		st, err := e.c.PoolStatus(e.ctx(10 * time.Second))
		if err != nil {
			return err
		}
		for _, p := range st.Templates {
			if p.TemplateID == "tiny" && p.Ready == 1 {
				return nil
			}
		}
		return fmt.Errorf("%+v", st)
	})
	sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
	e.exec(sb.SandboxID, "echo one")
	e.exec(sb.SandboxID, "echo two")
	if _, err := e.c.Snapshot(e.ctx(time.Minute), sb.SandboxID, subjects.SnapshotRequest{Name: "metrics-snap"}); err != nil {
		t.Fatal(err)
	}
	_, err := e.c.Create(e.ctx(time.Minute), subjects.CreateSandboxRequest{TemplateID: "no-such-template"})
	wantCode(t, "create of an unknown template", err, subjects.CodeInvalidRequest)

	body := scrape(t, "http://"+e.w.MetricsAddr()+"/metrics")
	for _, want := range []struct {
		series string
		min    float64
	}{
		{`firkin_requests_total{code="ok",endpoint="CreateSandbox"}`, 1},
		{`firkin_requests_total{code="invalid_request",endpoint="CreateSandbox"}`, 1},
		{`firkin_requests_total{code="ok",endpoint="sandbox.exec"}`, 2},
		{`firkin_requests_total{code="ok",endpoint="sandbox.snapshot"}`, 1},
		{`firkin_request_duration_seconds_count{endpoint="sandbox.exec"}`, 2},
		{`firkin_create_duration_seconds_count{source="pool"}`, 1},
		{`firkin_snapshot_save_duration_seconds_count{kind="continuation"}`, 1},
		{`firkin_sandboxes{state="active"}`, 1},
		{`firkin_admission_limit{resource="vcpus"}`, 32},
		{`firkin_pool_target{template="tiny"}`, 1},
		{`firkin_qemu_processes`, 1},
		{`go_goroutines`, 1},
	} {
		got, ok := metricValue(body, want.series)
		if !ok || got < want.min {
			t.Errorf("%s = %v (present %v), want >= %v", want.series, got, ok, want.min)
		}
	}

	r, err := e.nc.Request("firkin.worker.status", nil, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var st subjects.WorkerStatusReply
	if err := json.Unmarshal(r.Data, &st); err != nil {
		t.Fatalf("status %q: %v", r.Data, err)
	}
	if st.WorkerID != e.w.ID() || st.Sandboxes != 1 || st.QEMUProcesses < 1 || st.Limits.MaxVCPUs < 32 || st.Driver == "" {
		t.Errorf("status = %+v", st)
	}
	execs := 0
	for _, ep := range st.Endpoints {
		if ep.Endpoint == "sandbox.exec" {
			execs = int(ep.Requests)
		}
	}
	if execs < 2 {
		t.Errorf("status endpoints %+v: want sandbox.exec >= 2", st.Endpoints)
	}
	// The per-worker subject answers too.
	if _, err := e.nc.Request("firkin.worker."+e.w.ID()+".status", nil, 10*time.Second); err != nil {
		t.Errorf("firkin.worker.<id>.status: %v", err)
	}
}

func scrape(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape %s: %d %v", url, resp.StatusCode, err)
	}
	return string(data)
}

// metricValue finds one series (name with its labels, as exposed) in a
// scrape.
func metricValue(body, series string) (float64, bool) {
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`)
	m := re.FindStringSubmatch(body)
	if m == nil {
		return 0, false
	}
	v, err := strconv.ParseFloat(strings.TrimSpace(m[1]), 64)
	return v, err == nil
}
