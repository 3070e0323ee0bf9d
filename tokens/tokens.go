// Package tokens makes and checks the stateless access tokens of a sandbox,
// the way E2B has them: envd_access_token (for the sandbox's own API) and
// traffic_access_token (for port routing into a private sandbox) are
// HMAC-SHA256 of the sandbox id, each under its own purpose label, keyed
// with a worker secret and hex encoded. Nothing is stored per sandbox: any
// holder of the secret can recompute and check a token.
//
// The secret is text: either configured by the operator or made on first
// start (32 random bytes, hex encoded) and kept in a 0600 file in the state
// directory. Workers that share a secret give a sandbox the same tokens, so
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
)

// SecretBytes is how many random bytes a generated secret holds.
const SecretBytes = 32

// MinSecretLen is the shortest secret accepted, in bytes of text.
const MinSecretLen = 16

// Purpose labels keep the two tokens of a sandbox apart: knowing one tells
// nothing about the other.
const (
	purposeEnvd    = "firkin envd access v1"
	purposeTraffic = "firkin traffic access v1"
)

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
	if len(s) < MinSecretLen {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument,
			fmt.Errorf("tokens: secret is %d bytes, want at least %d", len(s), MinSecretLen))
	}
	return []byte(s), nil
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
func createSecret(path string) (err error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return errdefs.Wrap(errdefs.ErrInternalFailure, fmt.Errorf("tokens: create secret: %w", err))
	}
	raw := make([]byte, SecretBytes)
	if _, err := rand.Read(raw); err != nil {
		return errdefs.Wrap(errdefs.ErrInternalFailure, fmt.Errorf("tokens: create secret: %w", err))
	}
	tmp, err := os.CreateTemp(dir, ".secret-*")
	if err != nil {
		return errdefs.Wrap(errdefs.ErrInternalFailure, fmt.Errorf("tokens: create secret: %w", err))
	}
	defer func() {
		if rmErr := os.Remove(tmp.Name()); rmErr != nil && !errors.Is(rmErr, fs.ErrNotExist) && err == nil {
			err = errdefs.Wrap(errdefs.ErrInternalFailure, fmt.Errorf("tokens: create secret: %w", rmErr))
		}
	}()
	// CreateTemp makes the file 0600 already; chmod states it.
	if err := tmp.Chmod(0o600); err != nil {
		_ = tmp.Close()
		return errdefs.Wrap(errdefs.ErrInternalFailure, fmt.Errorf("tokens: create secret: %w", err))
	}
	if _, err := tmp.WriteString(hex.EncodeToString(raw) + "\n"); err != nil {
		_ = tmp.Close()
		return errdefs.Wrap(errdefs.ErrInternalFailure, fmt.Errorf("tokens: create secret: %w", err))
	}
	if err := tmp.Sync(); err != nil {
		_ = tmp.Close()
		return errdefs.Wrap(errdefs.ErrInternalFailure, fmt.Errorf("tokens: create secret: %w", err))
	}
	if err := tmp.Close(); err != nil {
		return errdefs.Wrap(errdefs.ErrInternalFailure, fmt.Errorf("tokens: create secret: %w", err))
	}
	if err := os.Link(tmp.Name(), path); err != nil && !errors.Is(err, fs.ErrExist) {
		return errdefs.Wrap(errdefs.ErrInternalFailure, fmt.Errorf("tokens: create secret: %w", err))
	}
	return nil
}

// EnvdToken returns the sandbox's envd_access_token.
func EnvdToken(secret []byte, sandboxID string) string {
	return token(secret, purposeEnvd, sandboxID)
}

// TrafficToken returns the sandbox's traffic_access_token, which a private
// sandbox's proxy requests carry in the e2b-traffic-access-token header.
func TrafficToken(secret []byte, sandboxID string) string {
	return token(secret, purposeTraffic, sandboxID)
}

// VerifyEnvd reports whether tok is the sandbox's envd_access_token, in
// constant time.
func VerifyEnvd(secret []byte, sandboxID, tok string) bool {
	return Equal(tok, EnvdToken(secret, sandboxID))
}

// VerifyTraffic reports whether tok is the sandbox's traffic_access_token,
// in constant time.
func VerifyTraffic(secret []byte, sandboxID, tok string) bool {
	return Equal(tok, TrafficToken(secret, sandboxID))
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

// token is hex(HMAC-SHA256(secret, purpose || 0x00 || sandboxID)).
func token(secret []byte, purpose, sandboxID string) string {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(purpose))
	m.Write([]byte{0})
	m.Write([]byte(sandboxID))
	return hex.EncodeToString(m.Sum(nil))
}
