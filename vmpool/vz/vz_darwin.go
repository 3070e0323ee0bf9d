//go:build darwin

package vz

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"

	"github.com/Code-Hex/vz/v3"
	"golang.org/x/sys/unix"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// vzHypervisor is the hypervisor over github.com/Code-Hex/vz/v3. It only
// translates: every decision is made by the platform-neutral code.
type vzHypervisor struct{}

// newHypervisor returns the Virtualization.framework hypervisor.
func newHypervisor() (hypervisor, error) { return vzHypervisor{}, nil }

// Limits reports the framework's CPU and memory bounds.
func (vzHypervisor) Limits() limits {
	return limits{
		MinVCPUs:    int(vz.VirtualMachineConfigurationMinimumAllowedCPUCount()),
		MaxVCPUs:    int(vz.VirtualMachineConfigurationMaximumAllowedCPUCount()),
		MinMemoryMB: int(vz.VirtualMachineConfigurationMinimumAllowedMemorySize() >> 20),
		MaxMemoryMB: int(vz.VirtualMachineConfigurationMaximumAllowedMemorySize() >> 20),
	}
}

// NewMachineIdentifier makes a generic machine identifier (macOS 13).
func (vzHypervisor) NewMachineIdentifier() ([]byte, error) {
	id, err := vz.NewGenericMachineIdentifier()
	if err != nil {
		return nil, vzError("new generic machine identifier", err)
	}
	// The data representation points into Objective-C memory: copy it.
	return bytes.Clone(id.DataRepresentation()), nil
}

// CloneFile clones src to dst with clonefile(2) (APFS copy-on-write),
// copying instead where the file system cannot clone.
func (vzHypervisor) CloneFile(src, dst string) error {
	err := unix.Clonefile(src, dst, unix.CLONE_NOFOLLOW)
	if err == nil {
		return nil
	}
	if errors.Is(err, unix.ENOTSUP) || errors.Is(err, unix.EXDEV) {
		return copyFile(src, dst)
	}
	return fmt.Errorf("clonefile %s %s: %w", src, dst, err)
}

// NewVM builds the configuration cfg describes, validates it and creates
// the virtual machine. The devices are always made in the same order, so
// equal configs give machines whose saved states fit each other.
func (vzHypervisor) NewVM(cfg machineConfig) (vm, error) {
	config, err := configuration(cfg)
	if err != nil {
		return nil, err
	}
	v, err := vz.NewVirtualMachine(config)
	if err != nil {
		return nil, vzError("new virtual machine", err)
	}
	m := &vzVM{vm: v, done: make(chan struct{})}
	go m.watch(v.StateChangedNotify())
	return m, nil
}

// configuration builds the VZ configuration: Linux boot loader (kernel,
// initramfs, command line), CPUs and memory, a generic platform with the
// machine identifier, the virtio-blk raw disk, NAT network devices with
// fixed MACs, the virtio socket device (agent channel), and when cfg asks
// for them an entropy device and a virtio console written to a file.
func configuration(cfg machineConfig) (*vz.VirtualMachineConfiguration, error) {
	boot, err := vz.NewLinuxBootLoader(cfg.Kernel, vz.WithCommandLine(cfg.Cmdline), vz.WithInitrd(cfg.Initramfs))
	if err != nil {
		return nil, vzError("linux boot loader", err)
	}
	config, err := vz.NewVirtualMachineConfiguration(boot, uint(cfg.VCPUs), uint64(cfg.MemoryMB)<<20)
	if err != nil {
		return nil, vzError("virtual machine configuration", err)
	}

	mid, err := vz.NewGenericMachineIdentifierWithData(cfg.MachineIdentifier)
	if err != nil {
		return nil, vzError("machine identifier", err)
	}
	platform, err := vz.NewGenericPlatformConfiguration(vz.WithGenericMachineIdentifier(mid))
	if err != nil {
		return nil, vzError("generic platform", err)
	}
	config.SetPlatformVirtualMachineConfiguration(platform)

	disk, err := vz.NewDiskImageStorageDeviceAttachment(cfg.Disk, false)
	if err != nil {
		return nil, vzError("disk attachment "+cfg.Disk, err)
	}
	blk, err := vz.NewVirtioBlockDeviceConfiguration(disk)
	if err != nil {
		return nil, vzError("virtio-blk device", err)
	}
	config.SetStorageDevicesVirtualMachineConfiguration([]vz.StorageDeviceConfiguration{blk})

	var nics []*vz.VirtioNetworkDeviceConfiguration
	for _, s := range cfg.MACs {
		hw, err := net.ParseMAC(s)
		if err != nil {
			return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("MAC %q: %w", s, err))
		}
		nat, err := vz.NewNATNetworkDeviceAttachment()
		if err != nil {
			return nil, vzError("NAT attachment", err)
		}
		nic, err := vz.NewVirtioNetworkDeviceConfiguration(nat)
		if err != nil {
			return nil, vzError("virtio-net device", err)
		}
		mac, err := vz.NewMACAddress(hw)
		if err != nil {
			return nil, vzError("MAC address", err)
		}
		nic.SetMACAddress(mac)
		nics = append(nics, nic)
	}
	config.SetNetworkDevicesVirtualMachineConfiguration(nics)

	vsock, err := vz.NewVirtioSocketDeviceConfiguration()
	if err != nil {
		return nil, vzError("virtio socket device", err)
	}
	config.SetSocketDevicesVirtualMachineConfiguration([]vz.SocketDeviceConfiguration{vsock})

	if cfg.Entropy {
		entropy, err := vz.NewVirtioEntropyDeviceConfiguration()
		if err != nil {
			return nil, vzError("entropy device", err)
		}
		config.SetEntropyDevicesVirtualMachineConfiguration([]*vz.VirtioEntropyDeviceConfiguration{entropy})
	}

	if cfg.Console {
		// The console goes to a file, output only: nothing on the host
		// side can block the guest.
		f, err := os.OpenFile(cfg.ConsoleLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return nil, fmt.Errorf("console log: %w", err)
		}
		f.Close()
		out, err := vz.NewFileSerialPortAttachment(cfg.ConsoleLog, true)
		if err != nil {
			return nil, vzError("console attachment", err)
		}
		console, err := vz.NewVirtioConsoleDeviceSerialPortConfiguration(out)
		if err != nil {
			return nil, vzError("virtio console", err)
		}
		config.SetSerialPortsVirtualMachineConfiguration([]*vz.VirtioConsoleDeviceSerialPortConfiguration{console})
	}

	if ok, err := config.Validate(); err != nil || !ok {
		if err == nil {
			err = errors.New("the framework rejected it")
		}
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("vz: invalid configuration: %w", err))
	}
	return config, nil
}

// vzVM is a running (or startable) Virtualization.framework machine.
type vzVM struct {
	vm   *vz.VirtualMachine
	done chan struct{}
	once sync.Once
}

// watch closes done when the machine stops after it had started.
func (m *vzVM) watch(states <-chan vz.VirtualMachineState) {
	started := false
	for {
		select {
		case st := <-states:
			switch st {
			case vz.VirtualMachineStateStopped, vz.VirtualMachineStateError:
				if started {
					m.markDone()
					return
				}
			default:
				started = true
			}
		case <-m.done:
			return
		}
	}
}

func (m *vzVM) markDone() { m.once.Do(func() { close(m.done) }) }

// Start boots the machine.
func (m *vzVM) Start() error { return vzError("start", m.vm.Start()) }

// Pause stops the vCPUs.
func (m *vzVM) Pause() error { return vzError("pause", m.vm.Pause()) }

// Resume runs a paused machine.
func (m *vzVM) Resume() error { return vzError("resume", m.vm.Resume()) }

// Stop stops the machine at once and releases it.
func (m *vzVM) Stop() error {
	defer m.markDone()
	if m.vm.State() == vz.VirtualMachineStateStopped || !m.vm.CanStop() {
		return nil
	}
	if err := m.vm.Stop(); err != nil && m.vm.State() != vz.VirtualMachineStateStopped {
		return vzError("stop", err)
	}
	return nil
}

// DialVsock connects to port on the guest over the machine's virtio socket
// device.
func (m *vzVM) DialVsock(port uint32) (net.Conn, error) {
	devs := m.vm.SocketDevices()
	if len(devs) == 0 {
		return nil, errdefs.Wrap(errdefs.ErrInternalFailure, errors.New("the machine has no virtio socket device"))
	}
	conn, err := devs[0].Connect(port)
	if err != nil {
		return nil, vzError(fmt.Sprintf("vsock connect to port %d", port), err)
	}
	return conn, nil
}

// Done is closed when the machine stopped after it had started.
func (m *vzVM) Done() <-chan struct{} { return m.done }

// vzError adds what was being done to a framework error, and classes an
// error about the macOS version errdefs.ErrUnsupported.
func vzError(what string, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, vz.ErrUnsupportedOSVersion) || errors.Is(err, vz.ErrBuildTargetOSVersion) {
		return errdefs.Wrap(errdefs.ErrUnsupported, fmt.Errorf("%s: %w (the vz driver needs macOS 13 or later; save and restore need macOS 14 or later on Apple silicon)", what, err))
	}
	return fmt.Errorf("%s: %w", what, err)
}

// macOSVersion is the running macOS product version, e.g. "14.2.1".
func macOSVersion() string {
	v, err := unix.Sysctl("kern.osproductversion")
	if err != nil {
		return ""
	}
	return v
}
