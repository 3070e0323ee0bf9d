// Package jsonsize measures how long strings become in encoding/json's
// output, and cuts strings to fit a number of encoded bytes, so that replies
// can be bounded after encoding rather than before.
package jsonsize

import "unicode/utf8"

// String returns the length of s encoded by encoding/json (quotes
// included): control characters, the HTML characters <, > and &, U+2028,
// U+2029 and invalid bytes take six bytes each; '"' and '\\' and the short
// escapes \n, \r, \t two.
func String(s string) int {
	n := 2
	for i := 0; i < len(s); {
		w, size := runeLen(s[i:])
		n += w
		i += size
	}
	return n
}

// Cut returns the longest prefix of s, cut between runes, whose encoding
// takes at most max bytes (quotes included), and whether it cut anything.
func Cut(s string, max int) (string, bool) {
	n := 2
	for i := 0; i < len(s); {
		w, size := runeLen(s[i:])
		if n+w > max {
			return s[:i], true
		}
		n += w
		i += size
	}
	return s, false
}

// runeLen returns the encoded length of the rune at the start of s and how
// many bytes of s it takes.
func runeLen(s string) (encoded, size int) {
	c := s[0]
	if c < utf8.RuneSelf {
		switch {
		case c == '"' || c == '\\' || c == '\n' || c == '\r' || c == '\t':
			return 2, 1
		case c < 0x20 || c == '<' || c == '>' || c == '&':
			return 6, 1
		}
		return 1, 1
	}
	r, size := utf8.DecodeRuneInString(s)
	switch {
	case r == utf8.RuneError && size == 1:
		return 6, 1 // becomes \ufffd
	case r == '\u2028' || r == '\u2029':
		return 6, size
	}
	return size, size
}
