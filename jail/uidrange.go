package jail

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// The uid ranges: RangeCount ranges of RangeSize ids from RangeBase, far
// above the ids of any real user or of container user namespaces.
const (
	RangeBase  = 2_000_000_000
	RangeSize  = 65536
	RangeCount = 256
	// DefaultLockDir holds the lock files that claim the ranges.
	DefaultLockDir = "/run/firkin/uid-ranges"
)

// Range is a block of RangeSize ids owned by one worker. Its first id is
// the group id every machine of the worker shares (for template files);
// the others are the machines' uids.
type Range struct {
	Index int    // 0..RangeCount-1
	First uint32 // RangeBase + Index*RangeSize
	Count uint32 // RangeSize
}

// RangeAt returns range n.
func RangeAt(n int) Range {
	return Range{Index: n, First: RangeBase + uint32(n)*RangeSize, Count: RangeSize}
}

// GID returns the group every machine of the range runs in.
func (r Range) GID() uint32 { return r.First }

// ID names the range in cgroup paths and logs ("r3").
func (r Range) ID() string { return fmt.Sprintf("r%d", r.Index) }

// Contains reports whether id is in the range.
func (r Range) Contains(id uint32) bool { return id >= r.First && id-r.First < r.Count }

// InAnyRange reports whether id lies in one of the ranges (a uid read back
// from a file is only trusted when it does).
func InAnyRange(id uint32) bool {
	return id >= RangeBase && uint64(id) < RangeBase+uint64(RangeCount)*RangeSize
}

// AcquireRange claims a free uid range with an exclusive flock on
// <lockDir>/<n>.lock, held until release is called or the process exits,
// so concurrent workers (and parallel test processes) never share ids.
// prefer, when given and free, is tried first: a restarted worker takes
// back the range its running machines use (values outside
// 0..RangeCount-1 are ignored).
//
// A lock only lasts as long as its holder: a worker killed with its
// machines kept running leaves QEMUs with uids of a range nobody holds.
// So a range other than a preferred one is skipped while any process runs
// with a uid or gid of it (real, effective, saved or file system one, from
// /proc/<pid>/status): its next holder would hand the same uids to its own
// machines, which could then read the orphans' memory. A preferred range
// (the one recorded in the caller's own state, whose orphans are its own
// machines) is taken even then. When /proc cannot be read that check is
// skipped.
func AcquireRange(lockDir string, prefer ...int) (r Range, release func() error, err error) {
	if lockDir == "" {
		lockDir = DefaultLockDir
	}
	if err := os.MkdirAll(lockDir, 0o700); err != nil {
		return Range{}, nil, fmt.Errorf("jail: uid range locks: %w", err)
	}
	order := make([]int, 0, RangeCount+len(prefer))
	for _, p := range prefer {
		if p >= 0 && p < RangeCount {
			order = append(order, p)
		}
	}
	for n := 0; n < RangeCount; n++ {
		order = append(order, n)
	}
	var busy map[int]bool // ranges with processes, read once a lock is held
	var skipped []int
	for _, n := range order {
		f, err := os.OpenFile(filepath.Join(lockDir, fmt.Sprintf("%d.lock", n)), os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return Range{}, nil, fmt.Errorf("jail: uid range lock: %w", err)
		}
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, syscall.EWOULDBLOCK) {
				continue
			}
			return Range{}, nil, fmt.Errorf("jail: uid range lock %d: %w", n, err)
		}
		if !slices.Contains(prefer, n) {
			// Read after a lock is held: from then on only orphans (or
			// this caller) run as the range's uids.
			if busy == nil {
				busy = rangesInUse("/proc")
			}
			if busy[n] {
				f.Close()
				if !slices.Contains(skipped, n) {
					skipped = append(skipped, n)
				}
				continue
			}
		}
		var once sync.Once
		var rerr error
		release = func() error {
			once.Do(func() { rerr = f.Close() }) // closing drops the flock
			return rerr
		}
		return RangeAt(n), release, nil
	}
	return Range{}, nil, errdefs.Wrap(errdefs.ErrCapacity, fmt.Errorf("jail: all %d uid ranges in %s are taken (%d of them unlocked but with processes still running as their uids: %v)", RangeCount, lockDir, len(skipped), skipped))
}

// rangesInUse returns the ranges that a process under procDir runs in
// (with a uid or gid of it). It is empty when procDir cannot be read.
func rangesInUse(procDir string) map[int]bool {
	busy := map[int]bool{}
	ents, err := os.ReadDir(procDir)
	if err != nil {
		return busy
	}
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(procDir, e.Name(), "status"))
		if err != nil {
			continue // gone meanwhile
		}
		for _, id := range statusIDs(b) {
			if InAnyRange(id) {
				busy[int((id-RangeBase)/RangeSize)] = true
			}
		}
	}
	return busy
}

// statusIDs returns the ids on the Uid and Gid lines of a
// /proc/<pid>/status (real, effective, saved and file system ones).
func statusIDs(status []byte) []uint32 {
	var ids []uint32
	for _, line := range strings.Split(string(status), "\n") {
		name, rest, ok := strings.Cut(line, ":")
		if !ok || name != "Uid" && name != "Gid" {
			continue
		}
		for _, f := range strings.Fields(rest) {
			if v, err := strconv.ParseUint(f, 10, 32); err == nil {
				ids = append(ids, uint32(v))
			}
		}
	}
	return ids
}

// Allocator hands out the uids of a range round-robin: it goes on from the
// last uid it gave, so an id comes back only after the whole range went
// round, and it never gives one that is in use. It is safe for concurrent
// use.
type Allocator struct {
	r     Range
	mu    sync.Mutex
	next  uint32 // offset in the range of the next candidate
	inUse map[uint32]bool
}

// NewAllocator returns an allocator for the uids of r (all but its first
// id, which is the group).
func NewAllocator(r Range) *Allocator {
	return &Allocator{r: r, next: 1, inUse: map[uint32]bool{}}
}

// Allocate returns a free uid.
func (a *Allocator) Allocate() (uint32, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for i := uint32(0); i < a.r.Count; i++ {
		off := a.next
		a.next++
		if a.next >= a.r.Count {
			a.next = 1
		}
		if off == 0 || a.inUse[a.r.First+off] {
			continue
		}
		a.inUse[a.r.First+off] = true
		return a.r.First + off, nil
	}
	return 0, errdefs.Wrap(errdefs.ErrCapacity, fmt.Errorf("jail: all uids of range %s are in use", a.r.ID()))
}

// Reserve marks uid as in use (a reattached machine keeps its uid) and
// moves the round past it. A uid outside the range is ignored.
func (a *Allocator) Reserve(uid uint32) {
	if !a.r.Contains(uid) || uid == a.r.First {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.inUse[uid] = true
	if off := uid - a.r.First; off >= a.next {
		a.next = off + 1
		if a.next >= a.r.Count {
			a.next = 1
		}
	}
}

// Release gives uid back; it is handed out again only after the round
// came back to it.
func (a *Allocator) Release(uid uint32) {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.inUse, uid)
}
