package api

// The wire types of E2B's REST control API (spec/openapi.yml of
// e2b-dev/E2B, as the JavaScript SDK e2b 2.51.0 sends and reads them).

// apiError is E2B's error body.
type apiError struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
}

// networkConfig is E2B's SandboxNetworkConfig (and the update's).
type networkConfig struct {
	AllowOut           []string `json:"allowOut,omitempty"`
	DenyOut            []string `json:"denyOut,omitempty"`
	AllowPublicTraffic *bool    `json:"allowPublicTraffic,omitempty"`
	// Not supported by firkin: a request that sets any is refused.
	EgressProxy     any    `json:"egressProxy,omitempty"`
	MaskRequestHost string `json:"maskRequestHost,omitempty"`
	HTTPSPorts      []int  `json:"httpsPorts,omitempty"`
	Rules           any    `json:"rules,omitempty"`
}

// autoResumeConfig is E2B's SandboxAutoResumeConfig.
type autoResumeConfig struct {
	Enabled bool `json:"enabled"`
}

// newSandbox is E2B's NewSandbox / NewSandboxV2.
type newSandbox struct {
	TemplateID          string            `json:"templateID"`
	Timeout             *int              `json:"timeout,omitempty"`
	Metadata            map[string]string `json:"metadata,omitempty"`
	EnvVars             map[string]string `json:"envVars,omitempty"`
	Secure              *bool             `json:"secure,omitempty"`
	AutoPause           *bool             `json:"autoPause,omitempty"`
	AutoPauseMemory     *bool             `json:"autoPauseMemory,omitempty"`
	AutoResume          *autoResumeConfig `json:"autoResume,omitempty"`
	AllowInternetAccess *bool             `json:"allow_internet_access,omitempty"`
	Network             *networkConfig    `json:"network,omitempty"`
	// Not supported by firkin: a request that sets any is refused.
	MCP          any   `json:"mcp,omitempty"`
	IAM          any   `json:"iam,omitempty"`
	VolumeMounts []any `json:"volumeMounts,omitempty"`
}

// sandbox is E2B's Sandbox: the reply of create, connect, resume and each
// fork.
type sandbox struct {
	SandboxID          string  `json:"sandboxID"`
	TemplateID         string  `json:"templateID"`
	Alias              string  `json:"alias,omitempty"`
	ClientID           string  `json:"clientID"`
	EnvdVersion        string  `json:"envdVersion"`
	EnvdAccessToken    string  `json:"envdAccessToken,omitempty"`
	TrafficAccessToken *string `json:"trafficAccessToken"`
	Domain             *string `json:"domain"`
}

// lifecycle is E2B's SandboxLifecycle.
type lifecycle struct {
	AutoResume bool   `json:"autoResume"`
	OnTimeout  string `json:"onTimeout"`
}

// sandboxDetail is E2B's SandboxDetail (get) and, without the detail
// fields, ListedSandbox (list).
type sandboxDetail struct {
	SandboxID           string            `json:"sandboxID"`
	TemplateID          string            `json:"templateID"`
	Alias               string            `json:"alias,omitempty"`
	ClientID            string            `json:"clientID"`
	CPUCount            int               `json:"cpuCount"`
	MemoryMB            int               `json:"memoryMB"`
	DiskSizeMB          int               `json:"diskSizeMB"`
	StartedAt           string            `json:"startedAt"`
	EndAt               string            `json:"endAt"`
	State               string            `json:"state"`
	EnvdVersion         string            `json:"envdVersion"`
	Metadata            map[string]string `json:"metadata,omitempty"`
	VolumeMounts        []any             `json:"volumeMounts"`
	Domain              *string           `json:"domain,omitempty"`
	EnvdAccessToken     string            `json:"envdAccessToken,omitempty"`
	AllowInternetAccess *bool             `json:"allowInternetAccess,omitempty"`
	Network             *networkConfig    `json:"network,omitempty"`
	Lifecycle           *lifecycle        `json:"lifecycle,omitempty"`
}

// timeoutRequest is E2B's SandboxTimeoutRequest, ConnectSandbox and
// ResumedSandbox (the fields firkin uses).
type timeoutRequest struct {
	Timeout *int  `json:"timeout,omitempty"`
	Memory  *bool `json:"memory,omitempty"`
	// AutoPause is ResumedSandbox's (deprecated): ignored.
	AutoPause *bool `json:"autoPause,omitempty"`
}

// refreshRequest is E2B's SandboxRefreshRequest.
type refreshRequest struct {
	Duration *int `json:"duration,omitempty"`
}

// forkRequest is E2B's SandboxForkRequest.
type forkRequest struct {
	Count   *int `json:"count,omitempty"`
	Timeout *int `json:"timeout,omitempty"`
}

// forkResult is E2B's SandboxForkResult.
type forkResult struct {
	Sandbox *sandbox  `json:"sandbox,omitempty"`
	Error   *apiError `json:"error,omitempty"`
}

// snapshotRequest is E2B's SandboxSnapshotRequest.
type snapshotRequest struct {
	Name string `json:"name,omitempty"`
}

// snapshotInfo is E2B's SnapshotInfo.
type snapshotInfo struct {
	SnapshotID string   `json:"snapshotID"`
	Names      []string `json:"names"`
}

// metric is E2B's SandboxMetric.
type metric struct {
	Timestamp     string  `json:"timestamp"`
	TimestampUnix int64   `json:"timestampUnix"`
	CPUCount      int     `json:"cpuCount"`
	CPUUsedPct    float64 `json:"cpuUsedPct"`
	MemUsed       uint64  `json:"memUsed"`
	MemTotal      uint64  `json:"memTotal"`
	MemCache      uint64  `json:"memCache"`
	DiskUsed      uint64  `json:"diskUsed"`
	DiskTotal     uint64  `json:"diskTotal"`
}

// sandboxesWithMetrics is E2B's SandboxesWithMetrics.
type sandboxesWithMetrics struct {
	Sandboxes map[string]metric `json:"sandboxes"`
}
