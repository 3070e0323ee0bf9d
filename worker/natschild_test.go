package worker

import (
	"bufio"
	"fmt"
	"os"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// NATSChildEnv makes the test binary run a NATS server (JetStream stored in
// the directory the variable names, anonymous clients, the stock 1 MiB max
// payload) instead of the tests: it prints the client URL on stdout and
// shuts down when stdin closes. Tests that measure the worker's own memory,
// or its replies against a stock server's max payload, run NATS apart.
const NATSChildEnv = "FIRKIN_TEST_NATS_CHILD"

// natsChild runs the NATS server of NATSChildEnv and returns the exit code.
func natsChild(dir string) int {
	ns, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: dir, MaxPayload: 1 << 20, NoSigs: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, "nats child:", err)
		return 1
	}
	go ns.Start()
	if !ns.ReadyForConnections(30 * time.Second) {
		fmt.Fprintln(os.Stderr, "nats child: not ready after 30s")
		return 1
	}
	defer ns.Shutdown()
	fmt.Println(ns.ClientURL())
	r := bufio.NewReader(os.Stdin)
	for {
		if _, err := r.ReadByte(); err != nil {
			return 0
		}
	}
}
