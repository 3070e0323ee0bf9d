//go:build linux

package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ethernetWait bounds the wait for the first ethernet interface.
const ethernetWait = 3 * time.Second

// dhcpTimeout bounds firkin.ip=dhcp.
const dhcpTimeout = 5 * time.Second

// configureNetwork brings up loopback (DialGuest needs it) and, when the
// command line asks, the first ethernet interface: with a static address
// (firkin.ip=A/N, firkin.gw, firkin.dns) or by DHCP (firkin.ip=dhcp). A
// missing interface or DHCP server leaves the network down with a warning.
func configureNetwork(log *slog.Logger, cfg *config) error {
	if err := linkUp("lo"); err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	if cfg.ip == "" {
		return nil
	}
	var l dhcpLease
	if cfg.ip != "dhcp" {
		prefix, err := netip.ParsePrefix(cfg.ip)
		if err != nil || !prefix.Addr().Is4() {
			return fmt.Errorf("firkin.ip=%q: want dhcp or an IPv4 address with a prefix length", cfg.ip)
		}
		l.addr = prefix
		if cfg.gw != "" {
			if l.router, err = netip.ParseAddr(cfg.gw); err != nil || !l.router.Is4() {
				return fmt.Errorf("firkin.gw=%q: want an IPv4 address", cfg.gw)
			}
		}
	}
	if cfg.dns != "" {
		d, err := netip.ParseAddr(cfg.dns)
		if err != nil {
			return fmt.Errorf("firkin.dns=%q: %w", cfg.dns, err)
		}
		l.dns = []netip.Addr{d}
	}
	var ifname string
	if !waitFor(ethernetWait, func() bool { ifname = firstEthernet(); return ifname != "" }) {
		log.Warn("no ethernet interface: network left down", "firkin.ip", cfg.ip)
		return nil
	}
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		return err
	}
	if err := linkUp(ifname); err != nil {
		return fmt.Errorf("%s: up: %w", ifname, err)
	}
	if cfg.ip == "dhcp" {
		got, err := dhcp(ifname, ifi.HardwareAddr, dhcpTimeout)
		if err != nil {
			log.Warn("network left down", "interface", ifname, "err", err)
			return nil
		}
		if len(l.dns) == 0 {
			l.dns = got.dns
		}
		l.addr, l.router = got.addr, got.router
	}
	if err := addAddress(ifi.Index, l.addr); err != nil {
		return fmt.Errorf("%s: address %s: %w", ifname, l.addr, err)
	}
	if l.router.IsValid() {
		if err := addDefaultRoute(ifi.Index, l.router); err != nil {
			return fmt.Errorf("%s: default route via %s: %w", ifname, l.router, err)
		}
	}
	if len(l.dns) > 0 && cfg.root != "" {
		if err := writeResolvConf(filepath.Join(cfg.root, "etc"), l.dns); err != nil {
			log.Warn("resolv.conf", "err", err)
		}
	}
	log.Info("network", "interface", ifname, "address", l.addr.String(), "gateway", l.router.String(), "dhcp", cfg.ip == "dhcp")
	return nil
}

// firstEthernet returns the name of the first interface that is neither
// loopback nor virtual.
func firstEthernet() string {
	links, _ := filepath.Glob("/sys/class/net/*/device")
	for _, l := range links {
		return filepath.Base(filepath.Dir(l))
	}
	return ""
}

// linkUp sets IFF_UP on an interface.
func linkUp(name string) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	return unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}

// addAddress adds an IPv4 address to an interface (RTM_NEWADDR).
func addAddress(index int, p netip.Prefix) error {
	body := make([]byte, unix.SizeofIfAddrmsg)
	body[0] = unix.AF_INET
	body[1] = byte(p.Bits())
	body[3] = unix.RT_SCOPE_UNIVERSE
	binary.NativeEndian.PutUint32(body[4:], uint32(index))
	a := p.Addr().As4()
	body = appendAttr(body, unix.IFA_LOCAL, a[:])
	body = appendAttr(body, unix.IFA_ADDRESS, a[:])
	return netlinkRequest(unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_EXCL, body)
}

// addDefaultRoute adds 0.0.0.0/0 via gw on an interface (RTM_NEWROUTE).
func addDefaultRoute(index int, gw netip.Addr) error {
	body := make([]byte, unix.SizeofRtMsg)
	body[0] = unix.AF_INET
	body[4] = unix.RT_TABLE_MAIN
	body[5] = unix.RTPROT_BOOT
	body[6] = unix.RT_SCOPE_UNIVERSE
	body[7] = unix.RTN_UNICAST
	g := gw.As4()
	body = appendAttr(body, unix.RTA_GATEWAY, g[:])
	var oif [4]byte
	binary.NativeEndian.PutUint32(oif[:], uint32(index))
	body = appendAttr(body, unix.RTA_OIF, oif[:])
	return netlinkRequest(unix.RTM_NEWROUTE, unix.NLM_F_CREATE|unix.NLM_F_EXCL, body)
}

// appendAttr appends one rtattr, padded to 4 bytes.
func appendAttr(b []byte, typ uint16, data []byte) []byte {
	var h [unix.SizeofRtAttr]byte
	binary.NativeEndian.PutUint16(h[0:], uint16(unix.SizeofRtAttr+len(data)))
	binary.NativeEndian.PutUint16(h[2:], typ)
	b = append(b, h[:]...)
	b = append(b, data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// netlinkRequest sends one rtnetlink request and waits for its ack.
func netlinkRequest(typ uint16, flags uint16, body []byte) error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	msg := make([]byte, unix.SizeofNlMsghdr, unix.SizeofNlMsghdr+len(body))
	binary.NativeEndian.PutUint32(msg[0:], uint32(unix.SizeofNlMsghdr+len(body)))
	binary.NativeEndian.PutUint16(msg[4:], typ)
	binary.NativeEndian.PutUint16(msg[6:], flags|unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	binary.NativeEndian.PutUint32(msg[8:], 1) // sequence
	msg = append(msg, body...)
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	buf := make([]byte, 4096)
	n, _, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		return err
	}
	if n < unix.SizeofNlMsghdr+4 || binary.NativeEndian.Uint16(buf[4:]) != unix.NLMSG_ERROR {
		return errors.New("netlink: unexpected reply")
	}
	if code := int32(binary.NativeEndian.Uint32(buf[unix.SizeofNlMsghdr:])); code != 0 {
		errno := unix.Errno(-code)
		if errno == unix.EEXIST {
			return nil
		}
		return errno
	}
	return nil
}

// writeResolvConf writes a resolv.conf naming servers into etcDir,
// replacing a symlink rather than following it out of the root.
func writeResolvConf(etcDir string, servers []netip.Addr) error {
	p := filepath.Join(etcDir, "resolv.conf")
	if fi, err := os.Lstat(p); err == nil && fi.Mode()&os.ModeSymlink != 0 {
		if err := os.Remove(p); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(etcDir, 0o755); err != nil {
		return err
	}
	var b strings.Builder
	for _, s := range servers {
		b.WriteString("nameserver " + s.String() + "\n")
	}
	return os.WriteFile(p, []byte(b.String()), 0o644)
}
