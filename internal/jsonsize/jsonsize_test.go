package jsonsize

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestStringMatchesEncodingJSON(t *testing.T) {
	for _, s := range []string{
		"", "plain", "quote\" back\\slash", "\n\r\t\x00\x01\x1f\x7f", "<a>&b", "é€😀",
		"\u2028\u2029", "bad \xff\xfe utf8", strings.Repeat("\x01", 1000),
	} {
		b, err := json.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		if got := String(s); got != len(b) {
			t.Errorf("String(%q) = %d, encoding/json wrote %d", s, got, len(b))
		}
	}
}

func TestCut(t *testing.T) {
	s := strings.Repeat("a\x01é", 100)
	for _, max := range []int{2, 3, 8, 9, 10, 11, 100, 1000, 10000} {
		got, cut := Cut(s, max)
		if !strings.HasPrefix(s, got) {
			t.Fatalf("Cut(%d) is not a prefix", max)
		}
		b, _ := json.Marshal(got)
		if len(b) > max && max >= 2 {
			t.Errorf("Cut(%d) encodes to %d bytes", max, len(b))
		}
		if cut != (got != s) {
			t.Errorf("Cut(%d) says cut=%v", max, cut)
		}
		if cut { // the next rune would not have fitted
			next := s[:len(got)+1]
			if len(next) < len(s) && String(next) <= max && (next[len(next)-1] < 0x80) {
				t.Errorf("Cut(%d) stopped early at %d bytes", max, len(got))
			}
		}
	}
}
