package qemu

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/firkin-dev/firkin-worker/internal/testenv"
)

// With accel auto, the driver probes KVM once (here it hangs, so the answer
// is TCG; on an ordinary host it is KVM), caches the verdict on disk, and a
// second driver on the same state dir decides at once.
func TestAccelProbeCached(t *testing.T) {
	img := testenv.Image(t, "amd64")
	state := t.TempDir()
	d := testDriver(t, WithAccel(AccelAuto), WithStateDir(state), WithProbeTimeout(6*time.Second))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	t0 := time.Now()
	accel, err := d.accel(ctx, "amd64", img)
	if err != nil {
		t.Fatalf("accel: %v", err)
	}
	t.Logf("verdict %s in %v (kvm usable: %q)", accel, time.Since(t0).Round(time.Millisecond), kvmUsable())
	if kvmUsable() == "" {
		files, _ := filepath.Glob(filepath.Join(state, "accel-*.json"))
		if len(files) != 1 {
			t.Fatalf("verdict files: %v", files)
		}
		b, _ := os.ReadFile(files[0])
		if !strings.Contains(string(b), `"accel": "`+accel+`"`) {
			t.Errorf("verdict file: %s", b)
		}
		ents, _ := os.ReadDir(state)
		ents = slices.DeleteFunc(ents, func(e os.DirEntry) bool { return e.Name() == rangeFile }) // a root driver's uid range
		if len(ents) != 1 {
			t.Errorf("probe left files in the state dir: %v", ents)
		}
	}
	d2 := testDriver(t, WithAccel(AccelAuto), WithStateDir(state))
	t0 = time.Now()
	again, err := d2.accel(ctx, "amd64", img)
	if err != nil || again != accel {
		t.Fatalf("second driver: %s %v", again, err)
	}
	if el := time.Since(t0); el > 2*time.Second {
		t.Errorf("cached verdict took %v", el)
	}
	// arm64 guests never use KVM on an amd64 host.
	if a, _ := d2.accel(ctx, "arm64", img); a != AccelTCG {
		t.Errorf("arm64 accel %s", a)
	}
}
