package tokens

import (
	"strings"
	"testing"
)

// FuzzVerifyTraffic: a presented token opens (id, generation) only when it
// is that pair's token; nothing opens an empty generation; and two pairs
// of ids and generations without NUL (what sandbox ids and generations
// are) never share a token, so a token of one sandbox instance opens no
// other.
func FuzzVerifyTraffic(f *testing.F) {
	secret := []byte("fuzz secret of sixteen bytes")
	tok := TrafficToken(secret, "sb1", "0123456789abcdef")
	f.Add("sb1", "0123456789abcdef", tok, "sb1", "0123456789abcdee")
	f.Add("sb1", "", "", "sb1", "g")
	f.Add("a", "bc", tok, "ab", "c")
	f.Add("sb1", "g", strings.ToUpper(tok), "sb2", "g")
	f.Add("sb1", "g", tok[:32], "sb1", "g")
	f.Fuzz(func(t *testing.T, id, gen, presented, id2, gen2 string) {
		want := TrafficToken(secret, id, gen)
		if VerifyTraffic(secret, id, gen, presented) != (gen != "" && presented == want) {
			t.Fatalf("VerifyTraffic(%q, %q, %q) disagrees with the token %q", id, gen, presented, want)
		}
		if gen != "" && !VerifyTraffic(secret, id, gen, want) {
			t.Fatalf("the token of (%q, %q) does not open it", id, gen)
		}
		if strings.ContainsRune(id+gen+id2+gen2, 0) || gen == "" || gen2 == "" || (id == id2 && gen == gen2) {
			return
		}
		if VerifyTraffic(secret, id2, gen2, want) {
			t.Fatalf("the token of (%q, %q) opens (%q, %q)", id, gen, id2, gen2)
		}
	})
}
