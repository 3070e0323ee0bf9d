package embedded

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/internal/atomicfile"
)

// Access names what the embedded server's users reach: the subject prefix
// of the worker's API and the streams (logs, events, the KV buckets'
// streams) clients may read.
type Access struct {
	// Prefix is the subject prefix, e.g. "firkin".
	Prefix string
	// ReadStreams are the streams a client may read: stream info, message
	// and direct gets, its own consumers on them and their acks.
	ReadStreams []string
}

// WorkerInboxPrefix is the prefix of the worker's own reply subjects (its
// connection sets it with nats.CustomInboxPrefix). Clients subscribe to
// _INBOX.> for their replies; the worker's replies (JetStream API answers,
// KV reads) stay out of their sight, so a client can neither read them nor
// aim a forged answer at a reply subject it has seen.
const WorkerInboxPrefix = "_FIRKIN_WORKER_INBOX"

// WorkerPermissions are those of the worker's store connection: it sets up
// and writes its streams and KV buckets, publishes logs, events and
// results, acks its own consumers, and forwards creates placed on another
// worker to that worker's own subject (<prefix>.worker.*.sandbox.create,
// a subject derived from a validated member id, carrying the client's
// reply subject: the target answers the client); replies come to it on
// WorkerInboxPrefix. It serves nothing: requests are the service
// connection's (ServicePermissions), so no request can make the store
// connection publish anywhere.
func (a Access) WorkerPermissions() *server.Permissions {
	return &server.Permissions{
		Publish: &server.SubjectPermission{Allow: []string{
			a.Prefix + ".logs.>",                  // log events
			a.Prefix + ".proc.>",                  // process output, live
			a.Prefix + ".events.>",                // lifecycle events
			a.Prefix + ".metrics.>",               // per-sandbox resource samples
			a.Prefix + ".results.>",               // job results
			a.Prefix + ".jobs.dead.>",             // dead-lettered jobs
			a.Prefix + ".worker.*.sandbox.create", // creates forwarded by placement
			"$JS.API.>",                           // streams, buckets, consumers
			"$KV.>",                               // KV records
			"$O.>",                                // objects (snapshot artifacts)
			"$JS.ACK.>",                           // acks of its own consumers
			"$JS.FC.>",                            // flow-control replies of KV watchers
		}},
		Subscribe: &server.SubjectPermission{Allow: []string{
			WorkerInboxPrefix + ".>",
		}},
	}
}

// ServicePermissions are those of the worker's service connection: it
// serves <prefix>.> and the micro discovery subjects $SRV.>, and publishes
// nothing but replies into clients' inboxes (_INBOX.>). A request whose
// reply subject names a stream, a KV bucket or an event subject therefore
// cannot make the worker write there.
func (a Access) ServicePermissions() *server.Permissions {
	return &server.Permissions{
		Publish: &server.SubjectPermission{Allow: []string{"_INBOX.>"}},
		Subscribe: &server.SubjectPermission{Allow: []string{
			a.Prefix + ".>",
			"$SRV.>",
		}},
	}
}

// ClientPermissions are a client's: it may send requests to <prefix>.>
// (jobs included: <prefix>.jobs.<queue> stores a job), but never publish
// logs, events, results or dead letters, which only a worker writes;
// discover services on $SRV.>, receive replies on _INBOX.>, follow logs,
// events, job results and dead letters live, and read ReadStreams (stream info, message and direct
// gets, its own ordered or ephemeral consumers, their next-message
// requests, acks and flow-control replies). It may not write KV records
// ($KV.> is not allowed), and may not create, update, purge or delete
// streams or messages.
func (a Access) ClientPermissions() *server.Permissions {
	pub := []string{
		a.Prefix + ".>",
		"$SRV.>",
		"$JS.API.INFO",
		"$JS.API.STREAM.NAMES",
		"$JS.API.STREAM.LIST",
	}
	for _, s := range a.ReadStreams {
		pub = append(pub,
			"$JS.API.STREAM.INFO."+s,
			"$JS.API.STREAM.MSG.GET."+s,
			"$JS.API.DIRECT.GET."+s,
			"$JS.API.DIRECT.GET."+s+".>",
			"$JS.API.CONSUMER.CREATE."+s,
			"$JS.API.CONSUMER.CREATE."+s+".>",
			"$JS.API.CONSUMER.DURABLE.CREATE."+s+".*",
			"$JS.API.CONSUMER.INFO."+s+".*",
			"$JS.API.CONSUMER.DELETE."+s+".*",
			"$JS.API.CONSUMER.MSG.NEXT."+s+".*",
			"$JS.ACK."+s+".>",
			"$JS.FC."+s+".>",
		)
	}
	return &server.Permissions{
		Publish: &server.SubjectPermission{
			Allow: pub,
			Deny:  []string{a.Prefix + ".logs.>", a.Prefix + ".proc.>", a.Prefix + ".events.>", a.Prefix + ".results.>", a.Prefix + ".jobs.dead.>", a.Prefix + ".metrics.>"},
		},
		Subscribe: &server.SubjectPermission{Allow: []string{
			"_INBOX.>",
			a.Prefix + ".logs.>",
			a.Prefix + ".proc.>",
			a.Prefix + ".events.>",
			a.Prefix + ".results.>",
			a.Prefix + ".jobs.dead.>",
			a.Prefix + ".metrics.>",
		}},
	}
}

// Users returns the server's three nkey users: the worker's store and
// service connections, and its clients.
func (a Access) Users(workerKey, serviceKey, clientKey string) []*server.NkeyUser {
	return []*server.NkeyUser{
		{Nkey: workerKey, Permissions: a.WorkerPermissions()},
		{Nkey: serviceKey, Permissions: a.ServicePermissions()},
		{Nkey: clientKey, Permissions: a.ClientPermissions()},
	}
}

// LoadOrCreateSeed returns the nkey user whose seed is kept in the file at
// path, making one on first use (mode 0600, written atomically). A file that
// is not an nkey user seed, or that the group or others may read, is refused.
func LoadOrCreateSeed(path string) (nkeys.KeyPair, error) {
	kp, err := ReadSeed(path)
	if !errors.Is(err, fs.ErrNotExist) {
		return kp, err
	}
	kp, err = nkeys.CreateUser()
	if err != nil {
		return nil, fmt.Errorf("nkey %s: %w", path, err)
	}
	seed, err := kp.Seed()
	if err != nil {
		return nil, fmt.Errorf("nkey %s: %w", path, err)
	}
	if err := atomicfile.Write(path, append(seed, '\n'), 0o600); err != nil {
		return nil, fmt.Errorf("nkey %s: %w", path, err)
	}
	return kp, nil
}

// ReadSeed reads an nkey user seed file (as `nk -gen user` or the worker
// writes it; decorated files are accepted too). It refuses a file the group
// or others may read, and anything but a user seed.
func ReadSeed(path string) (nkeys.KeyPair, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("nkey seed file: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, errdefs.Wrap(errdefs.ErrFailedPrecondition,
			fmt.Errorf("nkey seed file %s has mode %04o: others may read it; chmod 600 it (or remove it to have a new one made)", path, fi.Mode().Perm()))
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("nkey seed file: %w", err)
	}
	defer clear(data)
	kp, err := nkeys.ParseDecoratedNKey(data)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("nkey seed file %s: not an nkey seed: %w", path, err))
	}
	if _, err := kp.Seed(); err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("nkey seed file %s: holds a public key, want a user seed (SU...)", path))
	}
	if pub, err := kp.PublicKey(); err != nil || !nkeys.IsValidPublicUserKey(pub) {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("nkey seed file %s: not a user seed (SU...)", path))
	}
	return kp, nil
}
