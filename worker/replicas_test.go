package worker

import "testing"

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
