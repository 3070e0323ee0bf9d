package images

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzAptResolution feeds the package resolution cached in an image
// manifest or in the cache directory (files on disk: untrusted). One that
// is taken as valid names package files that are plain file names in the
// cache and apt-get arguments that are not options.
func FuzzAptResolution(f *testing.F) {
	for _, s := range []string{
		`{"lists_stamp":"1","kernel_package":"linux-image-6.1.0-56-cloud-amd64","kernel_version":"6.1.153-1","busybox_version":"1:1.35.0-4+b3"}`,
		`{"lists_stamp":"1","kernel_package":"linux-image-cloud-amd64","busybox_version":"1.35.0-4"}`,
		`{"lists_stamp":"","kernel_package":"k","busybox_version":"v"}`,
		`{"lists_stamp":"1","kernel_package":"-oDebug::pkgProblemResolver=1","busybox_version":"v"}`,
	} {
		f.Add([]byte(s), "amd64")
	}
	f.Fuzz(func(t *testing.T, data []byte, arch string) {
		var r AptResolution
		if json.Unmarshal(data, &r) != nil || !r.valid(r.ListsStamp) {
			return
		}
		if arch != "amd64" && arch != "arm64" {
			arch = "amd64"
		}
		for _, pkg := range []struct{ name, version string }{{r.KernelPackage, r.KernelVersion}, {"busybox-static", r.BusyboxVersion}} {
			name := debFileName(pkg.name, pkg.version, arch)
			if filepath.Base(name) != name || strings.ContainsAny(name, "/\x00") || filepath.Join("/cache", name) != "/cache/"+name {
				t.Fatalf("resolution %s names package file %q", data, name)
			}
			if strings.HasPrefix(pkg.name, "-") || strings.ContainsAny(pkg.name+pkg.version, " \t\n=") {
				t.Fatalf("resolution %s gives apt-get the argument %q", data, pkg.name+":"+arch+"="+pkg.version)
			}
		}
	})
}

// TestAptResolutionValid: resolutions apt-cache gives on Debian 12 are
// taken from the cache; ones naming a path or an option are not.
func TestAptResolutionValid(t *testing.T) {
	for _, r := range []AptResolution{
		{ListsStamp: "1", KernelPackage: "linux-image-6.1.0-57-cloud-amd64", KernelVersion: "6.1.192-3", BusyboxVersion: "1:1.35.0-4+deb12u1+b1"},
		{ListsStamp: "1", KernelPackage: "linux-image-6.1.0-57-cloud-arm64", BusyboxVersion: "1:1.35.0-4+b3"},
	} {
		if !r.valid("1") {
			t.Errorf("%+v refused", r)
		}
		if r.valid("2") {
			t.Errorf("%+v taken with other apt lists", r)
		}
	}
	for _, r := range []AptResolution{
		{ListsStamp: "1", KernelPackage: "../../../tmp/evil", BusyboxVersion: "1"},
		{ListsStamp: "1", KernelPackage: "-oDebug::x=1", BusyboxVersion: "1"},
		{ListsStamp: "1", KernelPackage: "linux-image-x", KernelVersion: "1/../../k", BusyboxVersion: "1"},
		{ListsStamp: "1", KernelPackage: "linux-image-x", BusyboxVersion: "1 /x"},
		{ListsStamp: "1", KernelPackage: "linux-image-x"},
	} {
		if r.valid("1") {
			t.Errorf("%+v taken", r)
		}
	}
}
