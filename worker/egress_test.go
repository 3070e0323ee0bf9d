package worker

import "testing"

func TestParsePortSet(t *testing.T) {
	set, err := parsePortSet("8000, 3000-3010,")
	if err != nil {
		t.Fatal(err)
	}
	for port, want := range map[int]bool{8000: true, 3000: true, 3005: true, 3010: true, 2999: false, 3011: false, 80: false} {
		if got := set.contains(port); got != want {
			t.Errorf("contains(%d) = %v, want %v", port, got, want)
		}
	}
	if empty, err := parsePortSet(""); err != nil || empty.contains(8000) {
		t.Errorf("empty spec: %v %v", empty, err)
	}
	for _, bad := range []string{"0", "65536", "10-5", "x", "1-", "-3", "80-90-100"} {
		if _, err := parsePortSet(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
