// Command darwincheck type-checks the macOS-only code of the worker (the VZ
// driver in vmpool/vz) against the Go API of github.com/Code-Hex/vz/v3 on
// any host, so that a wrong call or field fails CI on Linux.
//
// It lists the packages with the go command for darwin/arm64 and
// darwin/amd64 with cgo on, and type-checks them and their dependencies
// from source with go/types, with cgo's "C" as an opaque package
// (FakeImportC): no C compiler and no macOS SDK are needed. Dependencies
// are checked without function bodies; the packages named on the command
// line are checked in full.
//
// Usage (from the module root):
//
//	go run ./tools/darwincheck [-v] [packages]   (default ./vmpool/vz/...)
//
// It exits 1 on a type error, 2 when it cannot run.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
)

func main() {
	verbose := flag.Bool("v", false, "report every checked package")
	flag.Usage = func() {
		fmt.Fprintln(flag.CommandLine.Output(), "usage: darwincheck [-v] [packages]  (default ./vmpool/vz/...)")
		flag.PrintDefaults()
	}
	flag.Parse()
	patterns := flag.Args()
	if len(patterns) == 0 {
		patterns = []string{"./vmpool/vz/..."}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	var log io.Writer
	if *verbose {
		log = os.Stderr
	}
	dir, err := os.Getwd()
	if err != nil {
		fmt.Fprintln(os.Stderr, "darwincheck:", err)
		os.Exit(2)
	}
	errs, err := check(ctx, options{
		Dir:       dir,
		Patterns:  patterns,
		Platforms: []platform{{"darwin", "arm64"}, {"darwin", "amd64"}},
		Log:       log,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "darwincheck:", err)
		os.Exit(2)
	}
	for _, e := range errs {
		fmt.Fprintln(os.Stderr, e)
	}
	if len(errs) > 0 {
		fmt.Fprintf(os.Stderr, "darwincheck: %d type errors in the darwin build of %v\n", len(errs), patterns)
		os.Exit(1)
	}
	fmt.Printf("darwincheck: %v type-check for darwin/arm64 and darwin/amd64\n", patterns)
}
