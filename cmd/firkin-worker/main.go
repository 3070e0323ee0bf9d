// Command firkin-worker runs agent sandboxes as micro-VMs, driven over NATS.
//
// With no arguments it runs a worker with an embedded NATS server, the host's
// default machine driver and the built-in template "tiny". Every flag can also
// be set as FIRKIN_<NAME> in the environment or in a JSON configuration file
// (--config); flags win over the environment, which wins over the file.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/firkin-dev/firkin-worker/jail"
	"github.com/firkin-dev/firkin-worker/worker"
)

func main() {
	jail.Main() // a QEMU jail started by this binary: set up and exec QEMU
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "firkin-worker:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) > 0 && args[0] == "images" {
		return runImages(args[1:])
	}
	opts, err := parseOptions(args, os.Getenv, os.ReadFile)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	logger, err := newLogger(opts.logFormat, opts.logLevel, os.Stderr)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	cfg := opts.workerConfig()
	cfg.Logger = logger
	w, err := worker.Start(ctx, cfg)
	if err != nil {
		return err
	}
	stopE2B, err := startE2B(opts, w, logger)
	if err != nil {
		sctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		return errors.Join(fmt.Errorf("e2b api: %w", err), w.Stop(sctx))
	}
	<-ctx.Done()
	if stopE2B != nil {
		stopE2B(context.Background())
	}
	logger.Info("shutting down: answering requests in flight, stopping machines")
	sctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := w.Stop(sctx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	logger.Info("stopped")
	return nil
}

// newLogger returns a slog logger: tint on a terminal (or --log-format
// text), JSON otherwise.
func newLogger(format, level string, out *os.File) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	switch format {
	case "", "auto":
		if isTerminal(out) {
			format = "text"
		} else {
			format = "json"
		}
	}
	switch format {
	case "text":
		return slog.New(tintHandler(out, lvl, isTerminal(out))), nil
	case "json":
		return slog.New(slog.NewJSONHandler(out, &slog.HandlerOptions{Level: lvl})), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", format)
}
