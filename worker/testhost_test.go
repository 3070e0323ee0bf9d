package worker_test

import (
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// testHost is a host of the test's own: a network namespace joined to the
// host by a veth pair, with a private and a link-local address, serving
// HTTP on port 8080 with busybox httpd. Guests are pointed at it instead of
// any real internal or outside address.
type testHost struct {
	ns        string
	Private   string // its address in 10.0.0.0/8
	LinkLocal string // its address in 169.254.0.0/16
	// Public and Public2 are addresses in 198.51.100.0/24 (TEST-NET-2, a
	// documentation range the guard treats as public), routed to this test
	// host only.
	Public, Public2 string
	Body            string // what GET / answers
}

const testHostPort = 8080

// newTestHost makes a test host and removes it when the test ends.
func newTestHost(t *testing.T) *testHost {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("test hosts in network namespaces need root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("test hosts need iproute2 (ip)")
	}
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	suffix := fmt.Sprintf("%02x%02x%02x", b[0], b[1], b[2])
	// 10.214.X.Y/30 and 169.254.214.Z/30: one /30 each, picked at random so
	// that parallel test binaries do not collide.
	x, y, z := int(b[0]), int(b[1]&0xfc), 200+int(b[2]%50)
	h := &testHost{
		ns:        "fkth-" + suffix,
		Private:   fmt.Sprintf("10.214.%d.%d", x, y+2),
		LinkLocal: fmt.Sprintf("169.254.%d.%d", z, y+2),
		Public:    fmt.Sprintf("198.51.100.%d", y+2),
		Public2:   fmt.Sprintf("198.51.100.%d", y+3),
		Body:      "test-host-" + suffix,
	}
	hostIf, nsIf := "fkh"+suffix, "fkn"+suffix
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	run("netns", "add", h.ns)
	t.Cleanup(func() {
		// Deleting the namespace ends its veth end, and so the pair.
		_ = exec.Command("ip", "netns", "pids", h.ns).Run()
		if out, err := exec.Command("ip", "netns", "del", h.ns).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", h.ns, err, out)
		}
		_ = exec.Command("ip", "link", "del", hostIf).Run()
	})
	run("link", "add", hostIf, "type", "veth", "peer", "name", nsIf)
	run("link", "set", nsIf, "netns", h.ns)
	run("addr", "add", fmt.Sprintf("10.214.%d.%d/30", x, y+1), "dev", hostIf)
	run("addr", "add", fmt.Sprintf("169.254.%d.%d/30", z, y+1), "dev", hostIf)
	run("addr", "add", fmt.Sprintf("198.51.100.%d/30", y+1), "dev", hostIf)
	run("link", "set", hostIf, "up")
	run("-n", h.ns, "addr", "add", h.Private+"/30", "dev", nsIf)
	run("-n", h.ns, "addr", "add", h.LinkLocal+"/30", "dev", nsIf)
	run("-n", h.ns, "addr", "add", h.Public+"/30", "dev", nsIf)
	run("-n", h.ns, "addr", "add", h.Public2+"/32", "dev", nsIf)
	run("-n", h.ns, "link", "set", nsIf, "up")
	run("-n", h.ns, "link", "set", "lo", "up")

	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "index.html"), []byte(h.Body), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("ip", "netns", "exec", h.ns, "busybox", "httpd", "-f", "-p", fmt.Sprint(testHostPort), "-h", root)
	if err := cmd.Start(); err != nil {
		t.Fatalf("start the test host's httpd: %v", err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	// The server is up when the test (root, not a guest) reaches it.
	hc := &http.Client{Timeout: time.Second}
	eventually(t, 10*time.Second, "test host httpd up", func() error {
		resp, err := hc.Get(h.URL(h.Private))
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		if string(body) != h.Body {
			return fmt.Errorf("GET answered %q", body)
		}
		return nil
	})
	return h
}

// URL is the test host's HTTP address at addr (h.Private or h.LinkLocal).
func (h *testHost) URL(addr string) string { return fmt.Sprintf("http://%s:%d/", addr, testHostPort) }
