# firkin-worker — build, run, test and benchmark.
#
#   make run     build and run a worker (embedded NATS, default driver, tiny)
#   make test    everything CI checks: vet, the darwin type-check, all tests,
#                and a short run of every fuzz target
#   make fuzz    every fuzz target for FUZZTIME each (one at a time)
#   make bench   the benchmark through the real NATS path (JSON + table)

GO        ?= go
ARCH      := $(shell $(GO) env GOARCH)
BIN       := bin
STATE_DIR ?= $(if $(filter 0,$(shell id -u)),/var/lib/firkin,$(HOME)/.firkin)
# -p 1: one test binary at a time. The VM tests time guests under TCG on
# two cores; a second package's QEMUs running beside them starve guests into
# timeouts that are not the code's.
BENCH_FLAGS ?=
TEST_FLAGS ?= -race -count=1 -timeout 30m -p 1
AGENT_SRC := $(shell find agent cmd/firkin-agent -name '*.go' -not -name '*_test.go')
# FUZZTIME is how long make fuzz runs each fuzz target; make test runs them
# for TEST_FUZZTIME each (31 targets: about two minutes in all on 2 cores).
FUZZTIME      ?= 5s
TEST_FUZZTIME ?= 2s
FUZZ_FLAGS    ?=

.PHONY: all build deps images run test vet fmt fuzz bench sign clean proto e2b-test

all: build

## build: the worker and the guest agents (static, amd64 and arm64)
build: $(BIN)/firkin-worker $(BIN)/firkin-agent-linux-amd64 $(BIN)/firkin-agent-linux-arm64

$(BIN)/firkin-worker: FORCE
	$(GO) build -o $@ ./cmd/firkin-worker

$(BIN)/firkin-agent-linux-%: $(AGENT_SRC) go.mod go.sum
	CGO_ENABLED=0 GOOS=linux GOARCH=$* $(GO) build -trimpath -ldflags='-s -w' -o $@ ./cmd/firkin-agent

## deps: install QEMU, busybox-static, e2fsprogs... when missing (apt-get)
deps:
	@if [ "$$(id -u)" = 0 ]; then scripts/deps.sh; else echo "deps: not root; skipping scripts/deps.sh (run it with sudo if QEMU is missing)"; fi

## images: the guest kernel, initramfs and tiny root disk (rebuilt when an input changes)
images: deps build
	$(BIN)/firkin-worker images --state-dir $(STATE_DIR)

## run: a worker with embedded NATS on 127.0.0.1:4222
run: deps build $(if $(filter Darwin,$(shell uname -s)),sign)
	$(BIN)/firkin-worker --state-dir $(STATE_DIR) $(ARGS)

vet:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$unformatted" ]; then echo "gofmt needed:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...

## test: vet, the darwin type-check of the VZ driver, every test (real NATS, real QEMU)
## and a short fuzz run
test: deps build vet
	$(GO) run ./tools/darwincheck ./cmd/firkin-worker ./vmpool/... ./worker/...
	$(GO) test $(TEST_FLAGS) ./...
	$(MAKE) e2b-test
	$(MAKE) fuzz FUZZTIME=$(TEST_FUZZTIME)

## e2b-test: the official E2B JavaScript SDK (npm e2b, pinned in
## e2b/api/testdata/sdk/package-lock.json), unchanged, against a worker started
## with --e2b-listen. Needs Node.js >= 20.18 and npm.
E2B_SDK_DIR := e2b/api/testdata/sdk
e2b-test: build
	@command -v node >/dev/null && command -v npm >/dev/null || { echo "e2b-test needs Node.js >= 20.18 and npm (e.g. from nodesource)"; exit 1; }
	@node -e 'const [a,b]=process.versions.node.split(".").map(Number); if (a<20||(a===20&&b<18)) { console.error("e2b-test needs Node.js >= 20.18, found "+process.versions.node); process.exit(1) }'
	cd $(E2B_SDK_DIR) && if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then npm ci --no-audit --no-fund; fi
	cd $(E2B_SDK_DIR) && FIRKIN_WORKER=$(CURDIR)/$(BIN)/firkin-worker npm test

## fuzz: every fuzz target (func FuzzX in a _test.go file), one at a time, for
## FUZZTIME each; plain go test runs their seed corpora (testdata/fuzz/FuzzX).
## A run that ends in a bare "context deadline exceeded" with no failing input
## is the fuzz coordinator's race at the end of -fuzztime (golang/go#75804,
## fixed in Go 1.27), not a finding: that target runs once more.
fuzz:
	@set -e; log=$$(mktemp); trap 'rm -f $$log' EXIT; \
	for file in $$(git ls-files '*_test.go' | xargs grep -l '^func Fuzz' | sort); do \
		pkg=./$$(dirname $$file); \
		for target in $$(sed -n 's/^func \(Fuzz[A-Za-z0-9_]*\)(.*/\1/p' $$file); do \
			for try in 1 2; do \
				echo "fuzz: $$pkg $$target for $(FUZZTIME)"; \
				if $(GO) test -run '^$$' -fuzz "^$$target\$$" -fuzztime $(FUZZTIME) $(FUZZ_FLAGS) $$pkg >$$log 2>&1; then \
					tail -n 1 $$log; break; \
				fi; \
				cat $$log; \
				if [ $$try = 2 ] || grep -q 'Failing input written' $$log || ! grep -qx '    context deadline exceeded' $$log; then exit 1; fi; \
				echo "fuzz: $$target: context deadline exceeded at the end of -fuzztime, no failing input (golang/go#75804): once more"; \
			done; \
		done; \
	done

## bench: cold boot, restore, pool, exec, snapshot, RSS, the NATS floor, proxy,
## output, jobs, cross-worker restore, pause/resume, burst and density
## (BENCH_FLAGS, e.g. BENCH_FLAGS="-density 8,16,32,64" for the density run by hand)
bench: deps build
	$(GO) run ./cmd/firkin-bench -out bench-results.json $(BENCH_FLAGS)

## sign: codesign the worker with the virtualization entitlement (macOS only)
sign: $(BIN)/firkin-worker
	@if [ "$$(uname -s)" != Darwin ]; then echo "sign: macOS only"; exit 1; fi
	codesign --force --sign - --entitlements deploy/darwin/entitlements.plist $(BIN)/firkin-worker
	codesign --display --entitlements - $(BIN)/firkin-worker

# Regenerates the E2B sandbox API's Go code from e2b/envd/proto (needs the Go
# module proxy; the generated code is committed, so builds never need it).
proto:
	cd e2b/envd && go run github.com/bufbuild/buf/cmd/buf@v1.75.0 generate

clean:
	rm -rf $(BIN)

FORCE:
