// Package client is a typed Go client of the firkin-worker NATS API for
// product services: sandboxes (create, exec, snapshot, route, kill, logs),
// processes (start, list, connect; output as an io.Reader, stdin as an
// io.WriteCloser, signal, resize, wait), templates, pools, and durable jobs
// (submit, wait for the result, watch the output live, cancel, status).
//
// Every method takes a context that bounds how long it waits (never a
// sandbox's or a job's lifetime). Error replies come back as *Error, which
// carries the contract's code and message and matches errors.Is against the
// errdefs classes (subjects.CodeOf gives the code back); a request nobody
// answered also matches ErrNoResponders.
package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"

	"github.com/nats-io/nats.go"
	js "github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// Client sends requests to the workers on one NATS connection. It is safe
// for concurrent use.
type Client struct {
	nc   *nats.Conn
	subj subjects.Subjects
	// fsUser is the guest user file operations run as (AsUser).
	fsUser string

	mu      sync.Mutex
	js      js.JetStream
	results js.KeyValue
}

// NkeyFile authenticates a connection with the nkey user seed in the file at
// path, e.g. a worker's <state dir>/client.nk:
//
//	nc, err := nats.Connect(url, client.NkeyFile("/var/lib/firkin/client.nk"))
//
// The seed is read again for each signature rather than kept in memory. A
// file that holds no nkey makes the connect fail with the reason.
func NkeyFile(path string) nats.Option {
	opt, err := nats.NkeyOptionFromSeed(path)
	if err != nil {
		return func(*nats.Options) error {
			return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("nkey seed file %s: %w", path, err))
		}
	}
	return opt
}

// New returns a client using the default subject prefix.
func New(nc *nats.Conn) *Client { return &Client{nc: nc, subj: subjects.Default} }

// WithPrefix returns a client on c's connection using another subject prefix.
func (c *Client) WithPrefix(s subjects.Subjects) *Client { return &Client{nc: c.nc, subj: s} }

// Subjects returns the subjects c's requests go to (its prefix's).
func (c *Client) Subjects() subjects.Subjects { return c.subj }

// Conn returns the client's NATS connection.
func (c *Client) Conn() *nats.Conn { return c.nc }

// Request sends req (JSON) to subject and decodes the reply into reply. An
// error reply becomes an *Error. Nobody answering becomes an *Error matching
// ErrNoResponders: sandbox_not_found on a per-sandbox subject (its owner is
// gone), runtime_failed elsewhere (no worker runs).
func (c *Client) Request(ctx context.Context, subject string, req, reply any) error {
	data, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("encode request: %w", err)
	}
	return c.RequestRaw(ctx, subject, data, reply)
}

// RequestRaw is Request with a body sent as it is.
func (c *Client) RequestRaw(ctx context.Context, subject string, data []byte, reply any) error {
	msg, err := c.nc.RequestWithContext(ctx, subject, data)
	if errors.Is(err, nats.ErrNoResponders) {
		return c.noResponders(subject)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", subject, err)
	}
	return decodeReply(subject, msg, reply)
}

// decodeReply turns an error reply into an *Error and decodes any other
// reply into reply (when not nil).
func decodeReply(subject string, msg *nats.Msg, reply any) error {
	if msg.Header.Get(micro.ErrorCodeHeader) != "" {
		var body subjects.ErrorBody
		if err := json.Unmarshal(msg.Data, &body); err != nil || body.Error.Code == "" {
			return &Error{Subject: subject, Code: subjects.CodeRuntimeFailed,
				Message: fmt.Sprintf("error %s: %s", msg.Header.Get(micro.ErrorCodeHeader), msg.Header.Get(micro.ErrorHeader))}
		}
		return &Error{Subject: subject, Code: body.Error.Code, Message: body.Error.Message}
	}
	if reply == nil {
		return nil
	}
	if err := json.Unmarshal(msg.Data, reply); err != nil {
		return fmt.Errorf("%s: decode reply: %w", subject, err)
	}
	return nil
}

// Create creates a sandbox.
func (c *Client) Create(ctx context.Context, req subjects.CreateSandboxRequest) (subjects.Sandbox, error) {
	var sb subjects.Sandbox
	err := c.Request(ctx, c.subj.CreateSandbox(), req, &sb)
	return sb, err
}

// List lists the sandboxes of the cluster (every page).
func (c *Client) List(ctx context.Context) ([]subjects.Sandbox, error) {
	return c.ListAll(ctx, subjects.ListSandboxesRequest{Limit: subjects.MaxListLimit})
}

// Get returns a sandbox.
func (c *Client) Get(ctx context.Context, id string) (subjects.Sandbox, error) {
	var sb subjects.Sandbox
	err := c.Request(ctx, c.subj.Sandbox(id, subjects.VerbGet), struct{}{}, &sb)
	return sb, err
}

// Exec runs a command in a sandbox.
func (c *Client) Exec(ctx context.Context, id string, req subjects.ExecRequest) (subjects.ExecReply, error) {
	var r subjects.ExecReply
	err := c.Request(ctx, c.subj.Sandbox(id, subjects.VerbExec), req, &r)
	return r, err
}

// Kill stops and deletes a sandbox.
func (c *Client) Kill(ctx context.Context, id string) error {
	return c.Request(ctx, c.subj.Sandbox(id, subjects.VerbKill), struct{}{}, nil)
}

// Snapshot saves a sandbox.
func (c *Client) Snapshot(ctx context.Context, id string, req subjects.SnapshotRequest) (subjects.SnapshotRecord, error) {
	var r subjects.SnapshotRecord
	err := c.Request(ctx, c.subj.Sandbox(id, subjects.VerbSnapshot), req, &r)
	return r, err
}

// Route exposes a guest port.
func (c *Client) Route(ctx context.Context, id string, port int) (subjects.RouteReply, error) {
	var r subjects.RouteReply
	err := c.Request(ctx, c.subj.Sandbox(id, subjects.VerbRoute), subjects.RouteRequest{Port: port}, &r)
	return r, err
}

// SetTimeout moves a sandbox's deadline.
func (c *Client) SetTimeout(ctx context.Context, id string, seconds int) (subjects.Sandbox, error) {
	var sb subjects.Sandbox
	err := c.Request(ctx, c.subj.Sandbox(id, subjects.VerbTimeout), subjects.TimeoutRequest{TimeoutS: seconds}, &sb)
	return sb, err
}

// Logs returns a page of a sandbox's log events.
func (c *Client) Logs(ctx context.Context, id string, req subjects.LogsRequest) (subjects.LogsReply, error) {
	var r subjects.LogsReply
	err := c.Request(ctx, c.subj.Sandbox(id, subjects.VerbLogs), req, &r)
	return r, err
}

// BuildTemplate builds a template snapshot.
func (c *Client) BuildTemplate(ctx context.Context, req subjects.BuildTemplateRequest) (subjects.SnapshotRecord, error) {
	var r subjects.SnapshotRecord
	err := c.Request(ctx, c.subj.BuildTemplate(), req, &r)
	return r, err
}

// GetSnapshot returns a snapshot record.
func (c *Client) GetSnapshot(ctx context.Context, sid string) (subjects.SnapshotRecord, error) {
	var r subjects.SnapshotRecord
	err := c.Request(ctx, c.subj.Snapshot(sid, "get"), struct{}{}, &r)
	return r, err
}

// ListSnapshots lists snapshot records.
func (c *Client) ListSnapshots(ctx context.Context) ([]subjects.SnapshotRecord, error) {
	var r subjects.ListSnapshotsReply
	err := c.Request(ctx, c.subj.ListSnapshots(), struct{}{}, &r)
	return r.Snapshots, err
}

// DeleteSnapshot deletes a snapshot.
func (c *Client) DeleteSnapshot(ctx context.Context, sid string) error {
	return c.Request(ctx, c.subj.Snapshot(sid, "delete"), struct{}{}, nil)
}

// PoolStatus returns the first worker's pool status (PoolStatusAll hears
// every worker).
func (c *Client) PoolStatus(ctx context.Context) (subjects.PoolStatusReply, error) {
	var r subjects.PoolStatusReply
	err := c.Request(ctx, c.subj.PoolStatus(), struct{}{}, &r)
	return r, err
}

// SetPool sets a template's warm pool target (on every worker; the first
// reply is returned).
func (c *Client) SetPool(ctx context.Context, templateID string, target int) (subjects.PoolStatusReply, error) {
	var r subjects.PoolStatusReply
	err := c.Request(ctx, c.subj.SetPool(), subjects.PoolSetRequest{TemplateID: templateID, Target: target}, &r)
	return r, err
}
