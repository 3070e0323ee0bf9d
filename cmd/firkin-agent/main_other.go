//go:build !linux

// Command firkin-agent is the guest agent, PID 1 of a firkin micro-VM. It
// only runs on Linux guests.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "firkin-agent: runs only as PID 1 of a Linux guest")
	os.Exit(2)
}
