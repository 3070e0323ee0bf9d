package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"syscall"

	"github.com/firkin-dev/firkin-worker/images"
)

// runImages builds (or confirms) the guest images and prints their paths:
// `firkin-worker images [flags]`. --arch picks amd64 or arm64; the agent for
// that arch is taken from beside this binary unless --agent names it.
func runImages(args []string) error {
	arch := runtime.GOARCH
	rest := args[:0:0]
	for i := 0; i < len(args); i++ {
		switch {
		case args[i] == "--arch" && i+1 < len(args):
			arch = args[i+1]
			i++
		case len(args[i]) > 7 && args[i][:7] == "--arch=":
			arch = args[i][7:]
		default:
			rest = append(rest, args[i])
		}
	}
	opts, err := parseOptions(rest, os.Getenv, os.ReadFile)
	if err != nil {
		return err
	}
	logger, err := newLogger(opts.logFormat, opts.logLevel, os.Stderr)
	if err != nil {
		return err
	}
	agent := opts.agent
	if agent == "" {
		exe, err := os.Executable()
		if err != nil {
			return err
		}
		agent = filepath.Join(filepath.Dir(exe), "firkin-agent-linux-"+arch)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	img, err := images.Build(ctx, images.Config{StateDir: opts.stateDir, Arch: arch, AgentBinary: agent, Kernel: opts.kernel, Logger: logger})
	if err != nil {
		return err
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(img); err != nil {
		return fmt.Errorf("print image: %w", err)
	}
	return nil
}
