package procstat

import (
	"os"
	"testing"
)

func TestParse(t *testing.T) {
	line := "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 12345 1000 56 18446744073709551615"
	st, err := parse(42, line)
	if err != nil {
		t.Fatal(err)
	}
	if st.UTime != 7 || st.STime != 3 || st.CPUTicks() != 10 || st.StartTime != 12345 || st.RSSPages != 56 {
		t.Fatalf("parse = %+v", st)
	}
	for _, bad := range []string{"", "42 no paren", "42 (x) S 1 2", "42 (x) S 1 42 42 0 -1 4 100 0 0 0 x 3 0 0 20 0 1 0 1 1 5"} {
		if _, err := parse(42, bad); err == nil {
			t.Errorf("parse(%q) accepted", bad)
		}
	}
}

func TestReadSelf(t *testing.T) {
	st, err := Read(os.Getpid())
	if err != nil || st.StartTime == 0 || st.RSSPages == 0 {
		t.Fatalf("Read(self) = %+v, %v", st, err)
	}
	if _, err := Read(1 << 30); err == nil {
		t.Fatal("Read of a process that does not exist did not fail")
	}
}
