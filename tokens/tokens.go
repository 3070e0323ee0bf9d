// Package tokens makes and checks the traffic access token of a sandbox,
// the way E2B has it: traffic_access_token (for port routing into a private
// sandbox) is HMAC-SHA256, under a purpose label and keyed with a worker
// secret, of the sandbox id and the sandbox's generation, hex encoded.
//
// The generation is a random nonce made at every create (a boot, a restore
// and a create served from the warm pool alike), so a token opens one
// sandbox instance only: a later sandbox that reuses the id gets a new
// generation, and the token of the killed one does not open it. The
// generation is not secret; it is what is kept (in the session record) to
// verify a token, which never is: with the secret, the generation and the
// id, any worker can recompute and check a token.
//
// envd_access_token, issued for a secure sandbox, opens its E2B sandbox
// API (port 49983, package e2b/envd; sent in X-Access-Token): it is made
// the same way under its own purpose label, so neither token passes as the
// other.
//
// The secret is text: either configured by the operator or made on first
// start (32 random bytes, hex encoded) and kept in a 0600 file in the state
// directory. Workers that share a secret check each other's tokens, so
// copying the file's content into the configuration of every worker of a
// cluster makes tokens valid on any of them.
package tokens

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/internal/atomicfile"
)

// SecretBytes is how many random bytes a generated secret holds.
const SecretBytes = 32

// MinSecretLen is the shortest secret accepted, in bytes of text.
const MinSecretLen = 16

// GenerationBytes is how many random bytes a generation holds.
const GenerationBytes = 16

// purposeTraffic labels the traffic token, so that a token minted for
// another purpose under the same secret never passes as one. v2 binds the
// generation; v1 tokens (of the sandbox id alone) are no longer accepted.
const purposeTraffic = "firkin traffic access v2"

// purposeEnvd labels the envd access token.
const purposeEnvd = "firkin envd access v1"

// LoadSecret returns the worker secret: configured when it is not empty
// (the operator's choice overrides the file), otherwise the one kept at path
// (see LoadOrCreateSecret).
func LoadSecret(configured, path string) ([]byte, error) {
	if configured != "" {
		return SecretFromString(configured)
	}
	return LoadOrCreateSecret(path)
}

// SecretFromString checks a configured secret and returns it as the key.
// Surrounding white space is dropped; at least MinSecretLen bytes must remain.
func SecretFromString(s string) ([]byte, error) {
	s = strings.TrimSpace(s)
	if err := checkSecretLen(len(s)); err != nil {
		return nil, err
	}
	return []byte(s), nil
}

// checkSecretLen refuses, as errdefs.ErrInvalidArgument, a secret of n bytes
// when that is under MinSecretLen.
func checkSecretLen(n int) error {
	if n < MinSecretLen {
		return errdefs.Wrap(errdefs.ErrInvalidArgument,
			fmt.Errorf("tokens: secret is %d bytes, want at least %d", n, MinSecretLen))
	}
	return nil
}

// LoadOrCreateSecret reads the secret kept at path, or, when there is no
// file yet, makes one of SecretBytes random bytes, writes it hex encoded to
// a new 0600 file (atomically: concurrent starts agree on one secret) and
// returns it. A file that exists but holds too short a secret is an
// errdefs.ErrIntegrity error and is left alone.
func LoadOrCreateSecret(path string) ([]byte, error) {
	if path == "" {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, errors.New("tokens: no secret path"))
	}
	secret, err := readSecret(path)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return secret, err
	}
	if err := createSecret(path); err != nil {
		return nil, err
	}
	return readSecret(path)
}

// readSecret reads and checks the secret file at path.
func readSecret(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		return nil, errdefs.Wrap(errdefs.ErrInternalFailure, fmt.Errorf("tokens: read secret: %w", err))
	}
	s := strings.TrimSpace(string(b))
	if len(s) < MinSecretLen {
		return nil, errdefs.Wrap(errdefs.ErrIntegrity,
			fmt.Errorf("tokens: secret file %s holds %d bytes, want at least %d", path, len(s), MinSecretLen))
	}
	return []byte(s), nil
}

// createSecret writes a new random secret to path unless a file is already
// there: it writes a temporary file and links it into place, so a reader
// never sees a partial secret and a concurrent creator's secret wins.
func createSecret(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return errdefs.Wrap(errdefs.ErrInternalFailure, fmt.Errorf("tokens: create secret: %w", err))
	}
	raw := make([]byte, SecretBytes)
	if _, err := rand.Read(raw); err != nil {
		return errdefs.Wrap(errdefs.ErrInternalFailure, fmt.Errorf("tokens: create secret: %w", err))
	}
	if err := atomicfile.Create(path, []byte(hex.EncodeToString(raw)+"\n"), 0o600); err != nil && !errors.Is(err, fs.ErrExist) {
		return errdefs.Wrap(errdefs.ErrInternalFailure, fmt.Errorf("tokens: create secret: %w", err))
	}
	return nil
}

// NewGeneration returns a new random generation: GenerationBytes random
// bytes, hex encoded.
func NewGeneration() string {
	raw := make([]byte, GenerationBytes)
	_, _ = rand.Read(raw) // crypto/rand.Read does not fail (it crashes the program instead)
	return hex.EncodeToString(raw)
}

// TrafficToken returns the traffic_access_token of generation of sandbox
// sandboxID, which a private sandbox's proxy requests carry in the
// e2b-traffic-access-token header. It is empty when the generation is.
func TrafficToken(secret []byte, sandboxID, generation string) string {
	if generation == "" {
		return ""
	}
	return token(secret, purposeTraffic, sandboxID, generation)
}

// VerifyTraffic reports whether tok is the traffic_access_token of
// generation of sandbox sandboxID, in constant time. Nothing matches an
// empty generation (a record made before generations existed).
func VerifyTraffic(secret []byte, sandboxID, generation, tok string) bool {
	return Equal(tok, TrafficToken(secret, sandboxID, generation))
}

// EnvdToken returns the envd_access_token of generation of sandbox
// sandboxID, which requests to a secure sandbox's E2B sandbox API carry in
// X-Access-Token. It is empty when the generation is.
func EnvdToken(secret []byte, sandboxID, generation string) string {
	if generation == "" {
		return ""
	}
	return token(secret, purposeEnvd, sandboxID, generation)
}

// VerifyEnvd reports whether tok is the envd_access_token of generation of
// sandbox sandboxID, in constant time. Nothing matches an empty generation.
func VerifyEnvd(secret []byte, sandboxID, generation, tok string) bool {
	return Equal(tok, EnvdToken(secret, sandboxID, generation))
}

// Equal compares a presented token with the expected one in constant time
// (the time depends only on the lengths). An empty expected token matches
// nothing.
func Equal(presented, expected string) bool {
	if expected == "" {
		return false
	}
	return hmac.Equal([]byte(presented), []byte(expected))
}

// token is hex(HMAC-SHA256(secret, purpose || 0x00 || sandboxID || 0x00 ||
// generation)). Sandbox ids and generations hold no NUL byte, so the
// message names one (id, generation) pair.
func token(secret []byte, purpose, sandboxID, generation string) string {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(purpose))
	m.Write([]byte{0})
	m.Write([]byte(sandboxID))
	m.Write([]byte{0})
	m.Write([]byte(generation))
	return hex.EncodeToString(m.Sum(nil))
}

// Minter mints and checks traffic tokens under one worker secret. It is
// safe for concurrent use.
type Minter struct{ secret []byte }

// NewMinter returns a Minter keyed with secret (at least MinSecretLen
// bytes; see LoadSecret).
func NewMinter(secret []byte) (*Minter, error) {
	if err := checkSecretLen(len(secret)); err != nil {
		return nil, err
	}
	return &Minter{secret: append([]byte(nil), secret...)}, nil
}

// MintTraffic makes a new instance of sandbox sandboxID: a fresh
// generation, to keep, and its traffic token, to hand out once.
func (m *Minter) MintTraffic(sandboxID string) (generation, token string) {
	generation = NewGeneration()
	return generation, TrafficToken(m.secret, sandboxID, generation)
}

// VerifyTraffic reports whether tok is the traffic token of generation of
// sandbox sandboxID, in constant time.
func (m *Minter) VerifyTraffic(sandboxID, generation, tok string) bool {
	return VerifyTraffic(m.secret, sandboxID, generation, tok)
}

// EnvdToken returns the envd access token of generation of sandbox
// sandboxID (a secure sandbox's; see EnvdToken).
func (m *Minter) EnvdToken(sandboxID, generation string) string {
	return EnvdToken(m.secret, sandboxID, generation)
}

// VerifyEnvd reports whether tok is the envd access token of generation of
// sandbox sandboxID, in constant time.
func (m *Minter) VerifyEnvd(sandboxID, generation, tok string) bool {
	return VerifyEnvd(m.secret, sandboxID, generation, tok)
}
