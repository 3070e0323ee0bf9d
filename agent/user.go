package agent

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/firkin-dev/firkin-worker/errdefs"
)

// userInfo is who a command runs as.
type userInfo struct {
	name   string
	uid    uint32
	gid    uint32
	home   string
	groups []uint32 // supplementary groups
}

// passwdEntry is one line of /etc/passwd.
type passwdEntry struct {
	name     string
	uid, gid uint32
	home     string
}

// lookupUser resolves spec ("", a name, a uid, or user:group with either part
// a name or a number) against the passwd and group files of root.
func lookupUser(root, spec string) (userInfo, error) {
	if root == "" {
		root = "/"
	}
	userPart, groupPart, hasGroup := strings.Cut(spec, ":")
	if userPart == "" {
		userPart = "root"
	}
	users := readPasswd(filepath.Join(root, "etc/passwd"))
	var u userInfo
	if uid, err := strconv.ParseUint(userPart, 10, 32); err == nil {
		u = userInfo{uid: uint32(uid), gid: uint32(uid), home: "/"}
		for _, e := range users {
			if e.uid == uint32(uid) {
				u = userInfo{name: e.name, uid: e.uid, gid: e.gid, home: e.home}
				break
			}
		}
	} else {
		found := false
		for _, e := range users {
			if e.name == userPart {
				u = userInfo{name: e.name, uid: e.uid, gid: e.gid, home: e.home}
				found = true
				break
			}
		}
		if !found {
			if userPart != "root" {
				return userInfo{}, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("unknown user %q", userPart))
			}
			u = userInfo{name: "root", home: "/root"}
		}
	}
	groups := readGroups(filepath.Join(root, "etc/group"))
	if hasGroup {
		if gid, err := strconv.ParseUint(groupPart, 10, 32); err == nil {
			u.gid = uint32(gid)
		} else {
			g, ok := groups[groupPart]
			if !ok {
				return userInfo{}, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("unknown group %q", groupPart))
			}
			u.gid = g.gid
		}
	} else if u.name != "" {
		for _, g := range groups {
			for _, m := range g.members {
				if m == u.name && g.gid != u.gid {
					u.groups = append(u.groups, g.gid)
				}
			}
		}
	}
	if u.home == "" {
		u.home = "/"
	}
	return u, nil
}

func readPasswd(path string) []passwdEntry {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	return parsePasswd(f)
}

func parsePasswd(r io.Reader) []passwdEntry {
	var out []passwdEntry
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := strings.Split(sc.Text(), ":")
		if len(f) < 6 || strings.HasPrefix(f[0], "#") {
			continue
		}
		uid, err1 := strconv.ParseUint(f[2], 10, 32)
		gid, err2 := strconv.ParseUint(f[3], 10, 32)
		if err1 != nil || err2 != nil {
			continue
		}
		out = append(out, passwdEntry{name: f[0], uid: uint32(uid), gid: uint32(gid), home: f[5]})
	}
	return out
}

type groupEntry struct {
	gid     uint32
	members []string
}

func readGroups(path string) map[string]groupEntry {
	out := map[string]groupEntry{}
	f, err := os.Open(path)
	if err != nil {
		return out
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		f := strings.Split(sc.Text(), ":")
		if len(f) < 4 || strings.HasPrefix(f[0], "#") {
			continue
		}
		gid, err := strconv.ParseUint(f[2], 10, 32)
		if err != nil {
			continue
		}
		var members []string
		if f[3] != "" {
			members = strings.Split(f[3], ",")
		}
		out[f[0]] = groupEntry{gid: uint32(gid), members: members}
	}
	return out
}
