// Package procstat reads the fields of /proc/<pid>/stat the worker uses.
package procstat

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// ClockTicks is USER_HZ, the unit of UTime, STime and StartTime (100 on
// every Linux the worker runs on).
const ClockTicks = 100

// Stat is a process's CPU time, start time and resident size.
type Stat struct {
	UTime, STime uint64 // clock ticks
	StartTime    uint64 // clock ticks after boot
	RSSPages     uint64
}

// CPUTicks is the process's user and system time.
func (s Stat) CPUTicks() uint64 { return s.UTime + s.STime }

// Read reads /proc/<pid>/stat.
func Read(pid int) (Stat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return Stat{}, err
	}
	return parse(pid, string(b))
}

// parse reads the fields after the command name, which may hold spaces
// and parentheses: they start after its last ')'.
func parse(pid int, s string) (Stat, error) {
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return Stat{}, fmt.Errorf("bad /proc/%d/stat", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 22 {
		return Stat{}, fmt.Errorf("bad /proc/%d/stat: %d fields", pid, len(f))
	}
	// After ")": state is f[0]; utime, stime, starttime and rss are fields
	// 14, 15, 22 and 24 of the whole line.
	var st Stat
	for _, x := range []struct {
		dst *uint64
		i   int
	}{{&st.UTime, 11}, {&st.STime, 12}, {&st.StartTime, 19}, {&st.RSSPages, 21}} {
		v, err := strconv.ParseUint(f[x.i], 10, 64)
		if err != nil {
			return Stat{}, fmt.Errorf("bad /proc/%d/stat: %w", pid, err)
		}
		*x.dst = v
	}
	return st, nil
}
