package jail

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// The cgroup code is written against the cgroup file system directly rather
// than with github.com/containerd/cgroups/v3: a machine needs three limits
// (memory, cpu, pids) written into a few files, and membership is a write of
// the jail's own pid into cgroup.procs before it execs QEMU, which that
// library does not help with. It would bring in runtime-spec, cilium/ebpf,
// go-systemd, godbus and logrus for what fits in these two hundred lines.

// Controllers are the cgroup controllers a machine's limits use.
var Controllers = []string{"memory", "cpu", "pids"}

// CPUPeriod is the CFS period in microseconds; a machine's quota is its
// vCPUs times this.
const CPUPeriod = 100000

// Limits of one cgroup; a zero field sets no limit.
type Limits struct {
	MemoryBytes int64 // memory (and memory+swap where accounted)
	CPUs        int   // CPU time: CPUs × CPUPeriod per CPUPeriod
	Pids        int64 // tasks (threads included)
	// CPUWeight is the cgroup's share of contended CPU time, as cgroup
	// v2's cpu.weight (1..10000; DefaultCPUWeight is the kernel's
	// default); cgroup v1 gets the matching cpu.shares.
	CPUWeight int
}

// DefaultCPUWeight is the kernel's default cpu.weight (cpu.shares 1024).
const DefaultCPUWeight = 100

// Cgroups makes the cgroups of one worker's machines, at
// <hierarchy>/<group>/<name> in every hierarchy that has a controller in
// Controllers: one for cgroup v2, one per controller for v1.
type Cgroups struct {
	version int
	group   string
	hier    []hierarchy
	missing []string
}

// hierarchy is where one cgroup hierarchy puts the worker's group.
type hierarchy struct {
	base        string   // the directory of the group (…/firkin/r3)
	top         string   // the mount point, or v1: the worker's own cgroup
	controllers []string // of Controllers, the ones this hierarchy has
}

// Version returns 1 or 2.
func (c *Cgroups) Version() int { return c.version }

// Missing returns the controllers the host has no hierarchy for (their
// limits are not set).
func (c *Cgroups) Missing() []string { return slices.Clone(c.missing) }

// Group returns the group path under each hierarchy ("firkin/r3").
func (c *Cgroups) Group() string { return c.group }

// OpenCgroups finds the host's cgroup hierarchies from /proc/self/mountinfo
// and /proc/self/cgroup and makes the group directory (e.g. "firkin/r3") in
// each. cgroup v2 is used when its mount has all of Controllers; otherwise
// the v1 hierarchy of each controller, nested under the worker's own cgroup
// there (so a limit on the worker's service or container also binds its
// machines). v2 groups live at the root of the mount (a cgroup with
// processes, like the worker's own, cannot have controllers enabled for
// children). It fails with errdefs.ErrUnsupported when no controller can be
// used.
func OpenCgroups(group string) (*Cgroups, error) {
	mountinfo, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrUnsupported, fmt.Errorf("jail: cgroups: %w", err))
	}
	self, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrUnsupported, fmt.Errorf("jail: cgroups: %w", err))
	}
	return openCgroups(mountinfo, self, group)
}

var (
	groupRE    = regexp.MustCompile(`^[a-zA-Z0-9._-]+(/[a-zA-Z0-9._-]+)*$`)
	rangeDirRE = regexp.MustCompile(`^r[0-9]{1,3}$`)
)

func openCgroups(mountinfo, self []byte, group string) (*Cgroups, error) {
	if !groupRE.MatchString(group) || strings.Contains("/"+group+"/", "/../") || strings.Contains("/"+group+"/", "/./") {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("jail: cgroup group %q", group))
	}
	mounts := parseMountinfo(mountinfo)
	paths := parseSelfCgroup(self)
	c := &Cgroups{group: group}
	// v2 when its mount has every controller.
	for _, m := range mounts {
		if m.fstype != "cgroup2" {
			continue
		}
		b, err := os.ReadFile(filepath.Join(m.point, "cgroup.controllers"))
		if err != nil {
			continue
		}
		have := strings.Fields(string(b))
		if !containsAll(have, Controllers) {
			continue
		}
		c.version = 2
		c.hier = []hierarchy{{base: filepath.Join(m.point, group), top: m.point, controllers: slices.Clone(Controllers)}}
		break
	}
	if c.version == 0 {
		c.version = 1
		for _, ctl := range Controllers {
			var found bool
			for _, m := range mounts {
				if m.fstype != "cgroup" || !slices.Contains(m.superOpts, ctl) {
					continue
				}
				own, ok := paths[ctl]
				if !ok {
					continue
				}
				rel, err := filepath.Rel(m.root, own)
				if err != nil || strings.HasPrefix(rel, "..") {
					rel = "." // the worker's cgroup is not under this mount's root
				}
				top := filepath.Join(m.point, rel)
				if i := slices.IndexFunc(c.hier, func(h hierarchy) bool { return h.top == top }); i >= 0 {
					c.hier[i].controllers = append(c.hier[i].controllers, ctl) // cpu,cpuacct style co-mounts
				} else {
					c.hier = append(c.hier, hierarchy{base: filepath.Join(top, group), top: top, controllers: []string{ctl}})
				}
				found = true
				break
			}
			if !found {
				c.missing = append(c.missing, ctl)
			}
		}
	}
	if len(c.hier) == 0 {
		return nil, errdefs.Wrap(errdefs.ErrUnsupported, errors.New("jail: no cgroup hierarchy has a memory, cpu or pids controller"))
	}
	for _, h := range c.hier {
		if err := c.makeGroup(h); err != nil {
			return nil, errdefs.Wrap(errdefs.ErrUnsupported, fmt.Errorf("jail: cgroup %s: %w", h.base, err))
		}
	}
	return c, nil
}

// makeGroup creates the group's directories; under v2 it enables the
// controllers for the children of each level from the mount down.
func (c *Cgroups) makeGroup(h hierarchy) error {
	if err := os.MkdirAll(h.base, 0o755); err != nil {
		return err
	}
	if c.version != 2 {
		return nil
	}
	rel, _ := filepath.Rel(h.top, h.base)
	dir := h.top
	for _, part := range append([]string{""}, strings.Split(rel, "/")...) {
		dir = filepath.Join(dir, part)
		if err := enableControllers(dir, h.controllers); err != nil {
			return err
		}
	}
	return nil
}

// enableControllers writes +ctl for each controller not yet in dir's
// cgroup.subtree_control.
func enableControllers(dir string, ctls []string) error {
	cur, _ := os.ReadFile(filepath.Join(dir, "cgroup.subtree_control"))
	have := strings.Fields(string(cur))
	var add []string
	for _, ctl := range ctls {
		if !slices.Contains(have, ctl) {
			add = append(add, "+"+ctl)
		}
	}
	if len(add) == 0 {
		return nil
	}
	return writeFile(filepath.Join(dir, "cgroup.subtree_control"), strings.Join(add, " "))
}

// setting is one value for a controller's file.
type setting struct{ ctl, file, value string }

// Cgroup is one machine's cgroup: a directory per hierarchy.
type Cgroup struct {
	version int
	dirs    map[string]string // controller -> directory
}

// Create makes the cgroup name (a machine id) with limits l. An existing
// empty cgroup of that name (a leftover) is reused.
func (c *Cgroups) Create(name string, l Limits) (*Cgroup, error) {
	if !groupRE.MatchString(name) || strings.Contains(name, "/") || name == "." || name == ".." {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("jail: cgroup name %q", name))
	}
	g := &Cgroup{version: c.version, dirs: map[string]string{}}
	for _, h := range c.hier {
		dir := filepath.Join(h.base, name)
		if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			_ = g.Remove()
			return nil, fmt.Errorf("jail: cgroup %s: %w", dir, err)
		}
		for _, ctl := range h.controllers {
			g.dirs[ctl] = dir
		}
	}
	if err := g.setLimits(l); err != nil {
		_ = g.Remove()
		return nil, err
	}
	return g, nil
}

// setLimits writes l into the controller files.
func (g *Cgroup) setLimits(l Limits) error {
	var s []setting
	if l.MemoryBytes > 0 {
		v := strconv.FormatInt(l.MemoryBytes, 10)
		if g.version == 2 {
			s = append(s, setting{"memory", "memory.max", v}, setting{"memory", "memory.swap.max", "0"})
		} else {
			// memsw (memory+swap) must not be below the memory limit: set after it.
			s = append(s, setting{"memory", "memory.limit_in_bytes", v}, setting{"memory", "memory.memsw.limit_in_bytes", v})
		}
	}
	if l.CPUs > 0 {
		q := strconv.Itoa(l.CPUs * CPUPeriod)
		if g.version == 2 {
			s = append(s, setting{"cpu", "cpu.max", q + " " + strconv.Itoa(CPUPeriod)})
		} else {
			s = append(s, setting{"cpu", "cpu.cfs_period_us", strconv.Itoa(CPUPeriod)}, setting{"cpu", "cpu.cfs_quota_us", q})
		}
	}
	if l.Pids > 0 {
		s = append(s, setting{"pids", "pids.max", strconv.FormatInt(l.Pids, 10)})
	}
	if l.CPUWeight > 0 {
		s = append(s, g.cpuWeightSetting(l.CPUWeight))
	}
	for _, x := range s {
		dir, ok := g.dirs[x.ctl]
		if !ok {
			continue // the host has no such controller (logged at start)
		}
		p := filepath.Join(dir, x.file)
		if x.file == "memory.memsw.limit_in_bytes" || x.file == "memory.swap.max" {
			if _, err := os.Stat(p); err != nil {
				continue // no swap accounting on this kernel
			}
		}
		if err := writeFile(p, x.value); err != nil {
			return fmt.Errorf("jail: cgroup limit %s: %w", p, err)
		}
	}
	return nil
}

// cpuWeightSetting is cpu.weight w (clamped to 1..10000), or for cgroup
// v1 the cpu.shares of the same share (1024 for the default 100).
func (g *Cgroup) cpuWeightSetting(w int) setting {
	w = min(max(w, 1), 10000)
	if g.version == 2 {
		return setting{"cpu", "cpu.weight", strconv.Itoa(w)}
	}
	return setting{"cpu", "cpu.shares", strconv.Itoa(max(2, w*1024/DefaultCPUWeight))}
}

// SetCPUWeight changes the cgroup's share of contended CPU time (see
// Limits.CPUWeight). A host without the cpu controller is left as it is.
func (g *Cgroup) SetCPUWeight(w int) error {
	x := g.cpuWeightSetting(w)
	dir, ok := g.dirs[x.ctl]
	if !ok {
		return nil
	}
	if err := writeFile(filepath.Join(dir, x.file), x.value); err != nil {
		return fmt.Errorf("jail: cgroup %s: %w", x.file, err)
	}
	return nil
}

// Dirs returns the cgroup's directories, one per hierarchy (what
// machine.json records and what the jail writes its pid into).
func (g *Cgroup) Dirs() []string {
	var out []string
	for _, d := range g.dirs {
		if !slices.Contains(out, d) {
			out = append(out, d)
		}
	}
	slices.Sort(out)
	return out
}

// Dir returns the directory of controller ctl ("" when the host has none).
func (g *Cgroup) Dir(ctl string) string { return g.dirs[ctl] }

// Procs returns the pids in the cgroup (of its first hierarchy).
func (g *Cgroup) Procs() ([]int, error) {
	dirs := g.Dirs()
	if len(dirs) == 0 {
		return nil, nil
	}
	return readProcs(dirs[0])
}

// Remove removes the cgroup's directories; the processes in it must have
// exited (it waits up to two seconds for the kernel to let go of them).
// A cgroup already gone is not an error.
func (g *Cgroup) Remove() error {
	var errs []error
	for _, d := range g.Dirs() {
		if err := rmdirCgroup(d, 2*time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func rmdirCgroup(dir string, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		err := syscall.Rmdir(dir)
		if err == nil || errors.Is(err, syscall.ENOENT) {
			return nil
		}
		if !errors.Is(err, syscall.EBUSY) || time.Now().After(deadline) {
			return fmt.Errorf("jail: remove cgroup %s: %w", dir, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Load returns the cgroup of a machine from the directories recorded for
// it (Reattach). Each must be <hierarchy>/<group's parent>/r<n>/<name> of a
// hierarchy of c: a recorded path never names another directory.
func (c *Cgroups) Load(dirs []string, name string) (*Cgroup, error) {
	g := &Cgroup{version: c.version, dirs: map[string]string{}}
	for _, d := range dirs {
		var ok bool
		for _, h := range c.hier {
			parent := filepath.Dir(h.base) // …/firkin
			rel, err := filepath.Rel(parent, d)
			if err != nil || filepath.Clean(d) != d {
				continue
			}
			parts := strings.Split(rel, "/")
			if len(parts) == 2 && rangeDirRE.MatchString(parts[0]) && parts[1] == name {
				for _, ctl := range h.controllers {
					g.dirs[ctl] = d
				}
				ok = true
				break
			}
		}
		if !ok {
			return nil, errdefs.Wrap(errdefs.ErrIntegrity, fmt.Errorf("jail: recorded cgroup %q is not a machine cgroup of this host", d))
		}
	}
	return g, nil
}

// Sweep removes the group's cgroups that have no process left (machines
// of a worker that crashed) and returns their names.
func (c *Cgroups) Sweep() ([]string, error) {
	var removed []string
	var errs []error
	for _, h := range c.hier {
		ents, err := os.ReadDir(h.base)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, e := range ents {
			if !e.IsDir() {
				continue
			}
			dir := filepath.Join(h.base, e.Name())
			procs, err := readProcs(dir)
			if err != nil || len(procs) > 0 {
				continue
			}
			if err := rmdirCgroup(dir, 0); err != nil {
				errs = append(errs, err)
				continue
			}
			if !slices.Contains(removed, e.Name()) {
				removed = append(removed, e.Name())
			}
		}
	}
	return removed, errors.Join(errs...)
}

// Close removes the group's own directories when they are empty.
func (c *Cgroups) Close() error {
	for _, h := range c.hier {
		_ = syscall.Rmdir(h.base)
	}
	return nil
}

// Join moves the calling process into the cgroup directories (a write of
// its pid into each cgroup.procs).
func Join(dirs []string) error {
	pid := strconv.Itoa(os.Getpid())
	for _, d := range dirs {
		if err := writeFile(filepath.Join(d, "cgroup.procs"), pid); err != nil {
			return fmt.Errorf("join cgroup %s: %w", d, err)
		}
	}
	return nil
}

func readProcs(dir string) ([]int, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil, err
	}
	var out []int
	for _, f := range strings.Fields(string(b)) {
		if n, err := strconv.Atoi(f); err == nil {
			out = append(out, n)
		}
	}
	return out, nil
}

func writeFile(path, value string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	_, err = f.WriteString(value)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func containsAll(have, want []string) bool {
	for _, w := range want {
		if !slices.Contains(have, w) {
			return false
		}
	}
	return true
}

// mount is one line of /proc/self/mountinfo.
type mount struct {
	root, point, fstype string
	superOpts           []string
}

func parseMountinfo(b []byte) []mount {
	var out []mount
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		sep := slices.Index(f, "-")
		if sep < 5 || len(f) < sep+4 {
			continue
		}
		out = append(out, mount{root: unescapeMount(f[3]), point: unescapeMount(f[4]), fstype: f[sep+1],
			superOpts: strings.Split(f[sep+3], ",")})
	}
	return out
}

// unescapeMount undoes the octal escapes of mountinfo (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// parseSelfCgroup maps each v1 controller (and "" for v2) to the calling
// process's cgroup path.
func parseSelfCgroup(b []byte) map[string]string {
	out := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		if parts[1] == "" {
			out[""] = parts[2]
			continue
		}
		for _, ctl := range strings.Split(parts[1], ",") {
			out[ctl] = parts[2]
		}
	}
	return out
}
