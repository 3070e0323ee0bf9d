package worker

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/firkin-dev/firkin-worker/subjects"
)

func TestAutoReplicas(t *testing.T) {
	for _, c := range []struct {
		cluster string
		servers int
		want    int
	}{
		{"", 1, 1},
		{"", 3, 1},
		{"firkin", 2, 1},
		{"firkin", 3, 3},
		{"firkin", 5, 3},
	} {
		if got := autoReplicas(c.cluster, c.servers); got != c.want {
			t.Errorf("autoReplicas(%q, %d) = %d, want %d", c.cluster, c.servers, got, c.want)
		}
	}
}

func TestLoadOrCreateID(t *testing.T) {
	path := filepath.Join(t.TempDir(), "worker-id")
	id, err := loadOrCreateID(path)
	if err != nil || subjects.ValidateSandboxID(id) != nil {
		t.Fatalf("first start: %q %v", id, err)
	}
	if again, err := loadOrCreateID(path); err != nil || again != id {
		t.Fatalf("second start: %q %v, want %q", again, err, id)
	}
	// A torn file of an older version is replaced by a new id.
	if err := os.WriteFile(path, []byte("torn id!"), 0o644); err != nil {
		t.Fatal(err)
	}
	fresh, err := loadOrCreateID(path)
	if err != nil || fresh == id || subjects.ValidateSandboxID(fresh) != nil {
		t.Fatalf("after a torn write: %q %v", fresh, err)
	}
}
