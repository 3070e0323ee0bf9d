// Package vz is the machine driver for macOS: each machine is a
// Virtualization.framework virtual machine driven through
// github.com/Code-Hex/vz/v3.
//
// A machine boots the guest kernel (an uncompressed arm64 Image on Apple
// silicon) and the initramfs with the Linux boot loader, has one virtio-blk
// raw disk (an APFS clone of the template's disk, so copy-on-write), a NAT
// network device with a fixed MAC address (the agent asks for an address by
// DHCP), a virtio socket device that carries the agent channel (the agent
// listens on vsock port 1024), and an entropy device and a virtio console
// written to console.log unless the host could not save a machine that has
// them (the choice is kept with the machine's configuration). Its generic machine
// identifier and MAC addresses are generated once and persisted in the
// machine's directory, and a snapshot carries them, as the seed does: a VZ
// restore needs the same configuration, the same identifier, the same MACs
// and the disk as it was.
//
// Save (macOS 14 on arm64): quiesce the agent session, pause, remove a stale
// state file, clone the disk (frozen from now on), SaveMachineStateToPath,
// then resume (or stop). Restore: clone the frozen disk into the new
// machine's directory, build the same configuration, RestoreMachineStateFromURL,
// Resume, and connect to the agent afresh, retrying the first vsock dial with
// backoff.
//
// Known limit: clones restored from one snapshot share its machine
// identifier and MAC address (the framework refuses another MAC at restore),
// so clones of a snapshot with a network device should not run at once.
//
// Only vz_darwin*.go call into vz. Everything else — configuration and its
// validation, the kernel command line, directory and snapshot layout,
// identity persistence, and the boot, save and restore step sequences — is
// platform-neutral and runs against the small hypervisor interface, so it is
// unit-tested on Linux with a fake. On other systems New fails with
// errdefs.ErrUnsupported.
package vz
