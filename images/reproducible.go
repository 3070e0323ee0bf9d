package images

import (
	"crypto/sha256"
	"fmt"
	"strconv"
)

// Root disks are reproducible: the same inputs make the same bytes on every
// host, so a snapshot saved on one worker (whose disk layers sit on the
// root disk) restores on another that built its own image. mkfs.ext4 would
// otherwise pick a random file system UUID and directory hash seed and copy
// the staging files' times; here the UUID and seed derive from the disk's
// name (its inputs), the tools' clock is fixed with E2FSPROGS_FAKE_TIME, and
// every inode's times are set to that time after mkfs (fixInodes).
const (
	// rootfsRecipe is part of the root disk's inputs: disks made before
	// they were reproducible get a new name and are rebuilt.
	rootfsRecipe = "reproducible-1"
	// rootfsEpoch is every time stamp in the root disk (2023-11-14).
	rootfsEpoch = 1700000000
)

// recipe is what makes one disk's build reproducible.
type recipe struct {
	uuid string
	env  []string
}

// reproducible returns the UUID (also the directory hash seed) and tool
// environment of the disk named name.
func reproducible(name string) recipe {
	h := sha256.Sum256([]byte("firkin root disk " + name))
	h[6] = h[6]&0x0f | 0x40 // version 4 layout
	h[8] = h[8]&0x3f | 0x80 // RFC 4122 variant
	uuid := fmt.Sprintf("%x-%x-%x-%x-%x", h[0:4], h[4:6], h[6:8], h[8:10], h[10:16])
	return recipe{uuid: uuid, env: []string{"E2FSPROGS_FAKE_TIME=" + strconv.Itoa(rootfsEpoch)}}
}
