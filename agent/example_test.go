package agent_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/firkin-dev/firkin-worker/agent"
)

// A machine's life as the QEMU driver sees it: connect on the channel (a
// unix socket to QEMU's chardev), initialise, run commands, quiesce before a
// save, and connect again on the same conn after the save (or on a new conn
// to a restored QEMU).
func Example() {
	conn, err := net.Dial("unix", "/path/to/agent.sock")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer conn.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := agent.Connect(ctx, conn) // waits for the guest's READY
	if err != nil {
		fmt.Println(err)
		return
	}
	_ = c.Init(ctx, agent.InitRequest{SandboxID: "abc", Hostname: "abc", UnixNano: time.Now().UnixNano()})
	res, err := c.Exec(ctx, agent.ExecRequest{Command: "echo hi", Timeout: time.Minute},
		func(s agent.Stream, b []byte) { os.Stdout.Write(b) })
	fmt.Println(res.ExitCode, err)

	_ = c.Quiesce(ctx) // before QMP stop + migrate
	// ... save ...
	c2, err := agent.Connect(ctx, conn) // same conn after a resumed save
	if err == nil {
		defer c2.Close()
	}
}
