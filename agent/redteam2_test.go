//go:build unix

package agent

import (
	"strings"
	"testing"

	"github.com/hashicorp/yamux"
)

// A replaced agent answers a list with the most entries allowed, each with
// the longest path and link allowed: the host must not keep ~80 MiB per
// list request (the client's reply holds at most one NATS message anyway).
func TestRedteamListBytesBound(t *testing.T) {
	long := "/" + strings.Repeat("a", maxPathLen-1)
	c := hostileGuest(t, func(st *yamux.Stream, req request) {
		if req.Op != opList {
			return
		}
		batch := make([]FileInfo, 100) // ~800 KiB of JSON: one frame
		for i := range batch {
			batch[i] = FileInfo{Path: long, Link: long, Type: TypeSymlink}
		}
		for range MaxListEntries / len(batch) {
			if writeJSONFrame(st, frameData, batch) != nil {
				return
			}
		}
		_ = writeFrame(st, frameOK, nil)
	})
	ents, truncated, err := c.Files("").List(bctx(t), "/", 1)
	if err != nil {
		t.Fatalf("list: %v", err)
	}
	kept := 0
	for _, e := range ents {
		kept += len(e.Path) + len(e.Link)
	}
	if kept > 8<<20 || !truncated {
		t.Fatalf("kept %d entries, %d bytes of paths (truncated %v): want at most 8 MiB, truncated", len(ents), kept, truncated)
	}
}
