//go:build linux

package agent

import (
	"bufio"
	"bytes"
	"io"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// stats answers opStats from /proc and statfs of the root.
func (s *Server) stats(st io.Writer) {
	var out GuestStats
	if b, err := os.ReadFile("/proc/stat"); err == nil {
		out.CPUBusy, out.CPUTotal = parseProcStat(b)
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		out.MemTotal, out.MemAvailable = parseMeminfo(b)
	}
	root := s.Root
	if root == "" {
		root = "/"
	}
	var fs unix.Statfs_t
	if unix.Statfs(root, &fs) == nil {
		bs := uint64(fs.Bsize)
		out.DiskTotal = fs.Blocks * bs
		out.DiskUsed = (fs.Blocks - fs.Bfree) * bs
	}
	if b, err := os.ReadFile("/proc/net/dev"); err == nil {
		out.NetRx, out.NetTx = parseNetDev(b)
	}
	_ = writeJSONFrame(st, frameOK, out)
}

// parseProcStat sums the first "cpu" line: busy is all but idle and iowait.
func parseProcStat(b []byte) (busy, total uint64) {
	line, _, _ := bytes.Cut(b, []byte("\n"))
	f := strings.Fields(string(line))
	if len(f) < 5 || f[0] != "cpu" {
		return 0, 0
	}
	for i, v := range f[1:] {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			continue
		}
		if i >= 8 { // guest and guest_nice are already in user and nice
			break
		}
		total += n
		if i != 3 && i != 4 {
			busy += n
		}
	}
	return busy, total
}

// parseMeminfo returns MemTotal and MemAvailable in bytes.
func parseMeminfo(b []byte) (total, avail uint64) {
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 {
			continue
		}
		n, err := strconv.ParseUint(f[1], 10, 64)
		if err != nil {
			continue
		}
		switch f[0] {
		case "MemTotal:":
			total = n << 10
		case "MemAvailable:":
			avail = n << 10
		}
	}
	return total, avail
}

// parseNetDev sums received and sent bytes of every interface but lo.
func parseNetDev(b []byte) (rx, tx uint64) {
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok || strings.TrimSpace(name) == "lo" {
			continue
		}
		f := strings.Fields(rest)
		if len(f) < 9 {
			continue
		}
		r, err1 := strconv.ParseUint(f[0], 10, 64)
		t, err2 := strconv.ParseUint(f[8], 10, 64)
		if err1 == nil && err2 == nil {
			rx += r
			tx += t
		}
	}
	return rx, tx
}
