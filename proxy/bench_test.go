package proxy

import (
	"io"
	"net/http"
	"sort"
	"strconv"
	"sync"
	"testing"
	"time"
)

// BenchmarkProxy compares small GETs sent straight to a loopback server
// with the same GETs through the proxy (with the per-route keep-alive pool,
// and with one guest stream per request), one at a time and in parallel.
// It reports requests per second and the median latency.
//
//	go test -run '^$' -bench BenchmarkProxy ./proxy
func BenchmarkProxy(b *testing.B) {
	sbx := newFakeSandboxes()
	sbx.add("sbx1", "")
	be := newBackend(b, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "ok")
	}))
	pooled := startProxy(b, sbx)
	perRequest := startProxy(b, sbx, WithMaxIdlePerRoute(0))

	direct := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	b.Cleanup(direct.CloseIdleConnections)
	cases := []struct {
		name   string
		client *http.Client
		url    string
	}{
		{"direct", direct, be.URL + "/"},
		{"proxy", proxyClient(b, pooled), proxyURL(pooled, be.port, "sbx1", "/")},
		{"proxy-no-keepalive", proxyClient(b, perRequest), proxyURL(perRequest, be.port, "sbx1", "/")},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			lat := make([]time.Duration, 0, b.N)
			start := time.Now()
			for b.Loop() {
				t0 := time.Now()
				get(b, c.client, c.url)
				lat = append(lat, time.Since(t0))
			}
			report(b, start, lat)
		})
		b.Run(c.name+"-parallel", func(b *testing.B) {
			var mu sync.Mutex
			var lat []time.Duration
			start := time.Now()
			b.RunParallel(func(pb *testing.PB) {
				var mine []time.Duration
				for pb.Next() {
					t0 := time.Now()
					get(b, c.client, c.url)
					mine = append(mine, time.Since(t0))
				}
				mu.Lock()
				lat = append(lat, mine...)
				mu.Unlock()
			})
			report(b, start, lat)
		})
	}
}

// get does one GET and drains the body.
func get(b *testing.B, c *http.Client, url string) {
	resp, err := c.Get(url)
	if err != nil {
		b.Error(err)
		return
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b.Error("status " + strconv.Itoa(resp.StatusCode))
	}
}

// report adds req/s and p50-µs metrics.
func report(b *testing.B, start time.Time, lat []time.Duration) {
	elapsed := time.Since(start)
	if len(lat) == 0 {
		return
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(len(lat))/elapsed.Seconds(), "req/s")
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
}
