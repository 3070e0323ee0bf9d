package subjects

import (
	"fmt"
	"testing"
)

func TestPageSandboxes(t *testing.T) {
	var list []Sandbox
	for i := 9; i >= 0; i-- { // out of order on purpose
		state := StateRunning
		if i%2 == 1 {
			state = StatePaused
		}
		list = append(list, Sandbox{SandboxID: fmt.Sprintf("sb%02d", i), State: state, Metadata: map[string]string{"team": []string{"a", "b"}[i%3/2]}})
	}
	req := ListSandboxesRequest{State: StateRunning, Limit: 2}
	if err := req.Validate(); err != nil {
		t.Fatal(err)
	}
	var got []string
	for pages := 0; pages < 10; pages++ {
		page := PageSandboxes(list, req)
		for _, sb := range page.Sandboxes {
			got = append(got, sb.SandboxID)
		}
		if page.NextCursor == "" {
			break
		}
		req.Cursor = page.NextCursor
	}
	if fmt.Sprint(got) != "[sb00 sb02 sb04 sb06 sb08]" {
		t.Errorf("running, pages of 2: %v", got)
	}
	page := PageSandboxes(list, ListSandboxesRequest{Metadata: map[string]string{"team": "b"}, Limit: 100})
	if len(page.Sandboxes) != 3 || page.NextCursor != "" || page.Sandboxes[0].SandboxID != "sb02" {
		t.Errorf("team b: %+v", page)
	}
	if page := PageSandboxes(list, ListSandboxesRequest{Metadata: map[string]string{"team": "c"}, Limit: 1}); len(page.Sandboxes) != 0 || page.NextCursor != "" {
		t.Errorf("team c: %+v", page)
	}
	for _, bad := range []ListSandboxesRequest{{Limit: -1}, {Limit: MaxListLimit + 1}, {Cursor: "../x"}} {
		if err := bad.Validate(); CodeOf(err) != CodeInvalidRequest {
			t.Errorf("%+v: %v, want invalid_request", bad, err)
		}
	}
	for _, c := range []int{-1, 9} {
		r := ForkRequest{Count: c}
		if err := r.Validate(); CodeOf(err) != CodeInvalidRequest {
			t.Errorf("fork count %d: %v", c, err)
		}
	}
	r := ForkRequest{}
	if err := r.Validate(); err != nil || r.Count != 1 {
		t.Errorf("default fork count: %d %v", r.Count, err)
	}
}
