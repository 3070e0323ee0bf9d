package worker_test

import (
	"bufio"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/firkin-dev/firkin-worker/embedded"
	"github.com/firkin-dev/firkin-worker/internal/testenv"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/worker"
)

// startHTTPD runs busybox httpd on port in the sandbox and waits until it answers.
func (e *env) startHTTPD(id string, port int) {
	e.t.Helper()
	e.exec(id, fmt.Sprintf("mkdir -p /srv && echo hello-from-%s > /srv/index.html && httpd -p %d -h /srv", id, port))
	eventually(e.t, 20*time.Second, "httpd up", func() error {
		r := e.exec(id, fmt.Sprintf("wget -q -O- http://127.0.0.1:%d/", port))
		if !strings.HasPrefix(r.Stdout, "hello-from-") {
			return fmt.Errorf("wget: %+v", r)
		}
		return nil
	})
}

func httpGet(t *testing.T, url string, header map[string]string) (int, string) {
	t.Helper()
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// TestPortRouting reaches servers inside a sandbox through the worker's
// proxy (by host name and by headers), a raw TCP route, and a WebSocket.
func TestPortRouting(t *testing.T) {
	e := startWorker(t, waitTemplates())
	sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
	e.startHTTPD(sb.SandboxID, 8000)
	route, err := e.c.Route(e.ctx(10*time.Second), sb.SandboxID, 8000)
	if err != nil {
		t.Fatal(err)
	}
	if route.Host != "8000-"+sb.SandboxID+".localhost" || !strings.HasPrefix(route.URL, "http://"+route.Host+":") || route.TCP == "" {
		t.Fatalf("route reply = %+v", route)
	}
	if host, _, _ := net.SplitHostPort(route.TCP); host != "127.0.0.1" {
		t.Errorf("raw TCP route of a public sandbox listens on %s, want loopback", route.TCP)
	}
	want := "hello-from-" + sb.SandboxID + "\n"
	proxyPort := route.URL[strings.LastIndex(route.URL, ":")+1:]
	proxyAddr := "127.0.0.1:" + proxyPort

	t.Run("by host name", func(t *testing.T) {
		req, _ := http.NewRequest("GET", "http://"+proxyAddr+"/", nil)
		req.Host = route.Host
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(body) != want {
			t.Fatalf("%d %q", resp.StatusCode, body)
		}
	})
	t.Run("by headers", func(t *testing.T) {
		code, body := httpGet(t, "http://"+proxyAddr+"/", map[string]string{"e2b-sandbox-id": sb.SandboxID, "e2b-sandbox-port": "8000"})
		if code != 200 || body != want {
			t.Fatalf("%d %q", code, body)
		}
	})
	t.Run("50 concurrent requests", func(t *testing.T) {
		var wg sync.WaitGroup
		errs := make(chan error, 50)
		for range 50 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				req, _ := http.NewRequest("GET", "http://"+proxyAddr+"/", nil)
				req.Host = route.Host
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					errs <- err
					return
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || string(body) != want {
					errs <- fmt.Errorf("%d %q", resp.StatusCode, body)
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})
	t.Run("errors say which", func(t *testing.T) {
		for _, tc := range []struct {
			host string
			code int
		}{
			{"8000-nosuchsandbox.localhost", 404},
			{"9999-" + sb.SandboxID + ".localhost", 502},
			{"notaport-" + sb.SandboxID + ".localhost", 400},
		} {
			req, _ := http.NewRequest("GET", "http://"+proxyAddr+"/", nil)
			req.Host = tc.host
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.code || len(body) == 0 {
				t.Errorf("%s: %d %q, want %d with a body", tc.host, resp.StatusCode, body, tc.code)
			}
		}
	})
	t.Run("raw TCP route carries a line protocol", func(t *testing.T) {
		// A line echo server: busybox nc runs cat for each connection.
		e.exec(sb.SandboxID, "(while true; do nc -l -p 7000 -e cat; done) >/dev/null 2>&1 &")
		tcp, err := e.c.Route(e.ctx(10*time.Second), sb.SandboxID, 7000)
		if err != nil {
			t.Fatal(err)
		}
		var conn net.Conn
		eventually(t, 20*time.Second, "line echo through the TCP route", func() error {
			c, err := net.DialTimeout("tcp", tcp.TCP, 5*time.Second)
			if err != nil {
				return err
			}
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.WriteString(c, "ping 1\n"); err != nil {
				c.Close()
				return err
			}
			line, err := bufio.NewReader(c).ReadString('\n')
			if err != nil || line != "ping 1\n" {
				c.Close()
				return fmt.Errorf("read %q, %v", line, err)
			}
			conn = c
			return nil
		})
		defer conn.Close()
		r := bufio.NewReader(conn)
		for i := 2; i <= 5; i++ {
			fmt.Fprintf(conn, "ping %d\n", i)
			line, err := r.ReadString('\n')
			if err != nil || line != fmt.Sprintf("ping %d\n", i) {
				t.Fatalf("line %d: %q %v", i, line, err)
			}
		}
	})
	t.Run("websocket echo", func(t *testing.T) {
		bin := testenv.StaticBinary(t, runtime.GOARCH, "./worker/testdata/wsecho")
		data, err := os.ReadFile(bin)
		if err != nil {
			t.Fatal(err)
		}
		r, err := e.c.Exec(e.ctx(2*time.Minute), sb.SandboxID, subjects.ExecRequest{
			Command: "base64 -d > /root/wsecho && chmod +x /root/wsecho && (/root/wsecho 9000 >/dev/null 2>&1 &) && echo ok",
			Stdin:   base64.StdEncoding.EncodeToString(data),
		})
		if err != nil || r.Stdout != "ok\n" {
			t.Fatalf("install wsecho: %+v %v", r, err)
		}
		ws, err := e.c.Route(e.ctx(10*time.Second), sb.SandboxID, 9000)
		if err != nil {
			t.Fatal(err)
		}
		var c *websocket.Conn
		eventually(t, 30*time.Second, "websocket dial", func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			conn, _, err := websocket.Dial(ctx, "ws://"+proxyAddr+"/", &websocket.DialOptions{Host: ws.Host})
			c = conn
			return err
		})
		defer c.CloseNow()
		for i := range 5 {
			msg := "message " + strconv.Itoa(i)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			if err := c.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
				cancel()
				t.Fatal(err)
			}
			_, got, err := c.Read(ctx)
			cancel()
			if err != nil || string(got) != msg {
				t.Fatalf("echo %d: %q %v", i, got, err)
			}
		}
	})

	if err := e.c.Kill(e.ctx(time.Minute), sb.SandboxID); err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest("GET", "http://"+proxyAddr+"/", nil)
	req.Host = route.Host
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 404 {
		t.Errorf("after kill: %d, want 404", resp.StatusCode)
	}
	if c, err := net.DialTimeout("tcp", route.TCP, time.Second); err == nil {
		c.Close()
		t.Errorf("TCP route still accepts after kill")
	}
}

// connectVia sends a CONNECT for host through the proxy at proxyAddr, with
// the traffic token when tok is not empty, and returns the conn, its reader
// (past the answer's header on a 200) and the status line.
func connectVia(t *testing.T, proxyAddr, host, tok string) (net.Conn, *bufio.Reader, string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", proxyAddr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	req := "CONNECT " + host + ":443 HTTP/1.1\r\nHost: " + host + ":443\r\n"
	if tok != "" {
		req += "e2b-traffic-access-token: " + tok + "\r\n"
	}
	if _, err := io.WriteString(c, req+"\r\n"); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	status, err := br.ReadString('\n')
	if err != nil {
		t.Fatalf("CONNECT %s: %v", host, err)
	}
	if strings.HasPrefix(status, "HTTP/1.1 200") {
		if blank, err := br.ReadString('\n'); err != nil || blank != "\r\n" {
			t.Fatalf("CONNECT %s: after the status line %q, %v", host, blank, err)
		}
	}
	return c, br, status
}

// TestPrivateTraffic enforces the traffic token of a sandbox created with
// public_traffic false: no raw TCP listener, the proxy (HTTP and CONNECT)
// takes only the current instance's token, the token comes back from
// create only (never from get, list, timeout, the KV record or any other
// NATS message), and a killed sandbox's token does not open a new sandbox
// with the same id. It also hits the cap on routes per sandbox.
func TestPrivateTraffic(t *testing.T) {
	e := startWorker(t, waitTemplates())
	// Every NATS message from here on that some identity may see, on
	// connections of their own, to find where tokens travel: requests, logs
	// and events (the worker service's view), the worker's own replies, and
	// replies to clients (the client's).
	msgs := make(chan *nats.Msg, 1<<16)
	var spies []*nats.Subscription
	for _, sp := range []struct {
		nc   *nats.Conn
		subj []string
	}{
		{e.serviceConn(), []string{"firkin.>"}},
		{e.workerConn(), []string{embedded.WorkerInboxPrefix + ".>"}},
		{e.clientConn(), []string{"_INBOX.>"}},
	} {
		for _, subj := range sp.subj {
			sub, err := sp.nc.ChanSubscribe(subj, msgs)
			if err != nil {
				t.Fatal(err)
			}
			spies = append(spies, sub)
		}
		if err := sp.nc.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	unsubscribe := func() {
		for _, sub := range spies {
			_ = sub.Unsubscribe()
		}
	}
	const id = "private-sbx"
	private := false
	sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", SandboxID: id, PublicTraffic: &private})
	// The spies would answer for a sandbox that is gone (a subscriber to
	// "firkin.>" is a responder): they stop before the cleanup kills sb.
	t.Cleanup(unsubscribe)
	if sb.TrafficAccessToken == "" || sb.Generation == "" {
		t.Fatalf("create reply carries no token or generation: %+v", sb)
	}
	e.startHTTPD(id, 8000)
	var rawRoute map[string]any
	if err := e.c.Request(e.ctx(10*time.Second), subjects.Default.Sandbox(id, subjects.VerbRoute), subjects.RouteRequest{Port: 8000}, &rawRoute); err != nil {
		t.Fatal(err)
	}
	if _, ok := rawRoute["tcp"]; ok {
		t.Errorf("route reply of a private sandbox has a tcp field: %v", rawRoute)
	}
	route, err := e.c.Route(e.ctx(10*time.Second), id, 8000)
	if err != nil {
		t.Fatal(err)
	}
	proxyAddr := "127.0.0.1:" + route.URL[strings.LastIndex(route.URL, ":")+1:]
	hdr := func(tok string) map[string]string {
		h := map[string]string{"e2b-sandbox-id": id, "e2b-sandbox-port": "8000"}
		if tok != "" {
			h["e2b-traffic-access-token"] = tok
		}
		return h
	}
	if code, _ := httpGet(t, "http://"+proxyAddr+"/", hdr("")); code != 401 {
		t.Errorf("no token: %d, want 401", code)
	}
	if code, _ := httpGet(t, "http://"+proxyAddr+"/", hdr("wrong")); code != 403 {
		t.Errorf("wrong token: %d, want 403", code)
	}
	if code, body := httpGet(t, "http://"+proxyAddr+"/", hdr(sb.TrafficAccessToken)); code != 200 || body != "hello-from-"+id+"\n" {
		t.Errorf("right token: %d %q", code, body)
	}

	t.Run("CONNECT carries any protocol with the token only", func(t *testing.T) {
		if _, _, status := connectVia(t, proxyAddr, route.Host, ""); !strings.HasPrefix(status, "HTTP/1.1 401") {
			t.Errorf("CONNECT without token: %q, want 401", status)
		}
		c, br, status := connectVia(t, proxyAddr, route.Host, sb.TrafficAccessToken)
		if !strings.HasPrefix(status, "HTTP/1.1 200") {
			t.Fatalf("CONNECT with the token: %q, want 200", status)
		}
		// Anything may go through the tunnel; here a hand-written HTTP/1.0.
		if _, err := io.WriteString(c, "GET / HTTP/1.0\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		if got, err := io.ReadAll(br); !strings.Contains(string(got), "hello-from-"+id) {
			t.Errorf("through the tunnel: %q, %v", got, err)
		}
	})

	t.Run("get, list, timeout and the KV record carry no token", func(t *testing.T) {
		got, err := e.c.Get(e.ctx(10*time.Second), id)
		if err != nil || got.TrafficAccessToken != "" || got.Generation != sb.Generation {
			t.Errorf("get = %+v, %v; want no token and the create's generation", got, err)
		}
		list, err := e.c.List(e.ctx(10 * time.Second))
		if err != nil || len(list) == 0 {
			t.Fatalf("list = %v, %v", list, err)
		}
		for _, item := range list {
			if item.TrafficAccessToken != "" {
				t.Errorf("list item %s carries a token", item.SandboxID)
			}
		}
		to, err := e.c.SetTimeout(e.ctx(10*time.Second), id, 600)
		if err != nil || to.TrafficAccessToken != "" {
			t.Errorf("timeout = %+v, %v; want no token", to, err)
		}
		js, err := jetstream.New(e.nc)
		if err != nil {
			t.Fatal(err)
		}
		kv, err := js.KeyValue(e.ctx(10*time.Second), "firkin_sessions")
		if err != nil {
			t.Fatal(err)
		}
		entry, err := kv.Get(e.ctx(10*time.Second), id)
		if err != nil {
			t.Fatal(err)
		}
		if v := string(entry.Value()); strings.Contains(v, sb.TrafficAccessToken) || strings.Contains(v, "access_token") || !strings.Contains(v, sb.Generation) {
			t.Errorf("session record %s: want the generation and no token", v)
		}
	})

	t.Run("routes per sandbox are capped", func(t *testing.T) {
		for port := 8001; port < 8016; port++ { // 8000 is open: 16 in all
			if _, err := e.c.Route(e.ctx(10*time.Second), id, port); err != nil {
				t.Fatalf("route %d: %v", port, err)
			}
		}
		_, err := e.c.Route(e.ctx(10*time.Second), id, 8016)
		wantCode(t, "17th route", err, subjects.CodeCapacityRejected)
		if _, err := e.c.Route(e.ctx(10*time.Second), id, 8000); err != nil {
			t.Errorf("an open route asked again: %v", err)
		}
	})

	// Kill it and create it again with the same id: a new instance.
	if err := e.c.Kill(e.ctx(time.Minute), id); err != nil {
		t.Fatal(err)
	}
	sb2 := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", SandboxID: id, PublicTraffic: &private})
	if sb2.TrafficAccessToken == "" || sb2.TrafficAccessToken == sb.TrafficAccessToken || sb2.Generation == sb.Generation {
		t.Fatalf("re-created sandbox: token %q generation %q; want new ones (old %q, %q)", sb2.TrafficAccessToken, sb2.Generation, sb.TrafficAccessToken, sb.Generation)
	}
	e.startHTTPD(id, 8000)
	if code, body := httpGet(t, "http://"+proxyAddr+"/", hdr(sb.TrafficAccessToken)); code != 403 {
		t.Errorf("the killed sandbox's token on the new one: %d %q, want 403", code, body)
	}
	if _, _, status := connectVia(t, proxyAddr, route.Host, sb.TrafficAccessToken); !strings.HasPrefix(status, "HTTP/1.1 403") {
		t.Errorf("CONNECT with the killed sandbox's token: %q, want 403", status)
	}
	if code, body := httpGet(t, "http://"+proxyAddr+"/", hdr(sb2.TrafficAccessToken)); code != 200 || body != "hello-from-"+id+"\n" {
		t.Errorf("the new token: %d %q", code, body)
	}

	// Each token travelled in exactly one NATS message: its create reply.
	time.Sleep(500 * time.Millisecond) // the last messages in flight
	unsubscribe()
	counts := map[string][]string{}
	for len(msgs) > 0 {
		msg := <-msgs
		for _, tok := range []string{sb.TrafficAccessToken, sb2.TrafficAccessToken} {
			if strings.Contains(string(msg.Data), tok) {
				counts[tok] = append(counts[tok], msg.Subject)
			}
		}
	}
	for _, tok := range []string{sb.TrafficAccessToken, sb2.TrafficAccessToken} {
		if subs := counts[tok]; len(subs) != 1 || !strings.HasPrefix(subs[0], "_INBOX.") {
			t.Errorf("a token went out in messages on %v, want only its create reply (one _INBOX message)", subs)
		}
	}
}

// TestGuestNetwork reaches a server on the host's loopback from the guest
// only where the create allowed that port (egress "host:PORT"), and not at
// all with "network": false.
func TestGuestNetwork(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "host-says-hi") })}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	port := ln.Addr().(*net.TCPAddr).Port
	e := startWorker(t, waitTemplates(), func(c *worker.Config) { c.EgressHostPorts = strconv.Itoa(port) })
	url := fmt.Sprintf("http://10.0.2.2:%d/", port)

	def := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
	// (busybox's wget -T crashes in the static build; timeout(1) bounds it.)
	if r := e.exec(def.SandboxID, "timeout 10 wget -q -O- "+url+"; echo rc=$?"); strings.Contains(r.Stdout, "host-says-hi") {
		t.Errorf("guest with the default policy reached the host: %+v", r)
	}
	on := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", Egress: &subjects.EgressPolicy{Allow: []string{fmt.Sprintf("host:%d", port)}}})
	if r := e.exec(on.SandboxID, "timeout 10 wget -q -O- "+url); r.Stdout != "host-says-hi" {
		t.Errorf("guest allowed host:%d: %+v", port, r)
	}
	_, err = e.c.Create(e.ctx(time.Minute), subjects.CreateSandboxRequest{TemplateID: "tiny", Egress: &subjects.EgressPolicy{Allow: []string{fmt.Sprintf("host:%d", port+1)}}})
	wantCode(t, "a host port the operator did not list", err, subjects.CodeInvalidRequest)
	off := false
	sb := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", Network: &off})
	if r := e.exec(sb.SandboxID, "timeout 5 wget -q -O- "+url+"; echo rc=$?"); strings.Contains(r.Stdout, "host-says-hi") || strings.Contains(r.Stdout, "rc=0") {
		t.Errorf("guest without network reached the host: %+v", r)
	}
}
