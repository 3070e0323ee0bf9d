package worker

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/firkin-dev/firkin-worker/embedded"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// lockedBuffer collects log output written from several goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// connectOnly runs the worker's NATS step alone (no driver, no VMs).
func connectOnly(t *testing.T, cfg Config) (*Worker, *lockedBuffer, error) {
	t.Helper()
	logs := &lockedBuffer{}
	cfg.NATSListen = "127.0.0.1:-1"
	if err := cfg.validateNATS(); err != nil {
		return nil, logs, err
	}
	w := &Worker{cfg: cfg, id: "wtest", log: slog.New(slog.NewTextHandler(logs, nil))}
	if err := w.connect(subjects.Default); err != nil {
		return nil, logs, err
	}
	t.Cleanup(w.closeNATS)
	return w, logs, nil
}

func TestEmbeddedNATSNkeyIdentities(t *testing.T) {
	state := t.TempDir()
	w, _, err := connectOnly(t, Config{StateDir: state})
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{WorkerSeedFile, ServiceSeedFile, ClientSeedFile} {
		fi, err := os.Stat(filepath.Join(state, name))
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v %v, want mode 0600", name, fi, err)
		}
	}
	if w.ClientNkeyFile() != filepath.Join(state, ClientSeedFile) {
		t.Errorf("ClientNkeyFile = %q", w.ClientNkeyFile())
	}
	url := w.NATSURL()
	if nc, err := nats.Connect(url); !errors.Is(err, nats.ErrAuthorization) {
		if nc != nil {
			nc.Close()
		}
		t.Fatalf("anonymous client: %v, want an authorization violation", err)
	}
	violations := make(chan error, 8)
	cl, err := nats.Connect(url, append(w.ClientOptions(), nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) { violations <- err }))...)
	if err != nil {
		t.Fatalf("client identity: %v", err)
	}
	defer cl.Close()

	// Separate identities: the worker's store connection publishes logs the
	// client follows; the client may not publish them.
	sub, err := cl.SubscribeSync("firkin.logs.>")
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := w.storeNC.Publish("firkin.logs.sb1", []byte("from the worker")); err != nil {
		t.Fatal(err)
	}
	if m, err := sub.NextMsg(3 * time.Second); err != nil || string(m.Data) != "from the worker" {
		t.Fatalf("worker log publish: %v %v", m, err)
	}
	if err := cl.Publish("firkin.logs.sb1", []byte("forged")); err != nil {
		t.Fatal(err)
	}
	_ = cl.Flush()
	select {
	case err := <-violations:
		if !errors.Is(err, nats.ErrPermissionViolation) || !strings.Contains(err.Error(), `"firkin.logs.sb1"`) {
			t.Errorf("client log publish: %v", err)
		}
	case <-time.After(3 * time.Second):
		t.Error("client published to firkin.logs.sb1 without a permissions violation")
	}
	if m, err := sub.NextMsg(200 * time.Millisecond); err == nil {
		t.Errorf("forged log delivered: %q", m.Data)
	}

	// A later start reuses both identities.
	before, _ := os.ReadFile(filepath.Join(state, ClientSeedFile))
	cl.Close()
	w.closeNATS()
	w2, _, err := connectOnly(t, Config{StateDir: state})
	if err != nil {
		t.Fatal(err)
	}
	after, _ := os.ReadFile(filepath.Join(state, ClientSeedFile))
	if string(before) != string(after) {
		t.Error("client.nk was replaced on restart")
	}
	cl2, err := nats.Connect(w2.NATSURL(), w2.ClientOptions()...)
	if err != nil {
		t.Fatalf("client identity after restart: %v", err)
	}
	cl2.Close()
}

func TestEmbeddedNATSRefusesBadSeeds(t *testing.T) {
	state := t.TempDir()
	if err := os.WriteFile(filepath.Join(state, ClientSeedFile), []byte("SUAM...\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := connectOnly(t, Config{StateDir: state}); err == nil || !strings.Contains(err.Error(), "others may read it") {
		t.Errorf("world-readable client.nk: %v", err)
	}
	if err := os.Chmod(filepath.Join(state, ClientSeedFile), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := connectOnly(t, Config{StateDir: state}); err == nil || !strings.Contains(err.Error(), "not an nkey seed") {
		t.Errorf("garbage client.nk: %v", err)
	}
	// The same seed for both identities is refused.
	kp, _ := nkeys.CreateUser()
	seed, _ := kp.Seed()
	for _, name := range []string{WorkerSeedFile, ClientSeedFile} {
		if err := os.WriteFile(filepath.Join(state, name), append(seed, '\n'), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := connectOnly(t, Config{StateDir: state}); err == nil || !strings.Contains(err.Error(), "hold the same nkey") {
		t.Errorf("one identity for both: %v", err)
	}
}

func TestEmbeddedNATSAuthNoneWarns(t *testing.T) {
	state := t.TempDir()
	w, logs, err := connectOnly(t, Config{StateDir: state, NATSAuth: NATSAuthNone})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), "level=WARN") || !strings.Contains(logs.String(), "anonymous clients") {
		t.Errorf("no warning logged:\n%s", logs.String())
	}
	if w.ClientNkeyFile() != "" || w.ClientOptions() != nil {
		t.Errorf("client options without auth: %q", w.ClientNkeyFile())
	}
	nc, err := nats.Connect(w.NATSURL())
	if err != nil {
		t.Fatalf("anonymous client with --nats-auth=none: %v", err)
	}
	defer nc.Close()
	if _, err := os.Stat(filepath.Join(state, ClientSeedFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("client.nk made with --nats-auth=none: %v", err)
	}
}

func TestValidateNATS(t *testing.T) {
	dir := t.TempDir()
	file := func(name string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	creds, seed, ca, cert, key := file("a.creds"), file("a.nk"), file("ca.pem"), file("c.pem"), file("k.pem")
	const url = "nats://nats-1:4222"
	ok := []Config{
		{},
		{NATSAuth: NATSAuthNone},
		{NATSURL: url},
		{NATSURL: url, NATSCreds: creds},
		{NATSURL: url, NATSNkey: seed, NATSTLSCA: ca},
		{NATSURL: url, NATSUser: "worker", NATSPassword: "pw", NATSTLSCA: ca, NATSTLSCert: cert, NATSTLSKey: key},
		{NATSURL: url, NATSTLSCert: cert, NATSTLSKey: key},
		{NATSURL: url, NATSNkey: seed, NATSServiceNkey: file("service.nk")},
		{NATSURL: url, NATSCreds: creds, NATSServiceCreds: file("service.creds"), NATSTLSCA: ca},
		{NATSURL: url, NATSUser: "worker", NATSPassword: "pw", NATSServiceNkey: seed},
		{NATSURL: url, NATSServiceCreds: creds},
	}
	for _, c := range ok {
		if err := c.validateNATS(); err != nil {
			t.Errorf("%+v: %v", c, err)
		}
	}
	bad := map[string]Config{
		"unknown auth":           {NATSAuth: "token"},
		"none with external":     {NATSURL: url, NATSAuth: NATSAuthNone},
		"creds without url":      {NATSCreds: creds},
		"tls without url":        {NATSTLSCA: ca},
		"password without url":   {NATSPassword: "pw"},
		"creds and nkey":         {NATSURL: url, NATSCreds: creds, NATSNkey: seed},
		"nkey and user":          {NATSURL: url, NATSNkey: seed, NATSUser: "u", NATSPassword: "p"},
		"user without password":  {NATSURL: url, NATSUser: "u"},
		"password without user":  {NATSURL: url, NATSPassword: "p"},
		"cert without key":       {NATSURL: url, NATSTLSCert: cert},
		"key without cert":       {NATSURL: url, NATSTLSKey: key},
		"missing creds file":     {NATSURL: url, NATSCreds: filepath.Join(dir, "nope.creds")},
		"missing ca file":        {NATSURL: url, NATSTLSCA: filepath.Join(dir, "nope.pem")},
		"missing cert and key":   {NATSURL: url, NATSTLSCert: filepath.Join(dir, "n1"), NATSTLSKey: filepath.Join(dir, "n2")},
		"nkey seed without url":  {NATSNkey: seed},
		"user and tls, no url":   {NATSUser: "u", NATSPassword: "p", NATSTLSCert: cert, NATSTLSKey: key},
		"creds, user, and creds": {NATSURL: url, NATSCreds: creds, NATSUser: "u", NATSPassword: "p"},
		"service creds, no url":  {NATSServiceCreds: creds},
		"service nkey, no url":   {NATSServiceNkey: seed},
		"two service identities": {NATSURL: url, NATSNkey: seed, NATSServiceCreds: creds, NATSServiceNkey: file("s2.nk")},
		"missing service nkey":   {NATSURL: url, NATSServiceNkey: filepath.Join(dir, "nope.nk")},
		"missing service creds":  {NATSURL: url, NATSServiceCreds: filepath.Join(dir, "nope.creds")},
		"same nkey file":         {NATSURL: url, NATSNkey: seed, NATSServiceNkey: dir + "/./a.nk"},
		"same creds file":        {NATSURL: url, NATSCreds: creds, NATSServiceCreds: creds},
		"service nkey, none":     {NATSURL: url, NATSAuth: NATSAuthNone, NATSServiceNkey: seed},
	}
	for name, c := range bad {
		err := c.validateNATS()
		if err == nil {
			t.Errorf("%s: accepted", name)
			continue
		}
		if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%s: %v is not invalid argument", name, err)
		}
	}
	// The external nkey seed is checked like the embedded server's.
	loose := filepath.Join(dir, "loose.nk")
	kp, _ := nkeys.CreateUser()
	s, _ := kp.Seed()
	if err := os.WriteFile(loose, s, 0o644); err != nil {
		t.Fatal(err)
	}
	quiet := slog.New(slog.DiscardHandler)
	for _, c := range []Config{{NATSURL: url, NATSNkey: loose}, {NATSURL: url, NATSServiceNkey: loose}} {
		w := &Worker{cfg: c, log: quiet}
		if _, _, err := w.externalOptions(); err == nil || !strings.Contains(err.Error(), "others may read it") {
			t.Errorf("world-readable seed %+v: %v", c, err)
		}
	}
	// Two files holding the same seed are one identity.
	copied := filepath.Join(dir, "copy.nk")
	if err := os.WriteFile(copied, s, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(loose, 0o600); err != nil {
		t.Fatal(err)
	}
	w := &Worker{cfg: Config{NATSURL: url, NATSNkey: loose, NATSServiceNkey: copied}, log: quiet}
	if err := w.cfg.validateNATS(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := w.externalOptions(); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "same nkey") {
		t.Errorf("one seed in two files: %v", err)
	}
}

// TestExternalNATSCredentials joins a separate nats-server that admits a
// user with a password and an nkey user: each is used as configured, and a
// wrong password is refused.
func TestExternalNATSCredentials(t *testing.T) {
	dir := t.TempDir()
	kp, _ := nkeys.CreateUser()
	pub, _ := kp.PublicKey()
	seed, _ := kp.Seed()
	seedFile := filepath.Join(dir, "worker.nk")
	if err := os.WriteFile(seedFile, seed, 0o600); err != nil {
		t.Fatal(err)
	}
	ns, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: -1, NoSigs: true,
		Users: []*server.User{{Username: "worker", Password: "s3cret"}},
		Nkeys: []*server.NkeyUser{{Nkey: pub}},
	})
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	url := ns.ClientURL()
	for name, c := range map[string]Config{
		"user":  {NATSURL: url, NATSUser: "worker", NATSPassword: "s3cret"},
		"nkey":  {NATSURL: url, NATSNkey: seedFile},
		"wrong": {NATSURL: url, NATSUser: "worker", NATSPassword: "guess"},
		"none":  {NATSURL: url},
	} {
		t.Run(name, func(t *testing.T) {
			c.StateDir = dir
			w, _, err := connectOnly(t, c)
			if name == "wrong" || name == "none" {
				if err == nil || !strings.Contains(strings.ToLower(err.Error()), "authorization") {
					t.Errorf("connected: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if w.srv != nil || w.ClientNkeyFile() != "" {
				t.Error("an embedded server was started for an external URL")
			}
			if err := w.nc.Flush(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestExternalNATSServiceIdentity joins a server with the worker's store
// and service users (embedded.Access): with --nats-service-nkey the service
// connection serves requests but a reply aimed at a KV record or an event
// subject is a permissions violation, while the store connection publishes
// logs; without it both connections use the main credentials and the
// worker warns once.
func TestExternalNATSServiceIdentity(t *testing.T) {
	dir := t.TempDir()
	var pubs [3]string
	var files [3]string
	for i, name := range []string{"worker.nk", "service.nk", "client.nk"} {
		kp, _ := nkeys.CreateUser()
		pubs[i], _ = kp.PublicKey()
		seed, _ := kp.Seed()
		files[i] = filepath.Join(dir, name)
		if err := os.WriteFile(files[i], seed, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	access := embedded.Access{Prefix: "firkin"}
	ns, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: -1, NoSigs: true,
		Nkeys: access.Users(pubs[0], pubs[1], pubs[2]),
	})
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	const warning = "the service connection uses the main NATS credentials"
	w, logs, err := connectOnly(t, Config{StateDir: dir, NATSURL: ns.ClientURL(), NATSNkey: files[0], NATSServiceNkey: files[1]})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(logs.String(), warning) {
		t.Errorf("warned with a service identity:\n%s", logs.String())
	}
	violations := make(chan error, 8)
	w.nc.SetErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
		select {
		case violations <- err:
		default:
		}
	})
	if _, err := w.nc.Subscribe("firkin.sandbox.create", func(m *nats.Msg) { _ = m.Respond([]byte("ok")) }); err != nil {
		t.Fatal(err)
	}
	if err := w.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	clientAuth, err := nats.NkeyOptionFromSeed(files[2])
	if err != nil {
		t.Fatal(err)
	}
	cl, err := nats.Connect(ns.ClientURL(), clientAuth)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	logSub, err := cl.SubscribeSync("firkin.logs.>")
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Flush(); err != nil {
		t.Fatal(err)
	}
	if m, err := cl.Request("firkin.sandbox.create", nil, 3*time.Second); err != nil || string(m.Data) != "ok" {
		t.Fatalf("request served by the service connection: %v %v", m, err)
	}
	if err := w.storeNC.Publish("firkin.logs.sb1", []byte("from the store connection")); err != nil {
		t.Fatal(err)
	}
	if m, err := logSub.NextMsg(3 * time.Second); err != nil || string(m.Data) != "from the store connection" {
		t.Fatalf("store connection log publish: %v %v", m, err)
	}
	for _, reply := range []string{"$KV.firkin_snapshots.x", "firkin.events.x"} {
		if err := cl.PublishRequest("firkin.sandbox.create", reply, nil); err != nil {
			t.Fatal(err)
		}
		_ = cl.Flush()
		select {
		case err := <-violations:
			if !errors.Is(err, nats.ErrPermissionViolation) || !strings.Contains(err.Error(), `Publish to "`+reply+`"`) {
				t.Errorf("reply to %s: %v", reply, err)
			}
		case <-time.After(3 * time.Second):
			t.Errorf("the service connection replied to %s without a permissions violation", reply)
		}
	}

	// Without service credentials both connections are the store user and
	// the worker says so once.
	w2, logs2, err := connectOnly(t, Config{StateDir: dir, NATSURL: ns.ClientURL(), NATSNkey: files[0]})
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(logs2.String(), warning); n != 1 || !strings.Contains(logs2.String(), "level=WARN") {
		t.Errorf("%d warnings:\n%s", n, logs2.String())
	}
	if err := w2.nc.Publish("firkin.logs.sb1", []byte("service with the main credentials")); err != nil {
		t.Fatal(err)
	}
	if m, err := logSub.NextMsg(3 * time.Second); err != nil || string(m.Data) != "service with the main credentials" {
		t.Fatalf("service connection with the main credentials: %v %v", m, err)
	}
}

// TestExternalNATSTLS joins a server that requires TLS with a client
// certificate: the worker verifies the server with --nats-tls-ca and shows
// its certificate; without the certificate it is refused.
func TestExternalNATSTLS(t *testing.T) {
	dir := t.TempDir()
	ca, caKey := newCert(t, nil, nil, "test CA", true)
	srvCert, srvKey := newCert(t, ca, caKey, "127.0.0.1", false)
	cliCert, cliKey := newCert(t, ca, caKey, "firkin-worker", false)
	caFile := writePEM(t, dir, "ca.pem", "CERTIFICATE", ca.Raw)
	certFile := writePEM(t, dir, "worker.pem", "CERTIFICATE", cliCert.Raw)
	keyDER, _ := x509.MarshalECPrivateKey(cliKey)
	keyFile := writePEM(t, dir, "worker-key.pem", "EC PRIVATE KEY", keyDER)

	pool := x509.NewCertPool()
	pool.AddCert(ca)
	ns, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: -1, NoSigs: true,
		TLS: true, TLSVerify: true, TLSTimeout: 5,
		TLSConfig: &tls.Config{
			Certificates: []tls.Certificate{{Certificate: [][]byte{srvCert.Raw}, PrivateKey: srvKey}},
			ClientCAs:    pool,
			ClientAuth:   tls.RequireAndVerifyClientCert,
			MinVersion:   tls.VersionTLS12,
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	url := "tls://" + ns.Addr().String()
	w, _, err := connectOnly(t, Config{StateDir: dir, NATSURL: url, NATSTLSCA: caFile, NATSTLSCert: certFile, NATSTLSKey: keyFile})
	if err != nil {
		t.Fatalf("TLS with a client certificate: %v", err)
	}
	if err := w.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := connectOnly(t, Config{StateDir: dir, NATSURL: url, NATSTLSCA: caFile}); err == nil {
		t.Error("connected without the client certificate")
	}
}

func newCert(t *testing.T, parent *x509.Certificate, parentKey *ecdsa.PrivateKey, name string, isCA bool) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IsCA:         isCA, BasicConstraintsValid: true,
	}
	if ip := net.ParseIP(name); ip != nil {
		tmpl.IPAddresses = []net.IP{ip}
	}
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

func writePEM(t *testing.T, dir, name, kind string, der []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}
