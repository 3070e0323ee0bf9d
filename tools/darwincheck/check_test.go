package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const vzPkg = "github.com/firkin-dev/firkin-worker/vmpool/vz"

var darwin = []platform{{"darwin", "arm64"}, {"darwin", "amd64"}}

func runCheck(t *testing.T, extra map[string]string) []typeError {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	opts := options{Dir: filepath.Join("..", ".."), Patterns: []string{"./vmpool/vz/..."}, Platforms: darwin}
	if extra != nil {
		opts.Extra = map[string]map[string]string{vzPkg: extra}
	}
	errs, err := check(ctx, opts)
	if err != nil {
		t.Fatalf("check: %v", err)
	}
	return errs
}

func fixture(t *testing.T, name string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name+".go.txt"))
	if err != nil {
		t.Fatal(err)
	}
	return map[string]string{"zz_" + name + "_darwin.go": string(b)}
}

// TestVZDriverTypeChecks: the VZ driver type-checks against vz v3.7.1 for
// darwin/arm64 and darwin/amd64.
func TestVZDriverTypeChecks(t *testing.T) {
	for _, e := range runCheck(t, nil) {
		t.Errorf("type error: %s", e)
	}
}

// TestWrongCallsFail: planted mistakes in the darwin build of the VZ driver
// make the check fail, naming the mistake.
func TestWrongCallsFail(t *testing.T) {
	tests := []struct {
		fixture string
		want    map[platform][]string // substrings of the expected errors
	}{
		{"misspelled_method", map[platform][]string{
			darwin[0]: {"SaveMachineStateToPth undefined"},
			darwin[1]: {"SaveMachineStateToPth undefined"},
		}},
		{"wrong_argument", map[platform][]string{
			darwin[0]: {"cannot use cfg.VCPUs", "cfg.Memory undefined"},
			darwin[1]: {"cannot use cfg.VCPUs", "cfg.Memory undefined"},
		}},
		{"arm64_only", map[platform][]string{
			darwin[1]: {"RestoreMachineStateFromURL undefined"},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.fixture, func(t *testing.T) {
			errs := runCheck(t, fixture(t, tt.fixture))
			if len(errs) == 0 {
				t.Fatal("the check passed; want type errors")
			}
			got := map[platform][]string{}
			for _, e := range errs {
				if !strings.Contains(e.Pos, "zz_"+tt.fixture) {
					t.Errorf("error outside the fixture: %s", e)
				}
				got[e.Platform] = append(got[e.Platform], e.Msg)
			}
			for _, p := range darwin {
				joined := strings.Join(got[p], "\n")
				for _, w := range tt.want[p] {
					if !strings.Contains(joined, w) {
						t.Errorf("%s: errors %q do not mention %q", p, joined, w)
					}
				}
				if len(tt.want[p]) == 0 && len(got[p]) > 0 {
					t.Errorf("%s: unexpected errors %q", p, joined)
				}
			}
		})
	}
}
