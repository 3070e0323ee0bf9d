//go:build !linux

package qemu

import "net"

// checkPeer needs SO_PEERCRED; machines outside Linux are not confined.
func checkPeer(net.Conn, int) error { return nil }
