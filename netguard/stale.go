package netguard

import (
	"context"
	"regexp"
	"strconv"
	"strings"
)

// Tables this package makes are named "firkin_…" and match their uid range
// with one "meta skuid FIRST-LAST jump guest" rule in chain output.
var (
	tableLineRE = regexp.MustCompile(`^table inet (firkin_[A-Za-z0-9_]{1,57})$`)
	skuidRE     = regexp.MustCompile(`meta skuid (\d+)-(\d+) jump guest`)
)

// staleTables lists the tables of this package, other than keep, whose uid
// range overlaps first..last. Uid ranges are handed to one live worker at a
// time (package jail), so such a table was left by a worker that is gone
// (killed, with its machines gone too): its rules would still judge the new
// owner's machines.
func staleTables(ctx context.Context, nft, keep string, first, last uint32) ([]string, error) {
	list, err := nftExec(ctx, nft, "", "list", "tables", "inet")
	if err != nil {
		return nil, err
	}
	var stale []string
	for _, line := range strings.Split(list, "\n") {
		m := tableLineRE.FindStringSubmatch(strings.TrimSpace(line))
		if m == nil || m[1] == keep {
			continue
		}
		chain, err := nftExec(ctx, nft, "", "list", "chain", "inet", m[1], "output")
		if err != nil {
			continue // not one of ours after all (no such chain)
		}
		r := skuidRE.FindStringSubmatch(chain)
		if r == nil {
			continue
		}
		lo, err1 := strconv.ParseUint(r[1], 10, 32)
		hi, err2 := strconv.ParseUint(r[2], 10, 32)
		if err1 == nil && err2 == nil && lo <= uint64(last) && hi >= uint64(first) {
			stale = append(stale, m[1])
		}
	}
	return stale, nil
}
