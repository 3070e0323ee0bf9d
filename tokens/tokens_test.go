package tokens

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// Golden values computed independently:
//
//	printf 'firkin traffic access v2\0sbx1\0gen-1' | openssl dgst -sha256 -hmac 0123456789abcdef-secret
const (
	goldenSecret   = "0123456789abcdef-secret"
	goldenTraffic1 = "16c8ec48e4333d05ec3fe82bfc33a8aacb5512b8169a8e1557014e7874df88f0" // sbx1, gen-1
	goldenTraffic2 = "632aa88d53a7a24ec264efb1e342f840255acaca60871ad3fe82d54f1bba2d4c" // sbx1, gen-2
)

func TestTrafficTokenGolden(t *testing.T) {
	secret := []byte(goldenSecret)
	if got := TrafficToken(secret, "sbx1", "gen-1"); got != goldenTraffic1 {
		t.Errorf("TrafficToken(sbx1, gen-1) = %s, want %s", got, goldenTraffic1)
	}
	if got := TrafficToken(secret, "sbx1", "gen-2"); got != goldenTraffic2 {
		t.Errorf("TrafficToken(sbx1, gen-2) = %s, want %s", got, goldenTraffic2)
	}
	if got := TrafficToken(secret, "sbx1", ""); got != "" {
		t.Errorf("TrafficToken with no generation = %q, want none", got)
	}
}

func TestVerifyTraffic(t *testing.T) {
	secret := []byte(goldenSecret)
	other := []byte("another-secret-of-enough-length")
	// The token of sandbox id sbx1 without a generation, as v1 made it.
	const v1Token = "3836d60b535dac3788f62f602d58aa05993453eea22fc8e8fa412a7932669c79"
	tests := []struct {
		name   string
		secret []byte
		id     string
		gen    string
		token  string
		want   bool
	}{
		{"right token", secret, "sbx1", "gen-1", goldenTraffic1, true},
		{"token of an earlier instance with the same id", secret, "sbx1", "gen-2", goldenTraffic1, false},
		{"token of a later instance with the same id", secret, "sbx1", "gen-1", goldenTraffic2, false},
		{"other sandbox, same generation", secret, "sbx2", "gen-1", goldenTraffic1, false},
		{"id and generation shifted", secret, "sbx1g", "en-1", goldenTraffic1, false},
		{"other secret", other, "sbx1", "gen-1", goldenTraffic1, false},
		{"no generation refuses all", secret, "sbx1", "", goldenTraffic1, false},
		{"no generation refuses the empty token", secret, "sbx1", "", "", false},
		{"v1 token of the id alone", secret, "sbx1", "gen-1", v1Token, false},
		{"empty", secret, "sbx1", "gen-1", "", false},
		{"prefix", secret, "sbx1", "gen-1", goldenTraffic1[:32], false},
		{"upper case", secret, "sbx1", "gen-1", strings.ToUpper(goldenTraffic1), false},
		{"extra byte", secret, "sbx1", "gen-1", goldenTraffic1 + "0", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := VerifyTraffic(tt.secret, tt.id, tt.gen, tt.token); got != tt.want {
				t.Errorf("VerifyTraffic = %v, want %v", got, tt.want)
			}
		})
	}
	// Every single-byte change is refused (the comparison looks at every
	// byte; it does so in constant time through hmac.Equal).
	for i := range len(goldenTraffic1) {
		b := []byte(goldenTraffic1)
		b[i] ^= 1
		if VerifyTraffic(secret, "sbx1", "gen-1", string(b)) {
			t.Fatalf("token changed at byte %d accepted", i)
		}
	}
	if Equal("", "") {
		t.Error("Equal matched an empty expected token")
	}
}

func TestMinter(t *testing.T) {
	if _, err := NewMinter([]byte("short")); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("NewMinter(short secret) error = %v, want ErrInvalidArgument", err)
	}
	m, err := NewMinter([]byte(goldenSecret))
	if err != nil {
		t.Fatal(err)
	}
	gen1, tok1 := m.MintTraffic("sbx1")
	gen2, tok2 := m.MintTraffic("sbx1") // the same id created again
	if len(gen1) != 2*GenerationBytes || gen1 == gen2 || tok1 == tok2 {
		t.Fatalf("two creates of sbx1: generations %q %q, tokens %q %q; want two fresh %d-byte generations and tokens", gen1, gen2, tok1, tok2, GenerationBytes)
	}
	if tok1 != TrafficToken([]byte(goldenSecret), "sbx1", gen1) {
		t.Error("MintTraffic's token is not TrafficToken of its generation")
	}
	if !m.VerifyTraffic("sbx1", gen1, tok1) || !m.VerifyTraffic("sbx1", gen2, tok2) {
		t.Error("a minted token does not verify")
	}
	if m.VerifyTraffic("sbx1", gen2, tok1) {
		t.Error("the first instance's token opens the second instance")
	}
	if m.VerifyTraffic("sbx2", gen1, tok1) {
		t.Error("a token opens another sandbox")
	}
	seen := map[string]bool{}
	for range 1000 {
		g := NewGeneration()
		if seen[g] {
			t.Fatalf("generation %s made twice", g)
		}
		seen[g] = true
	}
}

func TestSecretFromString(t *testing.T) {
	tests := []struct {
		in      string
		want    string
		wantErr bool
	}{
		{in: "0123456789abcdef", want: "0123456789abcdef"},
		{in: "  0123456789abcdef\n", want: "0123456789abcdef"},
		{in: "short", wantErr: true},
		{in: "   ", wantErr: true},
	}
	for _, tt := range tests {
		got, err := SecretFromString(tt.in)
		if tt.wantErr {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("SecretFromString(%q) error = %v, want ErrInvalidArgument", tt.in, err)
			}
			continue
		}
		if err != nil || string(got) != tt.want {
			t.Errorf("SecretFromString(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
		}
	}
}

func TestLoadOrCreateSecret(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", "traffic.secret")
	first, err := LoadOrCreateSecret(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(first) != 2*SecretBytes {
		t.Fatalf("secret is %d bytes of hex, want %d", len(first), 2*SecretBytes)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Errorf("secret file mode = %o, want 600", perm)
	}
	again, err := LoadOrCreateSecret(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(again) != string(first) {
		t.Error("second load returned a different secret")
	}
	entries, err := os.ReadDir(filepath.Dir(path))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 {
		t.Errorf("state dir holds %d entries, want only the secret (temporary files left behind?)", len(entries))
	}

	// The configured secret overrides the file.
	got, err := LoadSecret("configured-secret-value", path)
	if err != nil || string(got) != "configured-secret-value" {
		t.Errorf("LoadSecret(configured) = %q, %v", got, err)
	}
	got, err = LoadSecret("", path)
	if err != nil || string(got) != string(first) {
		t.Errorf("LoadSecret(\"\") = %q, %v; want the file's secret", got, err)
	}
}

func TestLoadOrCreateSecretConcurrent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "traffic.secret")
	const n = 8
	results := make([][]byte, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { results[i], errs[i] = LoadOrCreateSecret(path) })
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("load %d: %v", i, errs[i])
		}
		if string(results[i]) != string(results[0]) {
			t.Fatalf("concurrent first starts disagree on the secret")
		}
	}
}

func TestLoadOrCreateSecretErrors(t *testing.T) {
	dir := t.TempDir()
	short := filepath.Join(dir, "short")
	if err := os.WriteFile(short, []byte("abc\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadOrCreateSecret(short); !errors.Is(err, errdefs.ErrIntegrity) {
		t.Errorf("short file: error = %v, want ErrIntegrity", err)
	}
	if b, _ := os.ReadFile(short); string(b) != "abc\n" {
		t.Errorf("short file was rewritten: %q", b)
	}
	if _, err := LoadOrCreateSecret(""); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("empty path: error = %v, want ErrInvalidArgument", err)
	}
	if _, err := LoadOrCreateSecret(dir); err == nil {
		t.Error("a directory as the secret path: no error")
	}
}

// TestEnvdToken: the envd token opens its own (id, generation) only, is not
// the traffic token of the same pair, and nothing opens an empty generation.
func TestEnvdToken(t *testing.T) {
	secret := []byte("envd test secret of enough bytes")
	tok := EnvdToken(secret, "sb1", "gen1")
	if len(tok) != 64 {
		t.Fatalf("envd token %q: want 64 hex digits", tok)
	}
	if tok == TrafficToken(secret, "sb1", "gen1") {
		t.Fatal("the envd token equals the traffic token of the same sandbox")
	}
	if !VerifyEnvd(secret, "sb1", "gen1", tok) {
		t.Fatal("the envd token does not open its sandbox")
	}
	for _, c := range []struct{ id, gen, tok string }{
		{"sb1", "gen2", tok}, {"sb2", "gen1", tok}, {"sb1", "gen1", TrafficToken(secret, "sb1", "gen1")},
		{"sb1", "", ""}, {"sb1", "gen1", ""},
	} {
		if VerifyEnvd(secret, c.id, c.gen, c.tok) {
			t.Errorf("VerifyEnvd(%q, %q, %q) = true, want false", c.id, c.gen, c.tok)
		}
	}
	if VerifyTraffic(secret, "sb1", "gen1", tok) {
		t.Error("the envd token passes as the traffic token")
	}
}
