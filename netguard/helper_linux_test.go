//go:build linux

package netguard

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// The test binary doubles as three helper programs, chosen by helperEnv:
// "echo" (a TCP and UDP echo server for a test host's network namespace),
// "probe" (run as a uid of a Guard's range: it tries the actions of
// probeEnv and prints their results as JSON) and "hold" (run as such a uid:
// it holds one TCP connection to the echo server at probeEnv, pinging it on
// demand).
const (
	helperEnv = "NETGUARD_TEST_HELPER"
	probeEnv  = "NETGUARD_TEST_PROBE"
	echoPort  = 7777
)

// probeBin is a copy of the test binary that any uid may run (go test
// builds into a directory only root may enter).
var probeBin string

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "echo":
		runEcho()
		os.Exit(0)
	case "probe":
		runProbe()
		os.Exit(0)
	case "hold":
		runHold()
		os.Exit(0)
	}
	code := func() int {
		if os.Geteuid() == 0 {
			dir, err := os.MkdirTemp("", "netguard-probe-")
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
			defer os.RemoveAll(dir)
			if err := copyExecutable(filepath.Join(dir, "probe")); err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
			probeBin = filepath.Join(dir, "probe")
		}
		return m.Run()
	}()
	os.Exit(code)
}

func copyExecutable(dst string) error {
	if err := os.Chmod(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	in, err := os.Open(self)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// runEcho serves TCP and UDP echo on every address of its namespace until
// its stdin closes (the test ended or died).
func runEcho() {
	ln, err := net.Listen("tcp", fmt.Sprintf(":%d", echoPort))
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	pc, err := net.ListenPacket("udp", fmt.Sprintf(":%d", echoPort))
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	go serveEcho(ln)
	go serveUDPEcho(pc)
	fmt.Println("ready")
	_, _ = io.Copy(io.Discard, os.Stdin)
}

func serveEcho(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(10 * time.Second))
			_, _ = io.Copy(c, io.LimitReader(c, 1024))
		}()
	}
}

func serveUDPEcho(pc net.PacketConn) {
	buf := make([]byte, 1500)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		_, _ = pc.WriteTo(buf[:n], from)
	}
}

// action is one thing a probe tries: "tcp" or "udp" to Addr (an echo
// server), or "dns" asking Server for Name's A (or AAAA with AAAA set),
// over UDP (or TCP with TCP set), or "available" calling Available.
type action struct {
	Op     string `json:"op"`
	Addr   string `json:"addr,omitempty"`
	Name   string `json:"name,omitempty"`
	AAAA   bool   `json:"aaaa,omitempty"`
	TCP    bool   `json:"tcp,omitempty"` // DNS over TCP
	Server string `json:"server,omitempty"`
}

// result is what a probe got: OK when the echo came back (or DNS answered),
// the DNS rcode and addresses, the error, and how long it took.
type result struct {
	OK      bool          `json:"ok"`
	Rcode   string        `json:"rcode,omitempty"`
	Addrs   []string      `json:"addrs,omitempty"`
	Err     string        `json:"err,omitempty"`
	Elapsed time.Duration `json:"elapsed"`
}

func runProbe() {
	var acts []action
	if err := json.Unmarshal([]byte(os.Getenv(probeEnv)), &acts); err != nil {
		fmt.Println("bad actions:", err)
		os.Exit(2)
	}
	out := make([]result, len(acts))
	for i, a := range acts {
		start := time.Now()
		out[i] = probeOne(a)
		out[i].Elapsed = time.Since(start)
	}
	_ = json.NewEncoder(os.Stdout).Encode(out)
}

// runHold connects to the echo server at probeEnv and pings it once, then
// once more for every line on stdin, printing each result as a JSON line
// (a ping fails after rejectedFast); it exits when stdin closes.
func runHold() {
	enc := json.NewEncoder(os.Stdout)
	c, err := net.DialTimeout("tcp", os.Getenv(probeEnv), 3*time.Second)
	if err != nil {
		_ = enc.Encode(result{Err: err.Error()})
		return
	}
	defer c.Close()
	in := bufio.NewScanner(os.Stdin)
	for {
		start := time.Now()
		_ = c.SetDeadline(start.Add(rejectedFast))
		r := result{OK: true}
		buf := make([]byte, 5)
		if _, err := c.Write([]byte("ping\n")); err != nil {
			r = result{Err: err.Error()}
		} else if _, err := io.ReadFull(c, buf); err != nil {
			r = result{Err: err.Error()}
		} else if string(buf) != "ping\n" {
			r = result{Err: fmt.Sprintf("echo %q", buf)}
		}
		r.Elapsed = time.Since(start)
		_ = enc.Encode(r)
		if !in.Scan() {
			return
		}
	}
}

// heldConn is a connection held by a "hold" helper.
type heldConn struct {
	in  io.WriteCloser
	out *bufio.Scanner
}

// hold starts a "hold" helper as uid connecting to addr and returns it
// with the result of its first ping; it ends with the test.
func hold(t *testing.T, uid uint32, addr string) (*heldConn, result) {
	t.Helper()
	cmd := exec.Command(probeBin)
	cmd.Env = append(os.Environ(), helperEnv+"=hold", probeEnv+"="+addr, "GORACE=atexit_sleep_ms=0")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	cmd.Dir = "/"
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		in.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	h := &heldConn{in: in, out: bufio.NewScanner(out)}
	return h, h.result(t)
}

// ping pings the held connection again.
func (h *heldConn) ping(t *testing.T) result {
	t.Helper()
	if _, err := io.WriteString(h.in, "\n"); err != nil {
		t.Fatalf("hold helper: %v", err)
	}
	return h.result(t)
}

func (h *heldConn) result(t *testing.T) result {
	t.Helper()
	if !h.out.Scan() {
		t.Fatalf("hold helper ended: %v", h.out.Err())
	}
	var r result
	if err := json.Unmarshal(h.out.Bytes(), &r); err != nil {
		t.Fatalf("hold helper output %q: %v", h.out.Bytes(), err)
	}
	return r
}

func probeOne(a action) result {
	fail := func(err error) result { return result{Err: err.Error()} }
	switch a.Op {
	case "tcp", "udp":
		c, err := net.DialTimeout(a.Op, a.Addr, 3*time.Second)
		if err != nil {
			return fail(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := c.Write([]byte("ping\n")); err != nil {
			return fail(err)
		}
		buf := make([]byte, 5)
		if _, err := io.ReadFull(c, buf); err != nil {
			return fail(err)
		}
		if string(buf) != "ping\n" {
			return fail(fmt.Errorf("echo %q", buf))
		}
		return result{OK: true}
	case "available":
		if err := Available(context.Background()); err != nil {
			return fail(err)
		}
		return result{OK: true}
	case "dns":
		m := new(dns.Msg)
		t := dns.TypeA
		if a.AAAA {
			t = dns.TypeAAAA
		}
		m.SetQuestion(dns.Fqdn(a.Name), t)
		c := dns.Client{Net: "udp", Timeout: 3 * time.Second}
		if a.TCP {
			c.Net = "tcp"
		}
		r, _, err := c.Exchange(m, a.Server)
		if err != nil {
			return fail(err)
		}
		res := result{OK: true, Rcode: dns.RcodeToString[r.Rcode]}
		for _, rr := range r.Answer {
			switch v := rr.(type) {
			case *dns.A:
				res.Addrs = append(res.Addrs, v.A.String())
			case *dns.AAAA:
				res.Addrs = append(res.Addrs, v.AAAA.String())
			}
		}
		return res
	}
	return fail(fmt.Errorf("unknown op %q", a.Op))
}

// probe runs acts as uid (gid the same number) and returns their results.
func probe(t *testing.T, uid uint32, acts ...action) []result {
	t.Helper()
	data, err := json.Marshal(acts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(len(acts))*10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, probeBin)
	// GORACE: a race-enabled binary otherwise waits a second at exit.
	cmd.Env = append(os.Environ(), helperEnv+"=probe", probeEnv+"="+string(data), "GORACE=atexit_sleep_ms=0")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	cmd.Dir = "/"
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("probe as uid %d: %v: %s%s", uid, err, out, ee.Stderr)
		}
		t.Fatalf("probe as uid %d: %v", uid, err)
	}
	var res []result
	if err := json.Unmarshal(out, &res); err != nil || len(res) != len(acts) {
		t.Fatalf("probe output %q: %v", out, err)
	}
	return res
}

// testHost is a network namespace joined to the host by a veth pair, with
// private, link-local, "public" (documentation ranges, routed only to this
// veth) and ULA addresses, running a TCP and UDP echo server on echoPort.
type testHost struct {
	ns                 string
	hostPriv4, hostLL4 netip.Addr // the host's side (host addresses)
	priv4, ll4, pub4   netip.Addr // the namespace's side
	ula6, pub6         netip.Addr
}

func (h *testHost) at(a netip.Addr) string {
	return netip.AddrPortFrom(a, echoPort).String()
}

// newTestHost creates a test host; everything goes with the test.
func newTestHost(t *testing.T) *testHost {
	t.Helper()
	suffix := fmt.Sprintf("%06x", rand.Uint32()&0xffffff)
	r, k := rand.IntN(256), rand.IntN(64)
	v4 := func(a, b, c, last int) netip.Addr {
		return netip.AddrFrom4([4]byte{byte(a), byte(b), byte(c), byte(last)})
	}
	h := &testHost{
		ns:        "ngt" + suffix,
		hostPriv4: v4(10, 231, r, 4*k+1), priv4: v4(10, 231, r, 4*k+2),
		hostLL4: v4(169, 254, r, 4*k+1), ll4: v4(169, 254, r, 4*k+2),
		pub4: v4(203, 0, 113, 4*k+2),
		ula6: netip.MustParseAddr(fmt.Sprintf("fd31:%x:%x::2", r, k)),
		pub6: netip.MustParseAddr(fmt.Sprintf("2001:db8:%x:%x::2", r, k)),
	}
	hostIf, nsIf := "ngh"+suffix, "ngn"+suffix
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	if out, _ := exec.Command("ip", "-o", "addr", "show").Output(); strings.Contains(string(out), " 203.0.113."+fmt.Sprint(4*k+1)+"/") {
		t.Fatalf("test host addresses 203.0.113.%d/30 already in use (a parallel run?); run again", 4*k+1)
	}
	ip("netns", "add", h.ns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", h.ns).Run() })
	ip("link", "add", hostIf, "type", "veth", "peer", "name", nsIf, "netns", h.ns)
	t.Cleanup(func() { _ = exec.Command("ip", "link", "del", hostIf).Run() })
	for _, a := range []string{h.hostPriv4.String() + "/30", h.hostLL4.String() + "/30", v4(203, 0, 113, 4*k+1).String() + "/30"} {
		ip("addr", "add", a, "dev", hostIf)
	}
	for _, a := range []netip.Addr{h.ula6, h.pub6} {
		ip("-6", "addr", "add", a.Prev().String()+"/64", "dev", hostIf, "nodad")
	}
	ip("link", "set", hostIf, "up")
	for _, a := range []netip.Addr{h.priv4, h.ll4, h.pub4} {
		ip("-n", h.ns, "addr", "add", a.String()+"/30", "dev", nsIf)
	}
	for _, a := range []netip.Addr{h.ula6, h.pub6} {
		ip("-n", h.ns, "-6", "addr", "add", a.String()+"/64", "dev", nsIf, "nodad")
	}
	ip("-n", h.ns, "link", "set", "lo", "up")
	ip("-n", h.ns, "link", "set", nsIf, "up")

	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("ip", "netns", "exec", h.ns, self)
	cmd.Env = append(os.Environ(), helperEnv+"=echo")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	ready := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		ready <- line
	}()
	select {
	case line := <-ready:
		if strings.TrimSpace(line) != "ready" {
			t.Fatalf("echo server in %s: %q", h.ns, line)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("echo server in %s did not start", h.ns)
	}
	waitReachable(t, h.at(h.priv4), h.at(h.pub6))
	return h
}

// waitReachable waits (bounded) until root reaches every addr: veth links
// and IPv6 addresses take a moment to come up.
func waitReachable(t *testing.T, addrs ...string) {
	t.Helper()
	for _, addr := range addrs {
		deadline := time.Now().Add(10 * time.Second)
		for {
			if r := probeOne(action{Op: "tcp", Addr: addr}); r.OK {
				break
			} else if time.Now().After(deadline) {
				t.Fatalf("test host %s not reachable as root: %s", addr, r.Err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// echoListener serves TCP echo on addr (host:0 picks a port) for the test.
func echoListener(t *testing.T, addr string) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go serveEcho(ln)
	return ln
}
