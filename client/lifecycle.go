package client

import (
	"context"
	"fmt"

	"github.com/firkin-dev/firkin-worker/subjects"
)

// maxListPages bounds the pages ListAll follows.
const maxListPages = 1000

// Pause saves a sandbox as a continuation snapshot and stops its machine;
// the sandbox stays, in state paused, until Resume (or Kill).
func (c *Client) Pause(ctx context.Context, id string) (subjects.Sandbox, error) {
	var sb subjects.Sandbox
	err := c.Request(ctx, c.subj.Sandbox(id, subjects.VerbPause), subjects.PauseRequest{}, &sb)
	return sb, err
}

// Resume restores a paused sandbox under the same id, token, routes,
// processes and files.
func (c *Client) Resume(ctx context.Context, id string, req subjects.ResumeRequest) (subjects.Sandbox, error) {
	var sb subjects.Sandbox
	err := c.Request(ctx, c.subj.Sandbox(id, subjects.VerbResume), req, &sb)
	return sb, err
}

// Fork makes req.Count new running sandboxes from a running one; each
// record in the reply carries its traffic access token.
func (c *Client) Fork(ctx context.Context, id string, req subjects.ForkRequest) (subjects.ForkReply, error) {
	var r subjects.ForkReply
	err := c.Request(ctx, c.subj.Sandbox(id, subjects.VerbFork), req, &r)
	return r, err
}

// ListPage returns one page of the cluster's sandboxes that match req's
// filters; pass the reply's NextCursor as req.Cursor for the next.
func (c *Client) ListPage(ctx context.Context, req subjects.ListSandboxesRequest) (subjects.ListSandboxesReply, error) {
	var r subjects.ListSandboxesReply
	err := c.Request(ctx, c.subj.ListSandboxes(), req, &r)
	return r, err
}

// ListAll follows the pages of a filtered list to its end.
func (c *Client) ListAll(ctx context.Context, req subjects.ListSandboxesRequest) ([]subjects.Sandbox, error) {
	var all []subjects.Sandbox
	for range maxListPages {
		page, err := c.ListPage(ctx, req)
		if err != nil {
			return all, err
		}
		all = append(all, page.Sandboxes...)
		if page.NextCursor == "" {
			return all, nil
		}
		req.Cursor = page.NextCursor
	}
	return all, fmt.Errorf("list: more than %d pages", maxListPages)
}

// TakeOver resumes a paused sandbox whose worker is gone on whichever
// worker answers firkin.sandbox.resume (its record moves there).
func (c *Client) TakeOver(ctx context.Context, req subjects.TakeOverRequest) (subjects.Sandbox, error) {
	var sb subjects.Sandbox
	err := c.Request(ctx, c.subj.ResumeSandbox(), req, &sb)
	return sb, err
}
