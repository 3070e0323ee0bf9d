package subjects

import (
	"time"
)

// Verbs of the file subjects firkin.sandbox.<id>.fs.<op> (see
// docs/PROTOCOL.md, "Files").
const (
	VerbFSRead    = "fs.read"
	VerbFSWrite   = "fs.write"
	VerbFSList    = "fs.list"
	VerbFSStat    = "fs.stat"
	VerbFSMkdir   = "fs.mkdir"
	VerbFSRemove  = "fs.remove"
	VerbFSRename  = "fs.rename"
	VerbFSWatch   = "fs.watch"
	VerbFSUnwatch = "fs.unwatch"
	// VerbFSChunkPrefix starts fs.chunk.<transfer id>: an upload's chunks.
	VerbFSChunkPrefix = "fs.chunk."
	// VerbFSAckPrefix starts fs.ack.<transfer id>: a download's acks.
	VerbFSAckPrefix = "fs.ack."
)

// FSVerbs lists the file verbs a client sends requests to.
var FSVerbs = []string{VerbFSRead, VerbFSWrite, VerbFSList, VerbFSStat, VerbFSMkdir, VerbFSRemove, VerbFSRename, VerbFSWatch, VerbFSUnwatch}

// FSChunk is <prefix>.sandbox.<id>.fs.chunk.<transfer id>, where an
// upload's chunks go.
func (s Subjects) FSChunk(id, transfer string) string {
	return s.Sandbox(id, VerbFSChunkPrefix+transfer)
}

// FSAck is <prefix>.sandbox.<id>.fs.ack.<transfer id>, where a download's
// acks go.
func (s Subjects) FSAck(id, transfer string) string {
	return s.Sandbox(id, VerbFSAckPrefix+transfer)
}

// Headers of the chunked transfers.
const (
	// HeaderTransfer carries the transfer id on every message of a transfer
	// the worker sends (the upload's start message, acks, a download's
	// chunks).
	HeaderTransfer = "Firkin-Transfer"
	// HeaderSeq is a chunk's sequence number (from 0).
	HeaderSeq = "Firkin-Seq"
	// HeaderAck is the sequence number of the last chunk taken, on an
	// upload's acks (worker → client) and a download's acks (client →
	// worker).
	HeaderAck = "Firkin-Ack"
	// HeaderEOF ("1") marks an upload's last message; its HeaderSHA256 is
	// the digest of everything sent.
	HeaderEOF = "Firkin-Eof"
	// HeaderSHA256 is a content's SHA-256 in lowercase hex.
	HeaderSHA256 = "Firkin-Sha256"
)

// Kinds of guest files (FileInfo.Type).
const (
	FileTypeFile    = "file"
	FileTypeDir     = "dir"
	FileTypeSymlink = "symlink"
	FileTypeOther   = "other"
)

// FileInfo describes one guest file. A final symlink is not followed.
type FileInfo struct {
	// Path is the guest path, absolute and clean.
	Path string `json:"path"`
	Type string `json:"type"`
	Size int64  `json:"size"`
	// Mode holds the permission bits plus setuid, setgid and sticky, as a
	// JSON number (420 is 0644).
	Mode  uint32    `json:"mode"`
	UID   uint32    `json:"uid"`
	GID   uint32    `json:"gid"`
	MTime time.Time `json:"mtime"`
	// Link is a symlink's target.
	Link string `json:"link,omitempty"`
}

// FSPathRequest is the body of fs.stat: {"path": "/etc/hostname"}.
type FSPathRequest struct {
	Path string `json:"path"`
	// User does the operation as this guest user (name, uid or uid:gid, as
	// exec's user; default root): the guest checks permissions as for them.
	User string `json:"user,omitempty"`
}

// FSReadRequest is the body of fs.read. Without stream the file comes back
// whole in the reply (base64 in "data"), when it fits one message; with
// stream it comes in chunks (raw message bodies) before the reply.
type FSReadRequest struct {
	Path   string `json:"path"`
	Stream bool   `json:"stream,omitempty"`
	// User does the operation as this guest user (name, uid or uid:gid, as
	// exec's user; default root): the guest checks permissions as for them.
	User string `json:"user,omitempty"`
}

// FSReadReply ends fs.read: the file as it was read, its size and digest,
// and (without stream) its content.
type FSReadReply struct {
	File   FileInfo `json:"file"`
	Data   []byte   `json:"data,omitempty"` // base64 in JSON
	Size   int64    `json:"size"`
	SHA256 string   `json:"sha256"`
	// Chunks is how many chunk messages a streamed read sent.
	Chunks int `json:"chunks,omitempty"`
}

// FSWriteRequest is the body of fs.write. The write is atomic (a temporary
// file next to path, renamed over it at the end). Without stream, data is
// the whole content; with stream the content follows in chunks (see
// FSTransfer). sha256, when set, must match the content or the file stays
// as it was.
type FSWriteRequest struct {
	Path string `json:"path"`
	Data []byte `json:"data,omitempty"` // base64 in JSON
	// Mode of the file (0: the old file's, or 0644), a JSON number.
	Mode uint32 `json:"mode,omitempty"`
	// Parents makes missing parent directories.
	Parents bool   `json:"parents,omitempty"`
	Stream  bool   `json:"stream,omitempty"`
	SHA256  string `json:"sha256,omitempty"`
	// User does the operation as this guest user (name, uid or uid:gid, as
	// exec's user; default root): the guest checks permissions as for them.
	User string `json:"user,omitempty"`
}

// FSWriteReply ends fs.write: the file as written.
type FSWriteReply struct {
	File   FileInfo `json:"file"`
	Size   int64    `json:"size"`
	SHA256 string   `json:"sha256"`
}

// FSTransfer is the first message of a streamed upload (worker → client,
// with HeaderTransfer): where to send the chunks, how large each may be,
// and how many may be unacknowledged at once.
type FSTransfer struct {
	Transfer  string `json:"transfer"`
	Subject   string `json:"subject"`
	ChunkSize int    `json:"chunk_size"`
	Window    int    `json:"window"`
}

// FSListRequest is the body of fs.list: depth 1 (the default) lists the
// directory's entries, n also theirs down to n levels (at most 32).
type FSListRequest struct {
	Path  string `json:"path"`
	Depth int    `json:"depth,omitempty"`
	// User does the operation as this guest user (name, uid or uid:gid, as
	// exec's user; default root): the guest checks permissions as for them.
	User string `json:"user,omitempty"`
}

// FSListReply answers fs.list. At most 10000 entries (Truncated when there
// were more); a reply that would not fit one message is cut and Truncated.
type FSListReply struct {
	Entries   []FileInfo `json:"entries"`
	Truncated bool       `json:"truncated,omitempty"`
}

// FSMkdirRequest is the body of fs.mkdir.
type FSMkdirRequest struct {
	Path string `json:"path"`
	Mode uint32 `json:"mode,omitempty"` // default 0755 (493)
	// Parents makes missing parents and accepts an existing directory
	// (mkdir -p).
	Parents bool `json:"parents,omitempty"`
	// User does the operation as this guest user (name, uid or uid:gid, as
	// exec's user; default root): the guest checks permissions as for them.
	User string `json:"user,omitempty"`
}

// FSRemoveRequest is the body of fs.remove.
type FSRemoveRequest struct {
	Path string `json:"path"`
	// Recursive removes a directory and everything in it (rm -r; a
	// missing path is then no error).
	Recursive bool `json:"recursive,omitempty"`
	// User does the operation as this guest user (name, uid or uid:gid, as
	// exec's user; default root): the guest checks permissions as for them.
	User string `json:"user,omitempty"`
}

// FSRenameRequest is the body of fs.rename.
type FSRenameRequest struct {
	Path string `json:"path"`
	To   string `json:"to"`
	// User does the operation as this guest user (name, uid or uid:gid, as
	// exec's user; default root): the guest checks permissions as for them.
	User string `json:"user,omitempty"`
}

// FSReply answers fs.mkdir, fs.remove, fs.rename and fs.unwatch.
type FSReply struct {
	OK bool `json:"ok"`
}

// FSWatchRequest is the body of fs.watch: the directory to watch and the
// subject the events go to, which must be under the clients' inbox prefix
// (_INBOX.). Recursive watches the directories below it too (at most
// MaxWatchDirs in all, new ones as they appear; events then name paths
// relative to the watched directory); without it, only the directory.
type FSWatchRequest struct {
	Path      string `json:"path"`
	Subject   string `json:"subject"`
	Recursive bool   `json:"recursive,omitempty"`
}

// MaxWatchDirs is the most directories one recursive watch watches (the
// watched one included); each directory beyond it is reported by a
// WatchLimit event and not watched.
const MaxWatchDirs = 1024

// FSWatchReply answers fs.watch once the watch is set up in the guest.
type FSWatchReply struct {
	Watch   string `json:"watch"`
	Subject string `json:"subject"`
}

// FSUnwatchRequest is the body of fs.unwatch.
type FSUnwatchRequest struct {
	Watch string `json:"watch"`
}

// Operations of watch events.
const (
	WatchCreate   = "create"
	WatchWrite    = "write"
	WatchRemove   = "remove"
	WatchRename   = "rename"
	WatchOverflow = "overflow"
	WatchGone     = "gone"
	// WatchLimit names a directory a recursive watch left unwatched (it
	// watches MaxWatchDirs already).
	WatchLimit = "limit"
)

// WatchEvent is one change in a watched directory. Count says how many
// events of the same op and name were merged into it.
type WatchEvent struct {
	Op    string `json:"op"`
	Name  string `json:"name,omitempty"`
	To    string `json:"to,omitempty"`
	Dir   bool   `json:"dir,omitempty"`
	Count int    `json:"count,omitempty"`
}

// FSWatchMessage is what a watch publishes on its subject: a batch of
// events, how many events the worker dropped since the last message
// because the subscriber was slow, and at the end End (with Error when
// the watch failed).
type FSWatchMessage struct {
	Watch   string       `json:"watch"`
	Events  []WatchEvent `json:"events,omitempty"`
	Dropped int64        `json:"dropped,omitempty"`
	End     bool         `json:"end,omitempty"`
	Error   *ErrorDetail `json:"error,omitempty"`
}
