package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"go/types"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
)

// platform is a GOOS/GOARCH pair to check for.
type platform struct{ GOOS, GOARCH string }

func (p platform) String() string { return p.GOOS + "/" + p.GOARCH }

// options say what to check.
type options struct {
	// Dir is the module directory go list runs in.
	Dir string
	// Patterns are the packages to check (go list patterns).
	Patterns []string
	// Platforms to check them for.
	Platforms []platform
	// Extra adds source files to a checked package, by import path and
	// file name (tests use it to plant a wrong call).
	Extra map[string]map[string]string
	// Log receives progress; nil discards it.
	Log io.Writer
}

// typeError is one type error in a checked package.
type typeError struct {
	Platform platform
	Pos      string
	Msg      string
}

func (e typeError) String() string { return fmt.Sprintf("%s: %s: %s", e.Platform, e.Pos, e.Msg) }

// listedPackage is what go list says about a package.
type listedPackage struct {
	ImportPath string
	Dir        string
	GoFiles    []string
	CgoFiles   []string
	ImportMap  map[string]string
	DepOnly    bool
	Standard   bool
	Error      *struct{ Err string }
}

// check type-checks the packages of opts for every platform, from source,
// with cgo's "C" as an opaque package (FakeImportC): the Go API of cgo
// packages such as github.com/Code-Hex/vz is checked without a C compiler or
// the macOS SDK. It returns the type errors of the checked packages.
func check(ctx context.Context, opts options) ([]typeError, error) {
	var all []typeError
	for _, p := range opts.Platforms {
		errs, err := checkPlatform(ctx, opts, p)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		all = append(all, errs...)
	}
	return all, nil
}

// depsKey names one go list run.
type depsKey struct {
	dir      string
	platform platform
	patterns string
}

// checkedDeps are the dependencies of one go list run, type-checked; a
// second check of the same packages (the tests plant several mistakes)
// reuses them and checks only the target packages again.
type checkedDeps struct {
	pkgs []listedPackage
	fset *token.FileSet
	done map[string]*types.Package // dependencies only
}

var (
	depsMu    sync.Mutex
	depsCache = map[depsKey]*checkedDeps{}
)

func checkPlatform(ctx context.Context, opts options, p platform) ([]typeError, error) {
	key := depsKey{opts.Dir, p, strings.Join(opts.Patterns, "\x00")}
	depsMu.Lock()
	cached := depsCache[key]
	depsMu.Unlock()
	var (
		pkgs []listedPackage
		fset *token.FileSet
		done map[string]*types.Package
	)
	if cached != nil {
		pkgs, fset, done = cached.pkgs, cached.fset, maps.Clone(cached.done)
	} else {
		var err error
		if pkgs, err = goList(ctx, opts.Dir, p, opts.Patterns); err != nil {
			return nil, err
		}
		fset = token.NewFileSet()
		done = map[string]*types.Package{"unsafe": types.Unsafe}
	}
	sizes := types.SizesFor("gc", p.GOARCH)
	var out []typeError
	targets := 0
	for _, lp := range pkgs {
		if lp.ImportPath == "unsafe" {
			continue
		}
		if lp.DepOnly && cached != nil {
			continue
		}
		if lp.Error != nil {
			return nil, fmt.Errorf("go list %s: %s", lp.ImportPath, lp.Error.Err)
		}
		target := !lp.DepOnly
		mode := parser.SkipObjectResolution
		if target {
			mode |= parser.ParseComments
			targets++
		}
		var files []*ast.File
		for _, name := range append(slices.Clone(lp.GoFiles), lp.CgoFiles...) {
			f, err := parser.ParseFile(fset, filepath.Join(lp.Dir, name), nil, mode)
			if err != nil {
				return nil, fmt.Errorf("parse: %w", err)
			}
			files = append(files, f)
		}
		extra := opts.Extra[lp.ImportPath]
		names := make([]string, 0, len(extra))
		for name := range extra {
			names = append(names, name)
		}
		sort.Strings(names)
		for _, name := range names {
			f, err := parser.ParseFile(fset, filepath.Join(lp.Dir, name), extra[name], mode)
			if err != nil {
				out = append(out, typeError{Platform: p, Pos: name, Msg: err.Error()})
				continue
			}
			files = append(files, f)
		}
		var pkgErrs []error
		conf := types.Config{
			Importer:         importer{done: done, importMap: lp.ImportMap},
			FakeImportC:      true,
			IgnoreFuncBodies: !target,
			Sizes:            sizes,
			Error:            func(err error) { pkgErrs = append(pkgErrs, err) },
		}
		tp, _ := conf.Check(lp.ImportPath, fset, files, nil)
		done[lp.ImportPath] = tp
		if !target {
			// A dependency that does not type-check would leave invalid
			// types behind, which accept anything: refuse rather than
			// check less than we say.
			if len(pkgErrs) > 0 {
				return nil, fmt.Errorf("dependency %s does not type-check (%d errors; first: %v)", lp.ImportPath, len(pkgErrs), pkgErrs[0])
			}
			continue
		}
		for _, e := range pkgErrs {
			var te types.Error
			if errors.As(e, &te) {
				out = append(out, typeError{Platform: p, Pos: te.Fset.Position(te.Pos).String(), Msg: te.Msg})
			} else {
				out = append(out, typeError{Platform: p, Msg: e.Error()})
			}
		}
		if opts.Log != nil {
			fmt.Fprintf(opts.Log, "darwincheck: %s: %s: %d files, %d type errors\n", p, lp.ImportPath, len(files), len(pkgErrs))
		}
	}
	if targets == 0 {
		return nil, fmt.Errorf("no packages match %v", opts.Patterns)
	}
	if cached == nil {
		deps := map[string]*types.Package{}
		for _, lp := range pkgs {
			if lp.DepOnly || lp.ImportPath == "unsafe" {
				deps[lp.ImportPath] = done[lp.ImportPath]
			}
		}
		depsMu.Lock()
		depsCache[key] = &checkedDeps{pkgs: pkgs, fset: fset, done: deps}
		depsMu.Unlock()
	}
	return out, nil
}

// goList lists the packages matching patterns and all their dependencies,
// dependencies first, as the go command sees them for platform p with cgo
// on. It does not run cgo (no -compiled), so no C toolchain is needed.
func goList(ctx context.Context, dir string, p platform, patterns []string) ([]listedPackage, error) {
	args := append([]string{"list", "-e", "-deps", "-json=ImportPath,Dir,GoFiles,CgoFiles,ImportMap,DepOnly,Standard,Error"}, patterns...)
	cmd := exec.CommandContext(ctx, goTool(), args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOOS="+p.GOOS, "GOARCH="+p.GOARCH, "CGO_ENABLED=1")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	b, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("go list: %w\n%s", err, stderr.String())
	}
	var pkgs []listedPackage
	dec := json.NewDecoder(bytes.NewReader(b))
	for {
		var lp listedPackage
		if err := dec.Decode(&lp); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return nil, fmt.Errorf("go list output: %w", err)
		}
		pkgs = append(pkgs, lp)
	}
	return pkgs, nil
}

// goTool returns the go command to run: the one of this toolchain when it
// exists, else "go" from PATH.
func goTool() string {
	if root := os.Getenv("GOROOT"); root != "" {
		if p := filepath.Join(root, "bin", "go"); fileExists(p) {
			return p
		}
	}
	return "go"
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// importer resolves imports to packages already checked (go list -deps
// lists dependencies first), through the importing package's ImportMap
// (vendored standard library packages).
type importer struct {
	done      map[string]*types.Package
	importMap map[string]string
}

func (im importer) Import(path string) (*types.Package, error) {
	if p, ok := im.importMap[path]; ok {
		path = p
	}
	if p, ok := im.done[path]; ok && p != nil {
		return p, nil
	}
	return nil, fmt.Errorf("package %s not type-checked yet", strings.TrimSpace(path))
}
