package embedded

import (
	"testing"

	"github.com/nats-io/nats.go"
)

func TestStartServesJetStream(t *testing.T) {
	s, err := Start(Config{Listen: "127.0.0.1:-1", StoreDir: t.TempDir(), Anonymous: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Shutdown)
	nc, err := nats.Connect(s.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := nc.JetStream()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.AccountInfo(); err != nil {
		t.Fatalf("JetStream not enabled: %v", err)
	}
}

func TestStartRejectsBadConfig(t *testing.T) {
	for _, cfg := range []Config{{StoreDir: ""}, {Listen: "nohostport", StoreDir: "x"}, {Listen: "127.0.0.1:99999", StoreDir: "x"}} {
		if _, err := Start(cfg); err == nil {
			t.Errorf("Start(%+v) succeeded", cfg)
		}
	}
}
