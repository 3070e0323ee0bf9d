package netguard

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// nftTimeout bounds one nft run.
const nftTimeout = 30 * time.Second

// findNft returns the path of the nft binary (PATH, then /usr/sbin and
// /sbin, which a non-login root shell may lack).
func findNft() (string, error) {
	if p, err := exec.LookPath("nft"); err == nil {
		return p, nil
	}
	for _, p := range []string{"/usr/sbin/nft", "/sbin/nft"} {
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", errdefs.Wrap(errdefs.ErrUnsupported, errors.New("netguard: nft not found (install the Debian package nftables)"))
}

// runNft runs `nft [-c] -f -` with script on stdin; check only checks it.
// The error carries nft's message.
func runNft(ctx context.Context, nft, script string, check bool) error {
	args := []string{"-f", "-"}
	if check {
		args = []string{"-c", "-f", "-"}
	}
	_, err := nftExec(ctx, nft, script, args...)
	return err
}

// nftExec runs nft with args and stdin (none when empty) and returns what
// it printed; the error carries what nft said on standard error.
func nftExec(ctx context.Context, nft, stdin string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, nftTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, nft, args...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(errOut.String())
		if len(msg) > 2000 {
			msg = msg[:2000] + "..."
		}
		return "", fmt.Errorf("nft %s: %w: %s", strings.Join(args, " "), err, msg)
	}
	return out.String(), nil
}

// Available reports why the Guard cannot work on this host, or nil: not
// Linux, not root, no nft binary, or nft refusing the rules it would load
// (checked with `nft -c`, nothing is changed). A caller getting an error
// runs guests with a network that cannot reach the host (QEMU user
// networking with restrict=on) and says so in its log. Errors are
// errdefs.ErrUnsupported.
func Available(ctx context.Context) error {
	unsupported := func(err error) error { return errdefs.Wrap(errdefs.ErrUnsupported, err) }
	if runtime.GOOS != "linux" {
		return unsupported(fmt.Errorf("netguard: nftables needs Linux, not %s", runtime.GOOS))
	}
	if os.Geteuid() != 0 {
		return unsupported(errors.New("netguard: not root (nftables rules need CAP_NET_ADMIN)"))
	}
	nft, err := findNft()
	if err != nil {
		return err
	}
	t := table{name: "firkin_probe", uidFirst: 4000000000, uidLast: 4000000001, defaultDNSPort: 53}
	p := Policy{AllowDomains: []string{"example.com"}, Allow: prefixes("10.0.0.0/8"), HostPorts: []uint16{1}}
	script := tableScript(t, true) + applyScript(t.name, t.uidFirst, p, plan(t.uidFirst, 1, p, 54), nil) + endQuarantineScript(t.name)
	if err := runNft(ctx, nft, script, true); err != nil {
		return unsupported(fmt.Errorf("netguard: nft cannot load the rules: %w", err))
	}
	return nil
}
