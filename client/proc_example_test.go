package client_test

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/firkin-dev/firkin-worker/subjects"
)

func ExampleClient_StartProcess() {
	c := connect()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	sb, err := c.Create(ctx, subjects.CreateSandboxRequest{TemplateID: "tiny", TimeoutS: 120})
	if err != nil {
		fmt.Println("create:", err)
		return
	}
	defer c.Kill(context.Background(), sb.SandboxID)
	// A process reading its stdin: the request returns once it runs.
	p, err := c.StartProcess(ctx, sb.SandboxID, subjects.ProcStartRequest{Command: "tr a-z A-Z", Tag: "upper"})
	if err != nil {
		fmt.Println("start:", err)
		return
	}
	defer p.Close()
	out := p.Output() // before Wait: stdout and stderr in order
	in := p.Stdin()
	_, _ = io.WriteString(in, "hello, ")
	_, _ = io.WriteString(in, "process\n")
	_ = in.Close()
	b, _ := io.ReadAll(out)
	exit, err := p.Wait(ctx)
	fmt.Printf("%q exit %d %v\n", b, exit.ExitCode, err)
	// Output: "HELLO, PROCESS\n" exit 0 <nil>
}

func ExampleProcess_Signal() {
	c := connect()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	sb, err := c.Create(ctx, subjects.CreateSandboxRequest{TemplateID: "tiny", TimeoutS: 120})
	if err != nil {
		fmt.Println("create:", err)
		return
	}
	defer c.Kill(context.Background(), sb.SandboxID)
	p, err := c.StartProcess(ctx, sb.SandboxID, subjects.ProcStartRequest{Command: "sleep", Args: []string{"600"}, Background: true})
	if err != nil {
		fmt.Println("start:", err)
		return
	}
	defer p.Close()
	list, _ := c.ListProcesses(ctx, sb.SandboxID)
	fmt.Println(len(list), list[0].State, list[0].CommandID == p.ID())
	_ = p.Signal(ctx, "TERM")
	exit, err := p.Wait(ctx)
	fmt.Println(exit.Signal, exit.ExitCode, err)
	// Output:
	// 1 running true
	// TERM 143 <nil>
}
