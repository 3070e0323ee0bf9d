// Package metrics measures a worker for its operators: request counts and
// latencies by subject and error code, create latency by source, snapshot
// save times and sizes, and, read at each scrape, the pool, the admission
// ledger and the QEMU processes. It serves them in the Prometheus text
// format and summarises them as the firkin.worker.status reply.
package metrics

import (
	"net/http"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/firkin-dev/firkin-worker/subjects"
)

// State is what a worker holds at one moment, read at each scrape and each
// status request.
type State struct {
	Sandboxes, Warm int
	VCPUs, MemoryMB int
	Limits          subjects.WorkerLimits
	Pool            []subjects.PoolTemplateStatus
	QEMUProcesses   int
	// LogDroppedBytes is the log output dropped so far (budgets, publish
	// failures).
	LogDroppedBytes int64
}

// Info describes the worker in the status reply.
type Info struct {
	WorkerID, Version, Driver, Accelerator string
}

// Metrics is one worker's measurements. Its methods are safe for
// concurrent use; a nil *Metrics observes nothing.
type Metrics struct {
	info    Info
	state   func() State
	started time.Time
	reg     *prometheus.Registry

	requests  *prometheus.CounterVec
	latency   *prometheus.HistogramVec
	creates   *prometheus.HistogramVec
	saves     *prometheus.HistogramVec
	saveBytes *prometheus.HistogramVec

	mu        sync.Mutex
	endpoints map[string]*subjects.EndpointStats
}

// latencyBuckets suit requests and creates on this product: milliseconds
// (pool creates, execs) to minutes (builds).
var latencyBuckets = []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300}

// New returns the metrics of a worker whose state is read by state.
func New(info Info, state func() State) *Metrics {
	m := &Metrics{
		info: info, state: state, started: time.Now(), reg: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "firkin_requests_total", Help: "Requests answered, by endpoint (subject kind) and reply code (ok or the error code).",
		}, []string{"endpoint", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "firkin_request_duration_seconds", Help: "Time from a request's arrival to its reply, by endpoint.", Buckets: latencyBuckets,
		}, []string{"endpoint"}),
		creates: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "firkin_create_duration_seconds", Help: "Sandbox creates (requests and jobs) by machine source: pool, restore or boot.", Buckets: latencyBuckets,
		}, []string{"source"}),
		saves: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "firkin_snapshot_save_duration_seconds", Help: "Snapshot saves by kind (continuation, template).", Buckets: latencyBuckets,
		}, []string{"kind"}),
		saveBytes: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "firkin_snapshot_size_bytes", Help: "Sizes of saved snapshots by kind.", Buckets: prometheus.ExponentialBuckets(1<<20, 4, 10),
		}, []string{"kind"}),
		endpoints: map[string]*subjects.EndpointStats{},
	}
	m.reg.MustRegister(m.requests, m.latency, m.creates, m.saves, m.saveBytes,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		&stateCollector{m: m})
	return m
}

// ObserveRequest counts one answered request of endpoint; code is
// subjects.CodeOK or the error reply's code.
func (m *Metrics) ObserveRequest(endpoint string, code subjects.Code, d time.Duration) {
	if m == nil {
		return
	}
	m.requests.WithLabelValues(endpoint, string(code)).Inc()
	m.latency.WithLabelValues(endpoint).Observe(d.Seconds())
	m.mu.Lock()
	defer m.mu.Unlock()
	st, ok := m.endpoints[endpoint]
	if !ok {
		st = &subjects.EndpointStats{Endpoint: endpoint}
		m.endpoints[endpoint] = st
	}
	st.Requests++
	if code != subjects.CodeOK {
		st.Errors++
	}
	st.ProcessingTimeNs += d.Nanoseconds()
}

// ObserveCreate records a create served from source (pool, restore, boot).
func (m *Metrics) ObserveCreate(source string, d time.Duration) {
	if m == nil {
		return
	}
	m.creates.WithLabelValues(source).Observe(d.Seconds())
}

// ObserveSave records a snapshot save of kind and its size.
func (m *Metrics) ObserveSave(kind string, d time.Duration, sizeBytes int64) {
	if m == nil {
		return
	}
	m.saves.WithLabelValues(kind).Observe(d.Seconds())
	m.saveBytes.WithLabelValues(kind).Observe(float64(sizeBytes))
}

// Handler serves the metrics in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{MaxRequestsInFlight: 4, Timeout: 10 * time.Second})
}

// Status is the firkin.worker.status reply: the worker, its state now and
// its request counts since start.
func (m *Metrics) Status() subjects.WorkerStatusReply {
	st := m.state()
	r := subjects.WorkerStatusReply{
		WorkerID: m.info.WorkerID, Version: m.info.Version, Driver: m.info.Driver, Accelerator: m.info.Accelerator,
		StartedAt: m.started.UTC(), UptimeS: time.Since(m.started).Seconds(),
		Sandboxes: st.Sandboxes, Warm: st.Warm, VCPUs: st.VCPUs, MemoryMB: st.MemoryMB, Limits: st.Limits,
		Pool: st.Pool, QEMUProcesses: st.QEMUProcesses, LogDroppedBytes: st.LogDroppedBytes,
		Endpoints: []subjects.EndpointStats{},
	}
	m.mu.Lock()
	for _, e := range m.endpoints {
		r.Endpoints = append(r.Endpoints, *e)
	}
	m.mu.Unlock()
	sort.Slice(r.Endpoints, func(i, j int) bool { return r.Endpoints[i].Endpoint < r.Endpoints[j].Endpoint })
	if r.Pool == nil {
		r.Pool = []subjects.PoolTemplateStatus{}
	}
	return r
}

// stateCollector turns State into gauges at each scrape.
type stateCollector struct{ m *Metrics }

var (
	descSandboxes = prometheus.NewDesc("firkin_sandboxes", "Machines held, by state: active sandboxes and warm pool machines.", []string{"state"}, nil)
	descReserved  = prometheus.NewDesc("firkin_admission_reserved", "Admission ledger reservations (active plus warm), by resource.", []string{"resource"}, nil)
	descLimit     = prometheus.NewDesc("firkin_admission_limit", "Admission limits, by resource.", []string{"resource"}, nil)
	descPoolReady = prometheus.NewDesc("firkin_pool_ready", "Warm machines ready, by template.", []string{"template"}, nil)
	descPoolTgt   = prometheus.NewDesc("firkin_pool_target", "Warm pool target, by template.", []string{"template"}, nil)
	descFillTO    = prometheus.NewDesc("firkin_pool_fill_timeouts_total", "Warm fills whose machine missed a deadline and was stopped, by template.", []string{"template"}, nil)
	descQEMU      = prometheus.NewDesc("firkin_qemu_processes", "QEMU processes of this worker's state directory.", nil, nil)
	descDropped   = prometheus.NewDesc("firkin_log_dropped_bytes_total", "Log output dropped (budgets, publish failures).", nil, nil)
)

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descSandboxes, descReserved, descLimit, descPoolReady, descPoolTgt, descFillTO, descQEMU, descDropped} {
		ch <- d
	}
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.m.state()
	gauge := func(d *prometheus.Desc, v int, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, float64(v), labels...)
	}
	gauge(descSandboxes, st.Sandboxes, "active")
	gauge(descSandboxes, st.Warm, "warm")
	gauge(descReserved, st.Sandboxes+st.Warm, "sandboxes")
	gauge(descReserved, st.VCPUs, "vcpus")
	gauge(descReserved, st.MemoryMB, "memory_mb")
	gauge(descLimit, st.Limits.MaxSandboxes, "sandboxes")
	gauge(descLimit, st.Limits.MaxVCPUs, "vcpus")
	gauge(descLimit, st.Limits.MaxMemoryMB, "memory_mb")
	for _, p := range st.Pool {
		gauge(descPoolReady, p.Ready, p.TemplateID)
		gauge(descPoolTgt, p.Target, p.TemplateID)
		ch <- prometheus.MustNewConstMetric(descFillTO, prometheus.CounterValue, float64(p.FillTimeouts), p.TemplateID)
	}
	gauge(descQEMU, st.QEMUProcesses)
	ch <- prometheus.MustNewConstMetric(descDropped, prometheus.CounterValue, float64(st.LogDroppedBytes))
}
