package main

import (
	"errors"
	"flag"
	"os"
	"strings"
	"testing"
	"time"
)

func TestOptionsPrecedence(t *testing.T) {
	env := map[string]string{"FIRKIN_NATS_LISTEN": "127.0.0.1:5222", "FIRKIN_POOL": "tiny=3", "FIRKIN_CONFIG": "cfg.json"}
	files := map[string]string{"cfg.json": `{"nats-listen":"127.0.0.1:6222","domain":"example.test","driver":"qemu","max-sandboxes":9}`}
	read := func(p string) ([]byte, error) {
		if s, ok := files[p]; ok {
			return []byte(s), nil
		}
		return nil, os.ErrNotExist
	}
	o, err := parseOptions([]string{"--driver", "tcg-ignored-later", "--state-dir", "/tmp/x"}, func(k string) string { return env[k] }, read)
	if err != nil {
		t.Fatal(err)
	}
	if o.stateDir != "/tmp/x" || o.driver != "tcg-ignored-later" {
		t.Errorf("flags must win: %+v", o)
	}
	if o.natsListen != "127.0.0.1:5222" || o.pool != "tiny=3" {
		t.Errorf("env must win over file: %+v", o)
	}
	if o.domain != "example.test" || o.maxSessions != 9 {
		t.Errorf("file must fill the rest: %+v", o)
	}
	if cfg := o.workerConfig(); cfg.Pool["tiny"] != 3 || cfg.Limits.MaxSessions != 9 {
		t.Errorf("worker config: %+v", cfg)
	}
}

func TestOptionsErrors(t *testing.T) {
	none := func(string) string { return "" }
	read := func(string) ([]byte, error) { return []byte(`{"bogus":1}`), nil }
	for _, args := range [][]string{{"--pool", "tiny"}, {"--pool", "tiny=-1"}, {"extra"}, {"--nope"}, {"--config", "x.json"}} {
		if _, err := parseOptions(args, none, read); err == nil {
			t.Errorf("%v accepted", args)
		}
	}
	if _, err := parseOptions([]string{"-h"}, none, read); !errors.Is(err, flag.ErrHelp) {
		t.Errorf("-h: %v", err)
	}
	if EnvName("proxy-listen") != "FIRKIN_PROXY_LISTEN" {
		t.Error(EnvName("proxy-listen"))
	}
	if _, err := newLogger("xml", "info", os.Stderr); err == nil || !strings.Contains(err.Error(), "log-format") {
		t.Errorf("bad format: %v", err)
	}
}

func TestOptionsNATSAuth(t *testing.T) {
	files := map[string]string{"pw": "s3cret\n", "empty": "", "cfg.json": `{"nats-url":"nats://n1:4222","nats-user":"worker","nats-password-file":"pw","nats-tls-ca":"ca.pem"}`}
	read := func(p string) ([]byte, error) {
		if s, ok := files[p]; ok {
			return []byte(s), nil
		}
		return nil, os.ErrNotExist
	}
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

	o, err := parseOptions(nil, env(nil), read)
	if err != nil || o.natsAuth != "nkey" || o.workerConfig().NATSAuth != "nkey" {
		t.Fatalf("default --nats-auth: %q %v", o.natsAuth, err)
	}
	if o, err = parseOptions(nil, env(map[string]string{"FIRKIN_NATS_AUTH": "none"}), read); err != nil || o.natsAuth != "none" {
		t.Errorf("FIRKIN_NATS_AUTH=none: %q %v", o.natsAuth, err)
	}
	o, err = parseOptions([]string{"--config", "cfg.json"}, env(nil), read)
	if err != nil {
		t.Fatal(err)
	}
	cfg := o.workerConfig()
	if cfg.NATSURL != "nats://n1:4222" || cfg.NATSUser != "worker" || cfg.NATSPassword != "s3cret" || cfg.NATSTLSCA != "ca.pem" {
		t.Errorf("from the config file: %+v", cfg)
	}
	o, err = parseOptions([]string{"--nats-url", "nats://n1:4222", "--nats-user", "w", "--nats-creds", "a.creds", "--nats-nkey", "a.nk",
		"--nats-tls-cert", "c.pem", "--nats-tls-key", "k.pem"}, env(map[string]string{"FIRKIN_NATS_PASSWORD": "from-env"}), read)
	if err != nil {
		t.Fatal(err)
	}
	if cfg := o.workerConfig(); cfg.NATSPassword != "from-env" || cfg.NATSCreds != "a.creds" || cfg.NATSNkey != "a.nk" || cfg.NATSTLSCert != "c.pem" || cfg.NATSTLSKey != "k.pem" {
		t.Errorf("flags and FIRKIN_NATS_PASSWORD: %+v", cfg)
	}

	files["bad.json"] = `{"nats-password":"pw"}`
	for name, c := range map[string]struct {
		args []string
		env  map[string]string
	}{
		"password as a flag":     {args: []string{"--nats-password", "pw"}},
		"password in the config": {args: []string{"--config", "bad.json"}},
		"password twice":         {args: []string{"--nats-password-file", "pw"}, env: map[string]string{"FIRKIN_NATS_PASSWORD": "x"}},
		"empty password file":    {args: []string{"--nats-password-file", "empty"}},
		"missing password file":  {args: []string{"--nats-password-file", "nope"}},
		"unknown auth":           {args: []string{"--nats-auth", "token"}},
	} {
		if _, err := parseOptions(c.args, env(c.env), read); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestOptionsNATSServiceIdentity(t *testing.T) {
	files := map[string]string{"cfg.json": `{"nats-url":"nats://n1:4222","nats-nkey":"w.nk","nats-service-nkey":"file.nk","nats-service-creds":"file.creds"}`}
	read := func(p string) ([]byte, error) {
		if s, ok := files[p]; ok {
			return []byte(s), nil
		}
		return nil, os.ErrNotExist
	}
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

	o, err := parseOptions(nil, env(nil), read)
	if err != nil {
		t.Fatal(err)
	}
	if cfg := o.workerConfig(); cfg.NATSServiceCreds != "" || cfg.NATSServiceNkey != "" {
		t.Errorf("service credentials by default: %+v", cfg)
	}
	o, err = parseOptions([]string{"--config", "cfg.json", "--nats-service-nkey", "flag.nk"},
		env(map[string]string{"FIRKIN_NATS_SERVICE_CREDS": "env.creds"}), read)
	if err != nil {
		t.Fatal(err)
	}
	cfg := o.workerConfig()
	if cfg.NATSServiceNkey != "flag.nk" || cfg.NATSServiceCreds != "env.creds" || cfg.NATSNkey != "w.nk" || cfg.NATSURL != "nats://n1:4222" {
		t.Errorf("flag, env and file: service nkey %q, service creds %q, nkey %q", cfg.NATSServiceNkey, cfg.NATSServiceCreds, cfg.NATSNkey)
	}
	o, err = parseOptions([]string{"--config", "cfg.json"}, env(nil), read)
	if err != nil {
		t.Fatal(err)
	}
	if cfg := o.workerConfig(); cfg.NATSServiceNkey != "file.nk" || cfg.NATSServiceCreds != "file.creds" {
		t.Errorf("from the config file: service nkey %q, service creds %q", cfg.NATSServiceNkey, cfg.NATSServiceCreds)
	}
}

func TestOptionsExampleConfig(t *testing.T) {
	o, err := parseOptions([]string{"--config", "../../deploy/worker.example.json"}, func(string) string { return "" }, os.ReadFile)
	if err != nil {
		t.Fatalf("deploy/worker.example.json: %v", err)
	}
	cfg := o.workerConfig()
	if cfg.NATSURL == "" || cfg.NATSNkey == "" || cfg.NATSServiceNkey == "" || cfg.NATSServiceNkey == cfg.NATSNkey || cfg.NATSTLSCA == "" {
		t.Errorf("deploy/worker.example.json: want an external server with store and service nkeys and TLS: %+v", cfg)
	}
}

func TestRouteOptions(t *testing.T) {
	none := func(string) string { return "" }
	read := func(string) ([]byte, error) { return nil, os.ErrNotExist }
	o, err := parseOptions(nil, none, read)
	if err != nil {
		t.Fatal(err)
	}
	cfg := o.workerConfig()
	if cfg.RouteTCPHost != "127.0.0.1" || cfg.RouteLimits.MaxRoutesPerSandbox != 16 ||
		cfg.RouteLimits.MaxConnsPerSandbox != 64 || cfg.RouteLimits.IdleTimeout != 10*time.Minute {
		t.Errorf("defaults: host %q, limits %+v", cfg.RouteTCPHost, cfg.RouteLimits)
	}
	env := map[string]string{"FIRKIN_ROUTE_TCP_HOST": "0.0.0.0", "FIRKIN_PROXY_IDLE_TIMEOUT": "30s"}
	o, err = parseOptions([]string{"--max-routes-per-sandbox", "4"}, func(k string) string { return env[k] }, read)
	if err != nil {
		t.Fatal(err)
	}
	cfg = o.workerConfig()
	if cfg.RouteTCPHost != "0.0.0.0" || cfg.RouteLimits.MaxRoutesPerSandbox != 4 || cfg.RouteLimits.IdleTimeout != 30*time.Second {
		t.Errorf("from env and flags: host %q, limits %+v", cfg.RouteTCPHost, cfg.RouteLimits)
	}
}

func TestOptionsClusterSettings(t *testing.T) {
	none := func(string) string { return "" }
	files := map[string]string{"secret": "  shared-cluster-secret-0123456789abcdef\n", "empty": "\n"}
	read := func(p string) ([]byte, error) {
		if s, ok := files[p]; ok {
			return []byte(s), nil
		}
		return nil, os.ErrNotExist
	}
	o, err := parseOptions([]string{"--token-secret-file", "secret", "--replicas", "3"}, none, read)
	if err != nil {
		t.Fatal(err)
	}
	if cfg := o.workerConfig(); cfg.TokenSecret != "shared-cluster-secret-0123456789abcdef" || cfg.Replicas != 3 {
		t.Errorf("worker config: secret %q replicas %d", cfg.TokenSecret, cfg.Replicas)
	}
	for _, args := range [][]string{
		{"--token-secret-file", "empty"},
		{"--token-secret-file", "missing"},
		{"--token-secret-file", "secret", "--token-secret", "x"},
		{"--replicas", "-1"},
		{"--replicas", "7"},
	} {
		if _, err := parseOptions(args, none, read); err == nil {
			t.Errorf("%q: want an error", args)
		}
	}
}
