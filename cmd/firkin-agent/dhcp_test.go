//go:build linux

package main

import (
	"net"
	"net/netip"
	"testing"
)

func TestDHCPMessages(t *testing.T) {
	mac := net.HardwareAddr{2, 0, 0, 0, 0, 1}
	req := buildDHCP(dhcpRequest, 0x1234, mac, [][2][]byte{{{optRequestedIP}, {10, 0, 2, 15}}})
	if len(req) < 300 || req[0] != 1 || string(req[28:34]) != string(mac) {
		t.Fatalf("request: %x", req[:40])
	}
	// Turn it into a server ACK.
	ack := append([]byte(nil), req[:dhcpHeaderSize]...)
	ack[0] = 2
	copy(ack[16:20], []byte{10, 0, 2, 15})
	ack = append(ack,
		optMessageType, 1, dhcpAck,
		0, // padding
		optSubnetMask, 4, 255, 255, 255, 0,
		optRouter, 4, 10, 0, 2, 2,
		optDNS, 8, 10, 0, 2, 3, 1, 1, 1, 1,
		optServerID, 4, 10, 0, 2, 2,
		optEnd)
	m, ok := parseDHCP(ack)
	if !ok || m.msgType != dhcpAck || m.xid != 0x1234 {
		t.Fatalf("parse: %+v %v", m, ok)
	}
	l, err := m.lease()
	if err != nil {
		t.Fatal(err)
	}
	if l.addr != netip.MustParsePrefix("10.0.2.15/24") || l.router != netip.MustParseAddr("10.0.2.2") ||
		len(l.dns) != 2 || l.dns[1] != netip.MustParseAddr("1.1.1.1") || l.server != netip.MustParseAddr("10.0.2.2") {
		t.Errorf("lease %+v", l)
	}
	// Truncated options are refused, not read past.
	if _, ok := parseDHCP(ack[:len(ack)-12]); ok {
		t.Errorf("truncated reply parsed")
	}
	if _, ok := parseDHCP(req); ok {
		t.Errorf("a request parsed as a reply")
	}
}
