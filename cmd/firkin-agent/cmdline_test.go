//go:build linux

package main

import "testing"

func TestParseCmdline(t *testing.T) {
	c := parseCmdline("console=ttyS0 panic=-1 firkin.root=/dev/vdb firkin.channel=vsock firkin.vsock_port=2000 firkin.ip=10.0.2.15/24 firkin.gw=10.0.2.2 firkin.dns=10.0.2.3 firkin.debug")
	want := config{rootDev: "/dev/vdb", rootFSType: "ext4", portName: "firkin.agent", channel: "vsock", vsockPort: 2000,
		ip: "10.0.2.15/24", gw: "10.0.2.2", dns: "10.0.2.3", debug: true}
	if c != want {
		t.Errorf("parseCmdline = %+v, want %+v", c, want)
	}
	d := parseCmdline("console=ttyS0")
	if d.rootDev != "/dev/vda" || d.portName != "firkin.agent" || d.channel != "auto" || d.vsockPort != 1024 || d.debug {
		t.Errorf("defaults = %+v", d)
	}
}
