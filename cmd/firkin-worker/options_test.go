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
	for _, args := range [][]string{{"--pool", "tiny"}, {"--pool", "tiny=-1"}, {"extra"}, {"--nope"}, {"--config", "x.json"},
		{"--max-routes-per-sandbox", "0"}, {"--max-proxy-conns-per-sandbox", "-1"}, {"--proxy-idle-timeout", "0s"}} {
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
