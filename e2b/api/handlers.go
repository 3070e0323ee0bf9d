package api

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/subjects"
)

func (s *Server) routes() {
	m := http.NewServeMux()
	m.HandleFunc("POST /sandboxes", s.create(false))
	m.HandleFunc("POST /v2/sandboxes", s.create(true))
	m.HandleFunc("GET /sandboxes", s.listV1)
	m.HandleFunc("GET /v2/sandboxes", s.listV2)
	m.HandleFunc("GET /sandboxes/metrics", s.metricsMany)
	m.HandleFunc("GET /sandboxes/{id}", s.withID(s.get))
	m.HandleFunc("DELETE /sandboxes/{id}", s.withID(s.kill))
	m.HandleFunc("POST /sandboxes/{id}/timeout", s.withID(s.setTimeout))
	m.HandleFunc("POST /sandboxes/{id}/refreshes", s.withID(s.refresh))
	m.HandleFunc("POST /sandboxes/{id}/pause", s.withID(s.pause))
	m.HandleFunc("POST /sandboxes/{id}/resume", s.withID(s.resume))
	m.HandleFunc("POST /sandboxes/{id}/connect", s.withID(s.connect))
	m.HandleFunc("POST /v2/sandboxes/{id}/connect", s.withID(s.connect))
	m.HandleFunc("POST /sandboxes/{id}/fork", s.withID(s.fork))
	m.HandleFunc("POST /sandboxes/{id}/snapshots", s.withID(s.snapshot))
	m.HandleFunc("GET /sandboxes/{id}/metrics", s.withID(s.metrics))
	m.HandleFunc("PUT /sandboxes/{id}/network", s.withID(s.updateNetwork))
	m.HandleFunc("GET /snapshots", s.listSnapshots)
	m.HandleFunc("DELETE /templates/{id}", s.deleteSnapshot)
	m.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("%s %s is not part of firkin's E2B API", r.Method, r.URL.Path))
	})
	s.mux = m
}

// withID validates the path's sandbox id before h sees it: an id that
// cannot be a sandbox id is a sandbox nobody has (404).
func (s *Server) withID(h func(w http.ResponseWriter, r *http.Request, id string)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("id")
		if subjects.ValidateSandboxID(id) != nil {
			writeError(w, http.StatusNotFound, "sandbox not found")
			return
		}
		h(w, r, id)
	}
}

// Bounds of create's maps.
const (
	maxMetadata      = 64
	maxMetadataKey   = 256
	maxMetadataValue = 4096
	maxEnvVars       = 256
	maxEnvValue      = 128 << 10
	maxTimeoutS      = 86400
)

// Default lifetimes of E2B's create: 15 s for /sandboxes, 300 s for
// /v2/sandboxes.
const (
	defaultTimeoutV1 = 15
	defaultTimeoutV2 = 300
)

func (s *Server) create(v2 bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var body newSandbox
		if err := decode(w, r, maxCreateBody, &body); err != nil {
			s.fail(w, r, err)
			return
		}
		req, err := s.createRequest(body, v2)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), longWait)
		defer cancel()
		if req.TemplateID, req.SnapshotID, err = s.resolveTemplate(ctx, body.TemplateID); err != nil {
			s.fail(w, r, err)
			return
		}
		sb, err := s.api.Create(ctx, req)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		s.tokens.put(sb)
		writeJSON(w, http.StatusCreated, s.sandboxReply(sb, body.TemplateID, sb.EnvdAccessToken, sb.TrafficAccessToken))
	}
}

// createRequest turns E2B's create body into firkin's (all but the
// template), refusing what firkin cannot do rather than ignoring it.
func (s *Server) createRequest(b newSandbox, v2 bool) (subjects.CreateSandboxRequest, error) {
	var req subjects.CreateSandboxRequest
	timeout := defaultTimeoutV1
	if v2 {
		timeout = defaultTimeoutV2
	}
	if b.Timeout != nil {
		timeout = *b.Timeout
	}
	if timeout < 1 || timeout > maxTimeoutS {
		return req, badRequest("timeout %d: want 1..%d seconds", timeout, maxTimeoutS)
	}
	req.TimeoutS = timeout
	if err := checkMap("metadata", b.Metadata, maxMetadata, maxMetadataKey, maxMetadataValue); err != nil {
		return req, err
	}
	if err := checkMap("envVars", b.EnvVars, maxEnvVars, maxMetadataKey, maxEnvValue); err != nil {
		return req, err
	}
	req.Metadata, req.Env = b.Metadata, b.EnvVars
	// Every sandbox is secured (/v2/sandboxes always is in E2B; a
	// /sandboxes create that asks for secure false gets it too): the SDK
	// then reaches the sandbox API with the envd access token, which it
	// sends whenever it has one. firkin opens the sandbox API of a sandbox
	// that is not secure only with its traffic token, which the SDK never
	// sends there.
	req.Secure = true
	switch {
	case b.MCP != nil:
		return req, badRequest("mcp is not supported by firkin")
	case b.IAM != nil:
		return req, badRequest("iam is not supported by firkin")
	case len(b.VolumeMounts) > 0:
		return req, badRequest("volumeMounts are not supported by firkin")
	case b.AutoPauseMemory != nil && !*b.AutoPauseMemory:
		return req, badRequest("autoPauseMemory false (a filesystem-only pause) is not supported by firkin: a pause keeps memory")
	}
	if b.AutoPause != nil && *b.AutoPause {
		req.OnTimeout = subjects.OnTimeoutPause
	}
	if b.AutoResume != nil && b.AutoResume.Enabled {
		if req.OnTimeout != subjects.OnTimeoutPause {
			return req, badRequest("autoResume can only be enabled with autoPause")
		}
		req.AutoResume = true
	}
	egress, public, err := networkPolicy(b.Network, b.AllowInternetAccess)
	if err != nil {
		return req, err
	}
	req.Egress, req.PublicTraffic = egress, public
	return req, nil
}

// networkPolicy turns E2B's network settings into a firkin egress policy:
// allowOut and denyOut are its allow and deny lists (firkin judges the
// most specific entry, so an allowed address inside a denied range is
// allowed, as E2B has it), allow_internet_access false denies every
// address not allowed.
func networkPolicy(n *networkConfig, internet *bool) (*subjects.EgressPolicy, *bool, error) {
	var p subjects.EgressPolicy
	var public *bool
	if n != nil {
		switch {
		case n.EgressProxy != nil:
			return nil, nil, badRequest("network.egressProxy is not supported by firkin")
		case n.Rules != nil:
			return nil, nil, badRequest("network.rules are not supported by firkin")
		case n.MaskRequestHost != "":
			return nil, nil, badRequest("network.maskRequestHost is not supported by firkin")
		case len(n.HTTPSPorts) > 0:
			return nil, nil, badRequest("network.httpsPorts are not supported by firkin")
		}
		p.Allow = append(p.Allow, n.AllowOut...)
		p.Deny = append(p.Deny, n.DenyOut...)
		public = n.AllowPublicTraffic
	}
	if internet != nil && !*internet {
		p.Deny = append(p.Deny, "0.0.0.0/0", "::/0")
	}
	if len(p.Allow) == 0 && len(p.Deny) == 0 {
		return nil, public, nil
	}
	if err := p.Validate(); err != nil {
		return nil, nil, badRequest("network: %v", err)
	}
	return &p, public, nil
}

// checkMap bounds a string map of the request.
func checkMap(name string, m map[string]string, maxLen, maxKey, maxValue int) error {
	if len(m) > maxLen {
		return badRequest("%s: %d entries, at most %d", name, len(m), maxLen)
	}
	for k, v := range m {
		if k == "" || len(k) > maxKey || len(v) > maxValue || !utf8.ValidString(k) || !utf8.ValidString(v) {
			return badRequest("%s: entry %.64q: want a key of 1..%d and a value of at most %d bytes of UTF-8", name, k, maxKey, maxValue)
		}
	}
	return nil
}

// validE2BTemplate accepts E2B's template ids, aliases and snapshot names
// (team/name:tag): 1..128 of [A-Za-z0-9._/:-].
func validE2BTemplate(id string) bool {
	if id == "" || len(id) > 128 {
		return false
	}
	for _, c := range id {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '_', c == '/', c == ':', c == '-':
		default:
			return false
		}
	}
	return true
}

// resolveTemplate finds what an E2B template id names: a mapped template,
// a continuation snapshot (as createSnapshot returns it), or a firkin
// template.
func (s *Server) resolveTemplate(ctx context.Context, id string) (templateID, snapshotID string, err error) {
	if !validE2BTemplate(id) {
		return "", "", badRequest("templateID %.64q: want 1..128 of [A-Za-z0-9._/:-]", id)
	}
	if t, ok := s.templates[id]; ok {
		return t, "", nil
	}
	if subjects.ValidateSnapshotName(id) == nil {
		rec, err := s.api.GetSnapshot(ctx, id)
		switch {
		case err == nil && rec.Kind == subjects.KindContinuation:
			return "", id, nil
		case err != nil && !errors.Is(err, errdefs.ErrNotFound):
			return "", "", err
		}
	}
	if subjects.ValidateTemplateID(id) != nil {
		return "", "", notFound("template %q not found", id)
	}
	return id, "", nil
}

// e2bTemplate is the E2B template id of a firkin sandbox: the snapshot it
// was created from when that is one the user made (in E2B a snapshot is a
// template), else its template, under its E2B name.
func (s *Server) e2bTemplate(sb subjects.Sandbox) string {
	if sb.TemplateID == "" || (sb.SnapshotID != "" && sb.SnapshotID != sb.TemplateID && sb.ForkedFrom == "" &&
		!strings.Contains(sb.SnapshotID, "-pause-")) {
		return sb.SnapshotID
	}
	if a := s.aliases[sb.TemplateID]; a != "" {
		return a
	}
	return sb.TemplateID
}

func (s *Server) domainPtr() *string {
	if s.domain == "" {
		return nil
	}
	d := s.domain
	return &d
}

// sandboxReply is E2B's Sandbox for sb.
func (s *Server) sandboxReply(sb subjects.Sandbox, template, envdToken, trafficToken string) sandbox {
	if template == "" {
		template = s.e2bTemplate(sb)
	}
	out := sandbox{
		SandboxID:       sb.SandboxID,
		TemplateID:      template,
		Alias:           template,
		ClientID:        sb.ClientID,
		EnvdVersion:     EnvdVersion,
		EnvdAccessToken: envdToken,
		Domain:          s.domainPtr(),
	}
	if trafficToken != "" {
		out.TrafficAccessToken = &trafficToken
	}
	return out
}

// e2bState is a firkin state as E2B has it ("" for states E2B has not).
func e2bState(state string) string {
	switch state {
	case subjects.StateRunning, subjects.StatePaused:
		return state
	}
	return ""
}

// detail is E2B's SandboxDetail (or ListedSandbox) for sb.
func (s *Server) detail(sb subjects.Sandbox, full bool) sandboxDetail {
	d := sandboxDetail{
		SandboxID:    sb.SandboxID,
		TemplateID:   s.e2bTemplate(sb),
		ClientID:     sb.ClientID,
		CPUCount:     sb.Resources.VCPUs,
		MemoryMB:     sb.Resources.MemoryMB,
		StartedAt:    sb.StartedAt.UTC().Format(time.RFC3339Nano),
		EndAt:        sb.EndAt.UTC().Format(time.RFC3339Nano),
		State:        e2bState(sb.State),
		EnvdVersion:  EnvdVersion,
		Metadata:     sb.Metadata,
		VolumeMounts: []any{},
	}
	d.Alias = d.TemplateID
	if sb.Paused != nil {
		// A paused sandbox's deadline is suspended: say when it would end
		// if resumed now.
		d.EndAt = time.Now().Add(time.Duration(sb.Paused.RemainingMS) * time.Millisecond).UTC().Format(time.RFC3339Nano)
	}
	if !full {
		return d
	}
	d.Domain = s.domainPtr()
	d.EnvdAccessToken = s.tokens.get(sb).envd
	onTimeout := sb.OnTimeout
	if onTimeout == "" {
		onTimeout = subjects.OnTimeoutKill
	}
	d.Lifecycle = &lifecycle{AutoResume: sb.AutoResume, OnTimeout: onTimeout}
	public := sb.PublicTraffic
	d.Network = &networkConfig{AllowPublicTraffic: &public}
	if sb.Egress != nil {
		d.Network.AllowOut, d.Network.DenyOut = sb.Egress.Allow, sb.Egress.Deny
	}
	if !sb.Network {
		f := false
		d.AllowInternetAccess = &f
	}
	return d
}

func (s *Server) get(w http.ResponseWriter, r *http.Request, id string) {
	ctx, cancel := context.WithTimeout(r.Context(), shortWait)
	defer cancel()
	sb, err := s.api.Get(ctx, id)
	if err == nil && e2bState(sb.State) == "" {
		err = notFound("sandbox not found")
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, s.detail(sb, true))
}

func (s *Server) kill(w http.ResponseWriter, r *http.Request, id string) {
	ctx, cancel := context.WithTimeout(r.Context(), shortWait)
	defer cancel()
	if err := s.api.Kill(ctx, id); err != nil {
		s.fail(w, r, err)
		return
	}
	s.tokens.drop(id)
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) setTimeout(w http.ResponseWriter, r *http.Request, id string) {
	var body timeoutRequest
	if err := decode(w, r, maxBody, &body); err != nil {
		s.fail(w, r, err)
		return
	}
	if body.Timeout == nil || *body.Timeout < 0 || *body.Timeout > maxTimeoutS {
		s.fail(w, r, badRequest("timeout: want 0..%d seconds", maxTimeoutS))
		return
	}
	s.timeout(w, r, id, *body.Timeout)
}

func (s *Server) refresh(w http.ResponseWriter, r *http.Request, id string) {
	var body refreshRequest
	if err := decode(w, r, maxBody, &body); err != nil {
		s.fail(w, r, err)
		return
	}
	d := 60
	if body.Duration != nil {
		d = *body.Duration
	}
	if d < 0 || d > 3600 {
		s.fail(w, r, badRequest("duration %d: want 0..3600 seconds", d))
		return
	}
	s.timeout(w, r, id, d)
}

// timeout sets the deadline to now + seconds (0: the sandbox ends at
// once, as E2B has it; firkin's least timeout is one second).
func (s *Server) timeout(w http.ResponseWriter, r *http.Request, id string, seconds int) {
	ctx, cancel := context.WithTimeout(r.Context(), shortWait)
	defer cancel()
	if seconds == 0 {
		seconds = 1
	}
	if _, err := s.api.SetTimeout(ctx, id, seconds); err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) pause(w http.ResponseWriter, r *http.Request, id string) {
	var body timeoutRequest
	if err := decode(w, r, maxBody, &body); err != nil {
		s.fail(w, r, err)
		return
	}
	if body.Memory != nil && !*body.Memory {
		s.fail(w, r, badRequest("memory false (a filesystem-only pause) is not supported by firkin: a pause keeps memory"))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), longWait)
	defer cancel()
	sb, err := s.api.Get(ctx, id)
	if err == nil && sb.State == subjects.StatePaused {
		err = conflict("sandbox %s is already paused", id)
	}
	if err == nil {
		_, err = s.api.Pause(ctx, id)
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// resume is the deprecated POST /sandboxes/{id}/resume: a running sandbox
// is a conflict.
func (s *Server) resume(w http.ResponseWriter, r *http.Request, id string) {
	s.resumeOrConnect(w, r, id, false)
}

// connect resumes a paused sandbox (201) or extends a running one's
// lifetime to at least now + timeout (200).
func (s *Server) connect(w http.ResponseWriter, r *http.Request, id string) {
	s.resumeOrConnect(w, r, id, true)
}

func (s *Server) resumeOrConnect(w http.ResponseWriter, r *http.Request, id string, connect bool) {
	var body timeoutRequest
	if err := decode(w, r, maxBody, &body); err != nil {
		s.fail(w, r, err)
		return
	}
	if body.Memory != nil && !*body.Memory {
		s.fail(w, r, badRequest("memory false (resuming from disk only) is not supported by firkin"))
		return
	}
	timeout := 0
	if body.Timeout != nil {
		if *body.Timeout < 1 || *body.Timeout > maxTimeoutS {
			s.fail(w, r, badRequest("timeout %d: want 1..%d seconds", *body.Timeout, maxTimeoutS))
			return
		}
		timeout = *body.Timeout
	} else if !connect {
		timeout = defaultTimeoutV1
	}
	ctx, cancel := context.WithTimeout(r.Context(), longWait)
	defer cancel()
	sb, err := s.api.Get(ctx, id)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	status := http.StatusCreated
	switch sb.State {
	case subjects.StatePaused:
		sb, err = s.api.Resume(ctx, id, subjects.ResumeRequest{TimeoutS: timeout})
	case subjects.StateRunning:
		if !connect {
			err = conflict("sandbox %s is already running", id)
			break
		}
		status = http.StatusOK
		if timeout > 0 && time.Until(sb.EndAt) < time.Duration(timeout)*time.Second {
			sb, err = s.api.SetTimeout(ctx, id, timeout)
		}
	default:
		err = notFound("sandbox not found")
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.tokens.put(sb) // a resume reply that carries tokens renews them
	tok := s.tokens.get(sb)
	envd, traffic := sb.EnvdAccessToken, sb.TrafficAccessToken
	if envd == "" {
		envd = tok.envd
	}
	if traffic == "" {
		traffic = tok.traffic
	}
	writeJSON(w, status, s.sandboxReply(sb, "", envd, traffic))
}

func (s *Server) fork(w http.ResponseWriter, r *http.Request, id string) {
	var body forkRequest
	if err := decode(w, r, maxBody, &body); err != nil {
		s.fail(w, r, err)
		return
	}
	req := subjects.ForkRequest{Count: 1}
	if body.Count != nil {
		req.Count = *body.Count
	}
	if body.Timeout != nil {
		if *body.Timeout < 1 || *body.Timeout > maxTimeoutS {
			s.fail(w, r, badRequest("timeout %d: want 1..%d seconds", *body.Timeout, maxTimeoutS))
			return
		}
		req.TimeoutS = *body.Timeout
	}
	if err := req.Validate(); err != nil {
		s.fail(w, r, badRequest("%v", err))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), forkWait)
	defer cancel()
	reply, err := s.api.Fork(ctx, id, req)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	out := make([]forkResult, 0, len(reply.Sandboxes))
	for _, sb := range reply.Sandboxes {
		s.tokens.put(sb)
		one := s.sandboxReply(sb, "", sb.EnvdAccessToken, sb.TrafficAccessToken)
		out = append(out, forkResult{Sandbox: &one})
	}
	writeJSON(w, http.StatusCreated, out)
}

func (s *Server) snapshot(w http.ResponseWriter, r *http.Request, id string) {
	var body snapshotRequest
	if err := decode(w, r, maxBody, &body); err != nil {
		s.fail(w, r, err)
		return
	}
	if body.Name != "" && subjects.ValidateSnapshotName(body.Name) != nil {
		s.fail(w, r, badRequest("name %.64q: want 1..128 of [A-Za-z0-9._-], not starting or ending with a dot, no '..'", body.Name))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), longWait)
	defer cancel()
	rec, err := s.api.Snapshot(ctx, id, subjects.SnapshotRequest{Name: body.Name, Kind: subjects.KindContinuation})
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, snapshotInfo{SnapshotID: rec.SnapshotID, Names: snapshotNames(rec)})
}

func snapshotNames(rec subjects.SnapshotRecord) []string {
	if len(rec.Names) > 0 {
		return rec.Names
	}
	return []string{rec.SnapshotID}
}

// internalSnapshot reports snapshots the workers make for themselves
// (pause and fork), which are not the user's.
func internalSnapshot(rec subjects.SnapshotRecord) bool {
	if rec.SourceSandboxID == "" {
		return false
	}
	for _, kind := range []string{"-pause-", "-fork-", "-forkmem-"} {
		if strings.HasPrefix(rec.SnapshotID, rec.SourceSandboxID+kind) {
			return true
		}
	}
	return false
}

func (s *Server) listSnapshots(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	limit, err := pageLimit(q.Get("limit"))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	source, name, next := q.Get("sandboxID"), q.Get("name"), q.Get("nextToken")
	ctx, cancel := context.WithTimeout(r.Context(), shortWait)
	defer cancel()
	recs, err := s.api.ListSnapshots(ctx)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	sort.Slice(recs, func(i, j int) bool { return recs[i].SnapshotID < recs[j].SnapshotID })
	out := []snapshotInfo{}
	for _, rec := range recs {
		if rec.Kind != subjects.KindContinuation || internalSnapshot(rec) ||
			(source != "" && rec.SourceSandboxID != source) || (name != "" && rec.SnapshotID != name) ||
			(next != "" && rec.SnapshotID <= next) {
			continue
		}
		if len(out) == limit {
			w.Header().Set("X-Next-Token", out[len(out)-1].SnapshotID)
			break
		}
		out = append(out, snapshotInfo{SnapshotID: rec.SnapshotID, Names: snapshotNames(rec)})
	}
	writeJSON(w, http.StatusOK, out)
}

// deleteSnapshot is DELETE /templates/{id} as the SDK's deleteSnapshot
// sends it: only continuation snapshots are deleted this way (firkin's
// templates are not E2B's to delete).
func (s *Server) deleteSnapshot(w http.ResponseWriter, r *http.Request) {
	sid := r.PathValue("id")
	if subjects.ValidateSnapshotName(sid) != nil {
		writeError(w, http.StatusNotFound, "snapshot not found")
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), shortWait)
	defer cancel()
	rec, err := s.api.GetSnapshot(ctx, sid)
	if err == nil && (rec.Kind != subjects.KindContinuation || internalSnapshot(rec)) {
		err = badRequest("%s is not a snapshot made by createSnapshot: firkin's templates are not deleted through the E2B API", sid)
	}
	if err == nil {
		err = s.api.DeleteSnapshot(ctx, sid)
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) updateNetwork(w http.ResponseWriter, r *http.Request, id string) {
	s.fail(w, r, unsupported("updating a running sandbox's network is not supported by firkin: set it at create"))
}

// metricOf is E2B's metric for a firkin sample.
func metricOf(m subjects.SandboxMetrics, vcpus int) metric {
	cpu := m.GuestCPUPercent
	if cpu < 0 {
		cpu = 0
	}
	return metric{
		Timestamp:     m.At.UTC().Format(time.RFC3339Nano),
		TimestampUnix: m.At.Unix(),
		CPUCount:      vcpus,
		CPUUsedPct:    cpu,
		MemUsed:       m.GuestMemUsed,
		MemTotal:      m.GuestMemTotal,
		DiskUsed:      m.GuestDiskUsed,
		DiskTotal:     m.GuestDiskTotal,
	}
}

func (s *Server) metrics(w http.ResponseWriter, r *http.Request, id string) {
	q := r.URL.Query()
	start, err1 := unixParam(q.Get("start"))
	end, err2 := unixParam(q.Get("end"))
	if err := errors.Join(err1, err2); err != nil {
		s.fail(w, r, err)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), shortWait)
	defer cancel()
	sb, err := s.api.Get(ctx, id)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	out := []metric{}
	if sb.State != subjects.StateRunning { // a paused sandbox has no samples
		writeJSON(w, http.StatusOK, out)
		return
	}
	reply, err := s.api.Metrics(ctx, id)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	for _, m := range reply.History {
		if (!start.IsZero() && m.At.Before(start)) || (!end.IsZero() && m.At.After(end)) {
			continue
		}
		out = append(out, metricOf(m, sb.Resources.VCPUs))
	}
	writeJSON(w, http.StatusOK, out)
}

// maxMetricsIDs bounds GET /sandboxes/metrics.
const maxMetricsIDs = 100

func (s *Server) metricsMany(w http.ResponseWriter, r *http.Request) {
	var ids []string
	for _, v := range r.URL.Query()["sandbox_ids"] {
		for _, id := range strings.Split(v, ",") {
			if id = strings.TrimSpace(id); id != "" {
				ids = append(ids, id)
			}
		}
	}
	if len(ids) == 0 || len(ids) > maxMetricsIDs {
		s.fail(w, r, badRequest("sandbox_ids: want 1..%d ids", maxMetricsIDs))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), shortWait)
	defer cancel()
	out := sandboxesWithMetrics{Sandboxes: map[string]metric{}}
	for _, id := range ids {
		if subjects.ValidateSandboxID(id) != nil {
			continue
		}
		sb, err := s.api.Get(ctx, id)
		if err != nil || sb.State != subjects.StateRunning {
			continue
		}
		reply, err := s.api.Metrics(ctx, id)
		if err != nil || reply.Latest == nil {
			continue
		}
		out.Sandboxes[id] = metricOf(*reply.Latest, sb.Resources.VCPUs)
	}
	writeJSON(w, http.StatusOK, out)
}

func unixParam(v string) (time.Time, error) {
	if v == "" {
		return time.Time{}, nil
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n < 0 || n > 1<<40 {
		return time.Time{}, badRequest("%.32q: want Unix seconds", v)
	}
	return time.Unix(n, 0), nil
}

// pageLimit parses a page's limit: 1..1000, default 100.
func pageLimit(v string) (int, error) {
	if v == "" {
		return subjects.DefaultListLimit, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 || n > subjects.MaxListLimit {
		return 0, badRequest("limit %.32q: want 1..%d", v, subjects.MaxListLimit)
	}
	return n, nil
}

// parseMetadataQuery reads E2B's metadata filter: a query string
// ("user=abc&app=prod") whose keys and values are URL encoded once more.
func parseMetadataQuery(v string) (map[string]string, error) {
	if v == "" {
		return nil, nil
	}
	if len(v) > 8<<10 {
		return nil, badRequest("metadata filter over 8 KiB")
	}
	vals, err := url.ParseQuery(v)
	if err != nil {
		return nil, badRequest("metadata filter: %v", err)
	}
	out := map[string]string{}
	for k, vs := range vals {
		key, err1 := url.PathUnescape(k)
		val, err2 := url.PathUnescape(vs[len(vs)-1])
		if err := errors.Join(err1, err2); err != nil {
			return nil, badRequest("metadata filter: %v", err)
		}
		out[key] = val
	}
	return out, nil
}

// listQuery is a list request's filters.
type listQuery struct {
	firkin       subjects.ListSandboxesRequest
	states       map[string]bool // kept E2B states
	template     string
	startedAfter time.Time
	desc         bool
}

func (s *Server) parseListQuery(q url.Values, v2 bool) (listQuery, error) {
	lq := listQuery{states: map[string]bool{subjects.StateRunning: true}, desc: true}
	md, err := parseMetadataQuery(q.Get("metadata"))
	if err != nil {
		return lq, err
	}
	lq.firkin.Metadata = md
	if !v2 {
		lq.firkin.State = subjects.StateRunning
		lq.firkin.Limit = subjects.MaxListLimit
		return lq, lq.validate()
	}
	lq.states = map[string]bool{}
	for _, v := range q["state"] {
		for _, st := range strings.Split(v, ",") {
			if e2bState(st) == "" {
				return lq, badRequest("state %.32q: want running or paused", st)
			}
			lq.states[st] = true
		}
	}
	if len(lq.states) == 0 {
		lq.states = map[string]bool{subjects.StateRunning: true, subjects.StatePaused: true}
	}
	if len(lq.states) == 1 {
		for st := range lq.states {
			lq.firkin.State = st
		}
	}
	if lq.firkin.Limit, err = pageLimit(q.Get("limit")); err != nil {
		return lq, err
	}
	if next := q.Get("nextToken"); next != "" {
		if subjects.ValidateSandboxID(next) != nil {
			return lq, badRequest("nextToken: not a token of this list")
		}
		lq.firkin.Cursor = next
	}
	if t := q.Get("startedAfter"); t != "" {
		if lq.startedAfter, err = time.Parse(time.RFC3339Nano, t); err != nil {
			return lq, badRequest("startedAfter %.40q: want RFC 3339", t)
		}
	}
	lq.template = q.Get("template")
	switch q.Get("order") {
	case "", "desc":
	case "asc":
		lq.desc = false
	default:
		return lq, badRequest("order: want asc or desc")
	}
	return lq, lq.validate()
}

func (lq *listQuery) validate() error {
	if err := lq.firkin.Validate(); err != nil {
		return badRequest("%v", err)
	}
	return nil
}

// keep applies the filters firkin's list has not.
func (s *Server) keep(lq listQuery, sb subjects.Sandbox) bool {
	if !lq.states[sb.State] {
		return false
	}
	if !lq.startedAfter.IsZero() && sb.StartedAt.Before(lq.startedAfter) {
		return false
	}
	if lq.template != "" && lq.template != s.e2bTemplate(sb) && lq.template != sb.TemplateID {
		return false
	}
	return true
}

// listV2 is GET /v2/sandboxes: one page, in start time order within the
// page (firkin pages by sandbox id), the next page's token in X-Next-Token.
func (s *Server) listV2(w http.ResponseWriter, r *http.Request) {
	lq, err := s.parseListQuery(r.URL.Query(), true)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), shortWait)
	defer cancel()
	page, err := s.api.ListPage(ctx, lq.firkin)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	out := s.listed(lq, page.Sandboxes)
	if page.NextCursor != "" {
		w.Header().Set("X-Next-Token", page.NextCursor)
	}
	writeJSON(w, http.StatusOK, out)
}

// maxListV1Pages bounds GET /sandboxes, which has no pagination.
const maxListV1Pages = 10

// listV1 is the deprecated GET /sandboxes: every running sandbox (up to
// 10 000).
func (s *Server) listV1(w http.ResponseWriter, r *http.Request) {
	lq, err := s.parseListQuery(r.URL.Query(), false)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), shortWait)
	defer cancel()
	var all []subjects.Sandbox
	for range maxListV1Pages {
		page, err := s.api.ListPage(ctx, lq.firkin)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		all = append(all, page.Sandboxes...)
		if page.NextCursor == "" {
			break
		}
		lq.firkin.Cursor = page.NextCursor
	}
	writeJSON(w, http.StatusOK, s.listed(lq, all))
}

func (s *Server) listed(lq listQuery, list []subjects.Sandbox) []sandboxDetail {
	kept := make([]subjects.Sandbox, 0, len(list))
	for _, sb := range list {
		if s.keep(lq, sb) {
			kept = append(kept, sb)
		}
	}
	sort.SliceStable(kept, func(i, j int) bool {
		if lq.desc {
			return kept[i].StartedAt.After(kept[j].StartedAt)
		}
		return kept[i].StartedAt.Before(kept[j].StartedAt)
	})
	out := make([]sandboxDetail, 0, len(kept))
	for _, sb := range kept {
		out = append(out, s.detail(sb, false))
	}
	return out
}
