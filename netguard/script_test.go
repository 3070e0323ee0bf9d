package netguard

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("%s differs from the golden file (run with -update after checking):\n%s", name, got)
	}
}

func TestScriptsGolden(t *testing.T) {
	tbl := table{name: "firkin_w1", uidFirst: 2000000000, uidLast: 2000065535, defaultDNSPort: 40000}
	golden(t, "table.nft", tableScript(tbl, false))
	golden(t, "table_quarantine.nft", tableScript(tbl, true))
	golden(t, "end_quarantine.nft", endQuarantineScript(tbl.name))

	full := Policy{
		Allow:        prefixes("10.99.0.2/32", "1.2.3.0/24", "2001:db8::/32"),
		Deny:         prefixes("1.0.0.0/8", "1.2.3.4/32", "::/0"),
		AllowDomains: []string{"*.pypi.org", "allowed.test"},
		DenyDomains:  []string{"denied.test"},
		HostPorts:    []uint16{8000, 8080},
	}
	first := plan(2000000005, 1, full, 40001)
	golden(t, "apply_full.nft", applyScript(tbl.name, 2000000005, full, first, nil))

	off := Policy{Off: true}
	second := plan(2000000005, 2, off, 0)
	golden(t, "apply_off_replacing.nft", applyScript(tbl.name, 2000000005, off, second, &first))

	allowlist := Policy{Deny: prefixes("0.0.0.0/0", "::/0"), Allow: prefixes("1.2.3.4/32")}
	golden(t, "apply_allowlist.nft", applyScript(tbl.name, 2000000006, allowlist, plan(2000000006, 3, allowlist, 0), nil))

	// A broad allow opens the public part of what it covers; an allow
	// inside one internal prefix opens exactly that.
	broad := Policy{
		Allow: prefixes("0.0.0.0/0", "10.1.2.0/24", "169.254.169.254/32", "2000::/3", "2002:a00::/24"),
		Deny:  prefixes("10.1.2.128/25"),
	}
	golden(t, "apply_broad.nft", applyScript(tbl.name, 2000000007, broad, plan(2000000007, 4, broad, 0), nil))

	golden(t, "remove.nft", removeScript(tbl.name, 2000000005, first))
	golden(t, "learn.nft", learnScript(tbl.name, first.chain+learnAllow4,
		[]netip.Addr{netip.MustParseAddr("10.231.1.2"), netip.MustParseAddr("1.2.3.4")}, 90*time.Second))
	if learnScript(tbl.name, "x", nil, time.Minute) != "" {
		t.Error("learnScript of no addresses is not empty")
	}
}

func TestTableName(t *testing.T) {
	for id, want := range map[string]string{
		"w1":            "firkin_w1",
		"host-a.b:4222": "firkin_host_a_b_4222",
		"":              "firkin_",
	} {
		if got := TableName(id); got != want || !tableNameRE.MatchString(got) {
			t.Errorf("TableName(%q) = %q, want %q", id, got, want)
		}
	}
	if got := TableName(string(make([]byte, 100))); len(got) != 64 || !tableNameRE.MatchString(got) {
		t.Errorf("long TableName = %q", got)
	}
}
