//go:build linux

package main

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
)

// A minimal DHCPv4 client (RFC 2131) for firkin.ip=dhcp: discover, request,
// apply. It asks servers to broadcast their replies, so it works before the
// interface has an address. The lease is not renewed: sandboxes are short
// lived and the NAT servers of QEMU and VZ keep addresses far longer.

// DHCP message types and options.
const (
	dhcpDiscover = 1
	dhcpOffer    = 2
	dhcpRequest  = 3
	dhcpAck      = 5
	dhcpNak      = 6

	optSubnetMask   = 1
	optRouter       = 3
	optDNS          = 6
	optRequestedIP  = 50
	optLeaseTime    = 51
	optMessageType  = 53
	optServerID     = 54
	optParamRequest = 55
	optEnd          = 255

	dhcpHeaderSize = 240 // fixed part plus the magic cookie
)

var dhcpMagic = []byte{99, 130, 83, 99}

// dhcpLease is what the server handed out.
type dhcpLease struct {
	addr   netip.Prefix
	router netip.Addr
	dns    []netip.Addr
	server netip.Addr
}

// dhcpMsg is a parsed reply.
type dhcpMsg struct {
	xid     uint32
	yiaddr  netip.Addr
	msgType byte
	options map[byte][]byte
}

// buildDHCP builds a client message.
func buildDHCP(typ byte, xid uint32, mac net.HardwareAddr, opts [][2][]byte) []byte {
	b := make([]byte, dhcpHeaderSize, 300)
	b[0] = 1 // BOOTREQUEST
	b[1] = 1 // ethernet
	b[2] = 6
	binary.BigEndian.PutUint32(b[4:], xid)
	binary.BigEndian.PutUint16(b[10:], 0x8000) // broadcast replies, please
	copy(b[28:], mac)
	copy(b[236:], dhcpMagic)
	b = append(b, optMessageType, 1, typ)
	for _, o := range opts {
		b = append(b, o[0][0], byte(len(o[1])))
		b = append(b, o[1]...)
	}
	b = append(b, optParamRequest, 4, optSubnetMask, optRouter, optDNS, optLeaseTime)
	b = append(b, optEnd)
	for len(b) < 300 {
		b = append(b, 0)
	}
	return b
}

// parseDHCP parses a server reply; ok is false for anything else.
func parseDHCP(b []byte) (dhcpMsg, bool) {
	if len(b) < dhcpHeaderSize || b[0] != 2 || string(b[236:240]) != string(dhcpMagic) {
		return dhcpMsg{}, false
	}
	m := dhcpMsg{
		xid:     binary.BigEndian.Uint32(b[4:]),
		yiaddr:  netip.AddrFrom4([4]byte(b[16:20])),
		options: map[byte][]byte{},
	}
	for o := b[dhcpHeaderSize:]; len(o) > 0; {
		code := o[0]
		if code == optEnd {
			break
		}
		if code == 0 {
			o = o[1:]
			continue
		}
		if len(o) < 2 || len(o) < 2+int(o[1]) {
			return dhcpMsg{}, false
		}
		m.options[code] = o[2 : 2+int(o[1])]
		o = o[2+int(o[1]):]
	}
	if t := m.options[optMessageType]; len(t) == 1 {
		m.msgType = t[0]
	}
	return m, m.msgType != 0
}

// lease turns an ACK into a lease.
func (m dhcpMsg) lease() (dhcpLease, error) {
	mask := m.options[optSubnetMask]
	if len(mask) != 4 || !m.yiaddr.Is4() || m.yiaddr.IsUnspecified() {
		return dhcpLease{}, errors.New("dhcp: ack without an address and mask")
	}
	ones, _ := net.IPMask(mask).Size()
	l := dhcpLease{addr: netip.PrefixFrom(m.yiaddr, ones)}
	if r := m.options[optRouter]; len(r) >= 4 {
		l.router = netip.AddrFrom4([4]byte(r[:4]))
	}
	for d := m.options[optDNS]; len(d) >= 4; d = d[4:] {
		l.dns = append(l.dns, netip.AddrFrom4([4]byte(d[:4])))
	}
	if s := m.options[optServerID]; len(s) == 4 {
		l.server = netip.AddrFrom4([4]byte(s))
	}
	return l, nil
}

// dhcp runs discover/request on ifname (which must be up) until it gets a
// lease or timeout passes.
func dhcp(ifname string, mac net.HardwareAddr, timeout time.Duration) (dhcpLease, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return dhcpLease{}, err
	}
	defer unix.Close(fd)
	for _, o := range []struct {
		name string
		set  func() error
	}{
		{"SO_REUSEADDR", func() error { return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1) }},
		{"SO_BROADCAST", func() error { return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_BROADCAST, 1) }},
		{"SO_BINDTODEVICE", func() error { return unix.SetsockoptString(fd, unix.SOL_SOCKET, unix.SO_BINDTODEVICE, ifname) }},
		{"bind :68", func() error { return unix.Bind(fd, &unix.SockaddrInet4{Port: 68}) }},
	} {
		if err := o.set(); err != nil {
			return dhcpLease{}, fmt.Errorf("dhcp: %s: %w", o.name, err)
		}
	}
	var xb [4]byte
	_, _ = rand.Read(xb[:])
	xid := binary.BigEndian.Uint32(xb[:])
	bcast := &unix.SockaddrInet4{Port: 67, Addr: [4]byte{255, 255, 255, 255}}
	deadline := time.Now().Add(timeout)

	// exchange sends msg every second until a reply of one of the wanted
	// types arrives.
	exchange := func(msg []byte, want ...byte) (dhcpMsg, error) {
		buf := make([]byte, 1500)
		for time.Now().Before(deadline) {
			if err := unix.Sendto(fd, msg, 0, bcast); err != nil {
				return dhcpMsg{}, fmt.Errorf("dhcp: send: %w", err)
			}
			resend := time.Now().Add(time.Second)
			for time.Now().Before(resend) {
				wait := time.Until(resend)
				tv := unix.NsecToTimeval(wait.Nanoseconds())
				if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
					return dhcpMsg{}, err
				}
				n, _, err := unix.Recvfrom(fd, buf, 0)
				if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
					continue
				}
				if err != nil {
					return dhcpMsg{}, fmt.Errorf("dhcp: receive: %w", err)
				}
				m, ok := parseDHCP(buf[:n])
				if !ok || m.xid != xid {
					continue
				}
				for _, w := range want {
					if m.msgType == w {
						return m, nil
					}
				}
			}
		}
		return dhcpMsg{}, fmt.Errorf("dhcp: no answer on %s within %v", ifname, timeout)
	}

	for time.Now().Before(deadline) {
		offer, err := exchange(buildDHCP(dhcpDiscover, xid, mac, nil), dhcpOffer)
		if err != nil {
			return dhcpLease{}, err
		}
		ip := offer.yiaddr.As4()
		opts := [][2][]byte{{{optRequestedIP}, ip[:]}}
		if s := offer.options[optServerID]; len(s) == 4 {
			opts = append(opts, [2][]byte{{optServerID}, s})
		}
		ack, err := exchange(buildDHCP(dhcpRequest, xid, mac, opts), dhcpAck, dhcpNak)
		if err != nil {
			return dhcpLease{}, err
		}
		if ack.msgType == dhcpNak {
			continue // start over
		}
		return ack.lease()
	}
	return dhcpLease{}, fmt.Errorf("dhcp: no lease on %s within %v", ifname, timeout)
}
