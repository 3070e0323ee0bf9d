package qemu

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// Memory backends of a machine. Every machine's RAM is the backend with id
// "mem" (-machine memory-backend=mem), so a save and its restores name the
// RAM block alike whatever backs it.
const (
	// MemoryRAM is anonymous memory (memory-backend-ram).
	MemoryRAM = "ram"
	// MemoryShared is guest RAM in a file mapped shared (share=on): the
	// machine can be saved as a template whose clones map that file.
	MemoryShared = "shared"
	// MemoryPrivate maps a template's memory file copy-on-write (share=off):
	// a clone reads the template's pages and keeps its writes to itself.
	MemoryPrivate = "private"
)

// Limits of the machines this driver builds.
const (
	MaxVCPUs     = 64
	MinMemoryMB  = 64
	MaxMemoryMB  = 256 << 10
	MaxLayers    = 250 // frozen layers in a disk chain (one descriptor each)
	maxSocketLen = 107 // sun_path is 108 bytes with the NUL
)

// sandboxOpts is QEMU's seccomp sandbox: no obsolete system calls, no
// setuid and friends, no fork or exec (so no exec: migration), no changes
// to scheduling or CPU affinity.
const sandboxOpts = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

// baseNode is the block node name of the raw base disk.
const baseNode = "base"

// firstInheritedFD is the descriptor number of the first inherited disk
// file in QEMU (cmd.ExtraFiles start after stdin, stdout and stderr).
const firstInheritedFD = 3

// vmConfig is everything a QEMU command line depends on. A snapshot keeps
// the device part of it, so a restore builds the same machine.
type vmConfig struct {
	Name     string `json:"name"`                 // process name (-name), the machine id
	Arch     string `json:"arch"`                 // "amd64" or "arm64"
	Machine  string `json:"machine"`              // q35, pc, virt
	Accel    string `json:"accel"`                // kvm or tcg
	TBSizeMB int    `json:"tb_size_mb,omitempty"` // TCG translation cache size
	VCPUs    int    `json:"vcpus"`
	MemoryMB int    `json:"memory_mb"`

	Kernel    string `json:"kernel"`
	Initramfs string `json:"initramfs"`
	Append    string `json:"append"` // full kernel command line
	BIOS      string `json:"bios,omitempty"`

	// The root disk is a chain the worker names in full (QEMU never
	// follows a backing file named in an image header): Base (raw), then
	// Layers bottom to top (read-only qcow2), both passed to QEMU as
	// inherited descriptors (see inherited), then Disk, the writable top
	// overlay QEMU opens by path in the machine's directory.
	Base   string   `json:"base"`             // raw base disk of the template
	Layers []string `json:"layers,omitempty"` // frozen qcow2 layers, bottom first

	Disk        string `json:"disk"`         // qcow2 overlay the machine starts on
	Node        string `json:"node"`         // its block node name
	Console     string `json:"console"`      // serial console log file (written by the worker)
	ConsoleSock string `json:"console_sock"` // the worker's console socket QEMU connects to
	Sandbox     bool   `json:"sandbox"`      // QEMU's seccomp sandbox (-sandbox)
	Agent       string `json:"agent"`        // agent channel socket
	QMP         string `json:"qmp"`          // QMP socket
	Network     bool   `json:"network"`      // a virtio-net device
	NetOff      bool   `json:"net_off"`      // user network restricted to nothing (a restore without network)
	MAC         string `json:"mac"`          // the NIC's address when Network
	Memory      string `json:"memory"`       // MemoryRAM, MemoryShared, MemoryPrivate
	MemPath     string `json:"mem_path"`     // the RAM file unless MemoryRAM
	Incoming    bool   `json:"incoming"`     // -incoming defer (a restore)
}

func invalid(format string, args ...any) error {
	return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf(format, args...))
}

// validate checks every input before it reaches a command line.
func (c *vmConfig) validate() error {
	switch c.Arch {
	case "amd64":
		if c.Machine != "q35" && c.Machine != "pc" {
			return invalid("qemu: machine %q for amd64: want q35 or pc", c.Machine)
		}
	case "arm64":
		if c.Machine != "virt" {
			return invalid("qemu: machine %q for arm64: want virt", c.Machine)
		}
	default:
		return invalid("qemu: arch %q: want amd64 or arm64", c.Arch)
	}
	if c.Accel != "kvm" && c.Accel != "tcg" {
		return invalid("qemu: accelerator %q: want kvm or tcg", c.Accel)
	}
	if c.TBSizeMB < 0 || c.TBSizeMB > 2048 {
		return invalid("qemu: tb-size %d MiB out of range", c.TBSizeMB)
	}
	if c.VCPUs < 1 || c.VCPUs > MaxVCPUs {
		return invalid("qemu: %d vcpus: want 1..%d", c.VCPUs, MaxVCPUs)
	}
	if c.MemoryMB < MinMemoryMB || c.MemoryMB > MaxMemoryMB {
		return invalid("qemu: %d MiB of memory: want %d..%d", c.MemoryMB, MinMemoryMB, MaxMemoryMB)
	}
	paths := map[string]string{"kernel": c.Kernel, "initramfs": c.Initramfs, "disk": c.Disk, "base disk": c.Base,
		"console": c.Console, "console socket": c.ConsoleSock, "agent socket": c.Agent, "qmp socket": c.QMP}
	if len(c.Layers) > MaxLayers {
		return invalid("qemu: %d disk layers: at most %d", len(c.Layers), MaxLayers)
	}
	for k, p := range c.Layers {
		if err := checkPath(fmt.Sprintf("disk layer %d", k+1), p); err != nil {
			return err
		}
		if c.Node == nodeName(k+1) {
			return invalid("qemu: block node name %q is a layer's", c.Node)
		}
	}
	if c.BIOS != "" {
		paths["bios"] = c.BIOS
	}
	switch c.Memory {
	case MemoryRAM:
	case MemoryShared, MemoryPrivate:
		paths["memory file"] = c.MemPath
	default:
		return invalid("qemu: memory %q: want ram, shared or private", c.Memory)
	}
	for what, p := range paths {
		if err := checkPath(what, p); err != nil {
			return err
		}
	}
	for what, p := range map[string]string{"agent": c.Agent, "qmp": c.QMP, "console": c.ConsoleSock} {
		if len(p) > maxSocketLen {
			return invalid("qemu: %s socket path is %d bytes, over the limit of %d: %s", what, len(p), maxSocketLen, p)
		}
	}
	if err := checkID(c.Name); err != nil {
		return err
	}
	if !validNode(c.Node) || c.Node == baseNode {
		return invalid("qemu: block node name %q", c.Node)
	}
	if strings.ContainsAny(c.Append, "\n\x00") || len(c.Append) > 2048 {
		return invalid("qemu: kernel command line %.40q...", c.Append)
	}
	if c.Network {
		if _, err := parseMAC(c.MAC); err != nil {
			return err
		}
	}
	return nil
}

func checkPath(what, p string) error {
	if p == "" {
		return invalid("qemu: no %s path", what)
	}
	if !filepath.IsAbs(p) {
		return invalid("qemu: %s path %q is not absolute", what, p)
	}
	if strings.ContainsAny(p, "\n\x00") {
		return invalid("qemu: %s path %q has a control character", what, p)
	}
	return nil
}

func validNode(s string) bool {
	if s == "" || len(s) > 31 || !(s[0] >= 'a' && s[0] <= 'z') {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
			return false
		}
	}
	return true
}

func parseMAC(s string) (string, error) {
	parts := strings.Split(s, ":")
	if len(parts) != 6 {
		return "", invalid("qemu: MAC %q", s)
	}
	for _, p := range parts {
		if len(p) != 2 {
			return "", invalid("qemu: MAC %q", s)
		}
		if _, err := strconv.ParseUint(p, 16, 8); err != nil {
			return "", invalid("qemu: MAC %q", s)
		}
	}
	return strings.ToLower(s), nil
}

// esc escapes a value for QEMU's key=value option syntax (a comma is doubled).
func esc(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// inherited returns the disk files QEMU gets as open descriptors rather
// than paths, in descriptor order (firstInheritedFD on): the base disk, then
// the frozen layers bottom first. The worker opens them read-only, so QEMU
// needs no permission on them, whoever owns them.
func (c *vmConfig) inherited() []string {
	return append([]string{c.Base}, c.Layers...)
}

// rootDisk returns the -add-fd options (one fd set per inherited file,
// set i+1 holding descriptor firstInheritedFD+i) and the -blockdev of the
// root disk: the whole chain explicit, each qcow2 node with its backing
// given, so that no backing file named in an image header is ever opened.
func (c *vmConfig) rootDisk() (addFDs []string, blockdev string, err error) {
	files := c.inherited()
	fdFile := func(i int) map[string]any {
		return map[string]any{"driver": "file", "filename": "/dev/fdset/" + strconv.Itoa(i+1), "read-only": true}
	}
	for i := range files {
		opaque := baseNode
		if i > 0 {
			opaque = nodeName(i)
		}
		addFDs = append(addFDs, fmt.Sprintf("fd=%d,set=%d,opaque=%s", firstInheritedFD+i, i+1, opaque))
	}
	node := map[string]any{"driver": "raw", "node-name": baseNode, "read-only": true, "file": fdFile(0)}
	for k := 1; k < len(files); k++ {
		node = map[string]any{"driver": "qcow2", "node-name": nodeName(k), "read-only": true,
			"file": fdFile(k), "backing": node}
	}
	top := map[string]any{"driver": "qcow2", "node-name": c.Node, "backing": node,
		"file": map[string]any{"driver": "file", "filename": c.Disk}}
	b, err := json.Marshal(top)
	if err != nil {
		return nil, "", err
	}
	return addFDs, string(b), nil
}

// args builds the QEMU arguments (without the binary) for a validated c.
func (c *vmConfig) args() ([]string, error) {
	if err := c.validate(); err != nil {
		return nil, err
	}
	dev := func(name string) string { return name + "-pci" }
	accel := c.Accel
	if c.Accel == "tcg" {
		accel = "tcg,thread=multi"
		if c.TBSizeMB > 0 {
			accel += ",tb-size=" + strconv.Itoa(c.TBSizeMB)
		}
	}
	cpu := "max"
	if c.Accel == "kvm" {
		cpu = "host"
	}
	a := []string{
		"-name", "firkin-" + c.Name + ",debug-threads=on",
		"-machine", c.Machine + ",memory-backend=mem",
		"-accel", accel,
		"-cpu", cpu,
		"-smp", strconv.Itoa(c.VCPUs),
		"-m", strconv.Itoa(c.MemoryMB) + "M",
	}
	if c.Sandbox {
		a = append(a, "-sandbox", sandboxOpts)
	}
	size := strconv.Itoa(c.MemoryMB) + "M"
	switch c.Memory {
	case MemoryRAM:
		a = append(a, "-object", "memory-backend-ram,id=mem,size="+size)
	case MemoryShared:
		a = append(a, "-object", "memory-backend-file,id=mem,size="+size+",mem-path="+esc(c.MemPath)+",share=on")
	case MemoryPrivate:
		a = append(a, "-object", "memory-backend-file,id=mem,size="+size+",mem-path="+esc(c.MemPath)+",share=off")
	}
	a = append(a,
		"-display", "none",
		"-nodefaults", "-no-user-config", "-no-reboot",
	)
	if c.BIOS != "" {
		a = append(a, "-bios", c.BIOS)
	}
	a = append(a,
		"-kernel", c.Kernel,
		"-initrd", c.Initramfs,
		"-append", c.Append,
		// QEMU connects to the worker's console socket and reconnects
		// every second while nobody listens (a worker restarting).
		"-chardev", "socket,id=console,path="+esc(c.ConsoleSock)+",server=off,reconnect=1",
		"-serial", "chardev:console",
		"-chardev", "socket,id=qmp,path="+esc(c.QMP)+",server=on,wait=off",
		"-mon", "chardev=qmp,mode=control",
	)
	addFDs, blockdev, err := c.rootDisk()
	if err != nil {
		return nil, err
	}
	for _, o := range addFDs {
		a = append(a, "-add-fd", o)
	}
	a = append(a,
		"-blockdev", blockdev,
		"-device", dev("virtio-blk")+",id=root,drive="+c.Node,
		"-device", dev("virtio-serial")+",id=vser,max_ports=2",
		"-chardev", "socket,id=agent,path="+esc(c.Agent)+",server=on,wait=off",
		"-device", "virtserialport,id=agentport,bus=vser.0,chardev=agent,name=firkin.agent",
	)
	if c.Network {
		netdev := "user,id=net0"
		if c.NetOff {
			netdev = "user,id=net0,restrict=on"
		}
		a = append(a,
			"-netdev", netdev,
			"-device", dev("virtio-net")+",id=nic0,netdev=net0,mac="+strings.ToLower(c.MAC)+",romfile=",
		)
	}
	if c.Incoming {
		a = append(a, "-incoming", "defer")
	} else {
		// The guest starts once the console is connected (start):
		// nothing it prints is lost.
		a = append(a, "-S")
	}
	return a, nil
}
