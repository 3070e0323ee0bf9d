package metrics

import (
	"io"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/subjects"
)

func TestStatusAndScrape(t *testing.T) {
	m := New(Info{WorkerID: "w1", Version: "test", Driver: "qemu"}, func() State {
		return State{Sandboxes: 2, Warm: 1, VCPUs: 3, MemoryMB: 768,
			Limits: subjects.WorkerLimits{MaxSandboxes: 64, MaxVCPUs: 64, MaxMemoryMB: 1024},
			Pool:   []subjects.PoolTemplateStatus{{TemplateID: "tiny", Target: 2, Ready: 1}}, LogDroppedBytes: 42}
	})
	m.ObserveRequest("CreateSandbox", subjects.CodeOK, 20*time.Millisecond)
	m.ObserveRequest("CreateSandbox", subjects.CodeCapacityRejected, time.Millisecond)
	m.ObserveRequest("sandbox.exec", subjects.CodeOK, 5*time.Millisecond)
	m.ObserveCreate("pool", 20*time.Millisecond)
	m.ObserveSave("continuation", 150*time.Millisecond, 64<<20)

	st := m.Status()
	if st.WorkerID != "w1" || st.Sandboxes != 2 || st.Warm != 1 || st.LogDroppedBytes != 42 || len(st.Pool) != 1 {
		t.Fatalf("status = %+v", st)
	}
	if len(st.Endpoints) != 2 || st.Endpoints[0].Endpoint != "CreateSandbox" || st.Endpoints[0].Requests != 2 || st.Endpoints[0].Errors != 1 {
		t.Fatalf("endpoints = %+v", st.Endpoints)
	}

	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	for _, want := range []string{
		`firkin_requests_total{code="capacity_rejected",endpoint="CreateSandbox"} 1`,
		`firkin_create_duration_seconds_count{source="pool"} 1`,
		`firkin_snapshot_size_bytes_count{kind="continuation"} 1`,
		`firkin_sandboxes{state="warm"} 1`,
		`firkin_admission_limit{resource="memory_mb"} 1024`,
		`firkin_pool_ready{template="tiny"} 1`,
		`firkin_log_dropped_bytes_total 42`,
	} {
		if !strings.Contains(string(body), want+"\n") {
			t.Errorf("scrape lacks %q", want)
		}
	}
}

func TestNilMetricsObserveNothing(t *testing.T) {
	var m *Metrics
	m.ObserveRequest("x", subjects.CodeOK, time.Second)
	m.ObserveCreate("pool", time.Second)
	m.ObserveSave("template", time.Second, 1)
}
