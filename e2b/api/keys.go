package api

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/internal/atomicfile"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// KeyFile is the name of the API key file made in the state directory when
// the E2B API is on and no key is configured.
const KeyFile = "e2b-api-key"

// Bounds of API keys.
const (
	minKeyLen = 16
	maxKeyLen = 256
	maxKeys   = 1024
	// maxKeyFile bounds a key file read.
	maxKeyFile = 256 << 10
)

// Keys is a set of API keys checked in constant time. The zero value
// accepts nothing.
type Keys struct {
	digests [][sha256.Size]byte
}

// NewKeys validates keys (16..256 printable ASCII characters without
// spaces, at most 1024) and returns the set.
func NewKeys(keys []string) (*Keys, error) {
	if len(keys) > maxKeys {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("e2b api keys: %d keys, at most %d", len(keys), maxKeys))
	}
	k := &Keys{}
	for i, key := range keys {
		if err := validateKey(key); err != nil {
			return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("e2b api key %d: %w", i+1, err))
		}
		k.digests = append(k.digests, sha256.Sum256([]byte(key)))
	}
	return k, nil
}

func validateKey(key string) error {
	if len(key) < minKeyLen || len(key) > maxKeyLen {
		return fmt.Errorf("%d characters: want %d..%d", len(key), minKeyLen, maxKeyLen)
	}
	for i := 0; i < len(key); i++ {
		if c := key[i]; c <= ' ' || c > '~' {
			return errors.New("want printable ASCII without spaces")
		}
	}
	return nil
}

// Len is the number of keys.
func (k *Keys) Len() int {
	if k == nil {
		return 0
	}
	return len(k.digests)
}

// Check reports whether presented is one of the keys. It compares digests
// of equal length in constant time and looks at every key, so neither the
// time nor the position of a match tells anything about the keys.
func (k *Keys) Check(presented string) bool {
	if k == nil || presented == "" || len(presented) > maxKeyLen {
		return false
	}
	d := sha256.Sum256([]byte(presented))
	ok := 0
	for _, want := range k.digests {
		ok |= subtle.ConstantTimeCompare(d[:], want[:])
	}
	return ok == 1
}

// ParseKeys reads keys from text: one per line or separated by commas,
// blank lines and lines starting with # ignored.
func ParseKeys(text string) []string {
	var out []string
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 0, 4096), maxKeyFile)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		for _, f := range strings.Split(line, ",") {
			if f = strings.TrimSpace(f); f != "" {
				out = append(out, f)
			}
		}
	}
	return out
}

// ReadKeyFile reads the keys of a key file (at most 256 KiB).
func ReadKeyFile(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("e2b api keys file: %w", err)
	}
	defer f.Close()
	var buf bytes.Buffer
	if _, err := buf.ReadFrom(io.LimitReader(f, maxKeyFile+1)); err != nil {
		return nil, fmt.Errorf("e2b api keys file %s: %w", path, err)
	}
	if buf.Len() > maxKeyFile {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("e2b api keys file %s: over %d bytes", path, maxKeyFile))
	}
	keys := ParseKeys(buf.String())
	if len(keys) == 0 {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("e2b api keys file %s holds no key", path))
	}
	return keys, nil
}

// LoadOrCreateKey returns the key kept in <stateDir>/e2b-api-key, making
// one (e2b_ and 40 hex characters, mode 0600) when the file does not
// exist. created says it was made now.
func LoadOrCreateKey(stateDir string) (key, path string, created bool, err error) {
	key, path, created, err = loadOrCreateKey(stateDir)
	if errors.Is(err, fs.ErrExist) { // another process made it first
		key, path, created, err = loadOrCreateKey(stateDir)
	}
	return key, path, created, err
}

func loadOrCreateKey(stateDir string) (key, path string, created bool, err error) {
	path = filepath.Join(stateDir, KeyFile)
	if keys, err := ReadKeyFile(path); err == nil {
		if len(keys) != 1 {
			return "", path, false, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("%s: want one key, found %d", path, len(keys)))
		}
		return keys[0], path, false, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return "", path, false, err
	}
	var b [20]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", path, false, fmt.Errorf("e2b api key: %w", err)
	}
	key = "e2b_" + hex.EncodeToString(b[:])
	if err := atomicfile.Create(path, []byte(key+"\n"), 0o600); err != nil {
		return "", path, false, fmt.Errorf("e2b api key: %w", err)
	}
	return key, path, true, nil
}

// KeysEnv is the environment variable holding API keys (comma-separated)
// when no key file is given.
const KeysEnv = "FIRKIN_E2B_API_KEYS"

// LoadKeys returns the API keys of a server: those of file when given,
// else those of env (the value of FIRKIN_E2B_API_KEYS), else the key kept
// in <stateDir>/e2b-api-key (made on first use; its path is logged, never
// the key).
func LoadKeys(file, env, stateDir string, log *slog.Logger) (*Keys, error) {
	if log == nil {
		log = slog.Default()
	}
	switch {
	case file != "" && env != "":
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("--e2b-api-keys-file and %s both given: give the keys once", KeysEnv))
	case file != "":
		keys, err := ReadKeyFile(file)
		if err != nil {
			return nil, err
		}
		return NewKeys(keys)
	case env != "":
		return NewKeys(ParseKeys(env))
	}
	key, path, created, err := LoadOrCreateKey(stateDir)
	if err != nil {
		return nil, err
	}
	if created {
		log.Info("made an E2B API key (no --e2b-api-keys-file or "+KeysEnv+"): use it as E2B_API_KEY", "file", path)
	} else {
		log.Info("E2B API key: use it as E2B_API_KEY", "file", path)
	}
	return NewKeys([]string{key})
}

// ParseTemplates parses "base=tiny,python=py": E2B template ids mapped to
// firkin templates (empty: DefaultTemplates).
func ParseTemplates(s string) (map[string]string, error) {
	if strings.TrimSpace(s) == "" {
		return DefaultTemplates, nil
	}
	out := map[string]string{}
	for _, part := range strings.Split(s, ",") {
		e2b, firkin, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok || !validE2BTemplate(e2b) || subjects.ValidateTemplateID(firkin) != nil {
			return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("--e2b-templates %q: want e2b-id=firkin-template[,...]", s))
		}
		out[e2b] = firkin
	}
	return out, nil
}
