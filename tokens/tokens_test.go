package tokens

import (
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// Golden values computed independently:
//
//	printf 'firkin traffic access v1\0sbx1' | openssl dgst -sha256 -hmac 0123456789abcdef-secret
const (
	goldenSecret  = "0123456789abcdef-secret"
	goldenEnvd    = "875858aa2ef0775f68ff1773e4097a09c1c2bcbdfbc335690b373c7fc2f73726"
	goldenTraffic = "3836d60b535dac3788f62f602d58aa05993453eea22fc8e8fa412a7932669c79"
)

func TestTokensGolden(t *testing.T) {
	secret := []byte(goldenSecret)
	if got := EnvdToken(secret, "sbx1"); got != goldenEnvd {
		t.Errorf("EnvdToken = %s, want %s", got, goldenEnvd)
	}
	if got := TrafficToken(secret, "sbx1"); got != goldenTraffic {
		t.Errorf("TrafficToken = %s, want %s", got, goldenTraffic)
	}
}

func TestVerify(t *testing.T) {
	secret := []byte(goldenSecret)
	other := []byte("another-secret-of-enough-length")
	tests := []struct {
		name   string
		secret []byte
		id     string
		token  string
		want   bool
	}{
		{"right token", secret, "sbx1", goldenTraffic, true},
		{"envd token is not a traffic token", secret, "sbx1", goldenEnvd, false},
		{"other sandbox", secret, "sbx2", goldenTraffic, false},
		{"other secret", other, "sbx1", goldenTraffic, false},
		{"empty", secret, "sbx1", "", false},
		{"prefix", secret, "sbx1", goldenTraffic[:32], false},
		{"upper case", secret, "sbx1", "3836D60B535DAC3788F62F602D58AA05993453EEA22FC8E8FA412A7932669C79", false},
		{"extra byte", secret, "sbx1", goldenTraffic + "0", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := VerifyTraffic(tt.secret, tt.id, tt.token); got != tt.want {
				t.Errorf("VerifyTraffic = %v, want %v", got, tt.want)
			}
		})
	}
	if !VerifyEnvd(secret, "sbx1", goldenEnvd) || VerifyEnvd(secret, "sbx1", goldenTraffic) {
		t.Error("VerifyEnvd mixes up the tokens")
	}
	if Equal("", "") {
		t.Error("Equal matched an empty expected token")
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
