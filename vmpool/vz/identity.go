package vz

import (
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// identity is what makes a VZ machine the same machine across a save and a
// restore: its generic machine identifier and the MAC address of each
// network device. It is generated once per machine and persisted in the
// machine's directory (identity.json); snapshots carry it.
type identity struct {
	MachineIdentifier []byte   `json:"machine_identifier"`
	MACs              []string `json:"network_macs"`
}

// newMAC returns a random locally administered unicast MAC address.
func newMAC(r io.Reader) (string, error) {
	var b [6]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return "", fmt.Errorf("random MAC: %w", err)
	}
	b[0] = (b[0] | 0x02) &^ 0x01 // locally administered, unicast
	return net.HardwareAddr(b[:]).String(), nil
}

// checkMAC checks that s is a unicast 48-bit MAC address in canonical form.
func checkMAC(s string) error {
	hw, err := net.ParseMAC(s)
	if err != nil {
		return fmt.Errorf("MAC %q: %w", s, err)
	}
	if len(hw) != 6 {
		return fmt.Errorf("MAC %q: want 6 bytes", s)
	}
	if hw[0]&0x01 != 0 {
		return fmt.Errorf("MAC %q is a multicast address", s)
	}
	if hw.String() != s {
		return fmt.Errorf("MAC %q: want the form %s", s, hw.String())
	}
	return nil
}

// newIdentity generates an identity with nics MAC addresses.
func newIdentity(hv hypervisor, nics int) (identity, error) {
	mid, err := hv.NewMachineIdentifier()
	if err != nil {
		return identity{}, fmt.Errorf("new machine identifier: %w", err)
	}
	if len(mid) == 0 {
		return identity{}, errdefs.Wrap(errdefs.ErrInternalFailure, errors.New("new machine identifier: empty"))
	}
	id := identity{MachineIdentifier: mid}
	for range nics {
		mac, err := newMAC(rand.Reader)
		if err != nil {
			return identity{}, err
		}
		id.MACs = append(id.MACs, mac)
	}
	return id, nil
}

// validate checks a loaded or received identity.
func (id identity) validate() error {
	var errs []error
	if len(id.MachineIdentifier) == 0 {
		errs = append(errs, errors.New("no machine identifier"))
	}
	for _, mac := range id.MACs {
		if err := checkMAC(mac); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// loadOrCreateIdentity returns the identity persisted in dir, or generates
// one with nics MACs and persists it. What is on disk never changes: a
// machine that needs more network devices than its identity has MACs for
// gets new MACs added after the ones it has.
func loadOrCreateIdentity(dir string, hv hypervisor, nics int) (identity, error) {
	id, err := loadIdentity(dir)
	if err == nil {
		if len(id.MACs) >= nics {
			return id, nil
		}
		for len(id.MACs) < nics {
			mac, err := newMAC(rand.Reader)
			if err != nil {
				return identity{}, err
			}
			id.MACs = append(id.MACs, mac)
		}
		return id, writeIdentity(dir, id)
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return identity{}, err
	}
	id, err = newIdentity(hv, nics)
	if err != nil {
		return identity{}, err
	}
	if err := writeIdentity(dir, id); err != nil {
		return identity{}, err
	}
	return id, nil
}

// loadIdentity reads dir/identity.json.
func loadIdentity(dir string) (identity, error) {
	b, err := os.ReadFile(filepath.Join(dir, identityFile))
	if err != nil {
		return identity{}, fmt.Errorf("vz: read identity: %w", err)
	}
	var id identity
	if err := json.Unmarshal(b, &id); err != nil {
		return identity{}, errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("vz: identity %s: %w", filepath.Join(dir, identityFile), err))
	}
	if err := id.validate(); err != nil {
		return identity{}, errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("vz: identity %s: %w", filepath.Join(dir, identityFile), err))
	}
	return id, nil
}

// writeIdentity persists id as dir/identity.json (write and rename).
func writeIdentity(dir string, id identity) error {
	if err := id.validate(); err != nil {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("vz: identity: %w", err))
	}
	return writeJSON(filepath.Join(dir, identityFile), id)
}

// writeJSON writes v to path atomically: a temporary file in the same
// directory, synced, then renamed.
func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("vz: encode %s: %w", filepath.Base(path), err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+"-")
	if err != nil {
		return fmt.Errorf("vz: write %s: %w", filepath.Base(path), err)
	}
	_, werr := tmp.Write(append(b, '\n'))
	serr := tmp.Sync()
	cerr := tmp.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("vz: write %s: %w", filepath.Base(path), err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("vz: write %s: %w", filepath.Base(path), err)
	}
	return nil
}
