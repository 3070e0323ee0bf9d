package worker_test

import (
	"net"
	"strings"
	"testing"

	"github.com/miekg/dns"

	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/worker"
)

// fakeDNS answers A queries from names on 127.0.0.1 (UDP) until the test
// ends: the upstream resolver of a worker under test, so guests' DNS never
// leaves the machine.
func fakeDNS(t *testing.T, names map[string]string) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		for _, q := range r.Question {
			if ip, ok := names[strings.TrimSuffix(strings.ToLower(q.Name), ".")]; ok && q.Qtype == dns.TypeA {
				m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 300}, A: net.ParseIP(ip)})
			}
		}
		if len(m.Answer) == 0 {
			m.Rcode = dns.RcodeNameError
		}
		_ = w.WriteMsg(m)
	})}
	go func() { _ = srv.ActivateAndServe() }()
	t.Cleanup(func() { _ = srv.Shutdown() })
	return pc.LocalAddr().String()
}

// TestEgressDomains resolves names in real guests through the network
// guard's DNS proxy (the guest asks slirp's 10.0.2.3, the QEMU's query is
// redirected to the proxy, the proxy asks the test's resolver) and checks
// that an allowlist of one domain opens exactly the addresses its answers
// named, and a denied domain does not resolve.
func TestEgressDomains(t *testing.T) {
	th := newTestHost(t)
	upstream := fakeDNS(t, map[string]string{"pkg.test": th.Public, "evil.test": th.Public2})
	e := startWorker(t, waitTemplates(), func(c *worker.Config) { c.DNSUpstream = upstream })

	def := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny"})
	if r := e.exec(def.SandboxID, "nslookup pkg.test"); !strings.Contains(r.Stdout, th.Public) {
		t.Fatalf("guest DNS with the default policy: %+v", r)
	}
	if !e.guestGet(def.SandboxID, "http://pkg.test:8080/", th.Body) {
		t.Error("default policy: a public host by name is not reached")
	}

	allow := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", Egress: &subjects.EgressPolicy{
		Deny: []string{"0.0.0.0/0", "::/0"}, Allow: []string{"pkg.test"}}})
	if !e.guestGet(allow.SandboxID, "http://pkg.test:8080/", th.Body) {
		t.Error("allowlist: the allowed domain is not reached")
	}
	if e.guestGet(allow.SandboxID, "http://"+th.Public2+":8080/", th.Body) {
		t.Error("allowlist: an address no allowed name resolved to is reached")
	}

	deny := e.create(subjects.CreateSandboxRequest{TemplateID: "tiny", Egress: &subjects.EgressPolicy{Deny: []string{"evil.test"}}})
	if r := e.exec(deny.SandboxID, "nslookup evil.test; echo rc=$?"); strings.Contains(r.Stdout, th.Public2) {
		t.Errorf("a denied domain resolved: %+v", r)
	}
	if !e.guestGet(deny.SandboxID, "http://pkg.test:8080/", th.Body) {
		t.Error("deny of one domain closed another")
	}
}
