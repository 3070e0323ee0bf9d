package backend

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/firkin-dev/firkin-worker/agent"
	"github.com/firkin-dev/firkin-worker/internal/socketpair"
	"github.com/firkin-dev/firkin-worker/subjects"
	"github.com/firkin-dev/firkin-worker/vmpool"
)

// hostileAgentMachine is a machine whose guest agent was replaced: every
// proc_list names MaxProcs processes it never named before, and it keeps
// their proc_wait streams open for good.
type hostileAgentMachine struct {
	vmpool.Machine
	c    *agent.Client
	done chan struct{}
	dir  string
}

func (m *hostileAgentMachine) Agent() (*agent.Client, error) { return m.c, nil }
func (m *hostileAgentMachine) Done() <-chan struct{}         { return m.done }
func (m *hostileAgentMachine) Dir() string                   { return m.dir }

type discardLogs struct{}

func (discardLogs) Publish(subjects.LogEvent)   {}
func (discardLogs) Flush(context.Context) error { return nil }

type logsOnlyStore struct{ Store }

func (logsOnlyStore) Logs(string) LogWriter { return discardLogs{} }

func writeTestFrame(w io.Writer, typ byte, payload []byte) error {
	hdr := make([]byte, 5, 5+len(payload))
	hdr[0] = typ
	binary.BigEndian.PutUint32(hdr[1:], uint32(len(payload)))
	_, err := w.Write(append(hdr, payload...))
	return err
}

func startHostileAgent(t *testing.T) *agent.Client {
	host, guest := socketpair.New(t)
	var next, stats atomic.Int64
	go func() {
		r := bufio.NewReader(guest)
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		nonce := strings.TrimSpace(strings.TrimPrefix(line, "FIRKIN/1 HELLO "))
		if _, err := io.WriteString(guest, "FIRKIN/1 READY "+nonce+"\n"); err != nil {
			return
		}
		cfg := yamux.DefaultConfig()
		cfg.EnableKeepAlive = false
		cfg.LogOutput = io.Discard
		sess, err := yamux.Server(guest, cfg)
		if err != nil {
			return
		}
		defer sess.Close()
		for {
			st, err := sess.AcceptStream()
			if err != nil {
				return
			}
			go func() {
				defer st.Close()
				var hdr [5]byte
				if _, err := io.ReadFull(st, hdr[:]); err != nil {
					return
				}
				body := make([]byte, binary.BigEndian.Uint32(hdr[1:]))
				if _, err := io.ReadFull(st, body); err != nil {
					return
				}
				var req struct {
					Op string `json:"op"`
				}
				_ = json.Unmarshal(body, &req)
				switch req.Op {
				case "proc_list":
					for range agent.MaxProcs {
						pi := agent.ProcInfo{ID: fmt.Sprintf("p%011d", next.Add(1)), PID: 1, Command: "x", StartedAt: time.Now(), Running: true}
						b, _ := json.Marshal(pi)
						if writeTestFrame(st, 'D', b) != nil {
							return
						}
					}
					_ = writeTestFrame(st, 'O', nil)
				case "stats":
					// Busy ticks that grow faster than all ticks.
					gs := agent.GuestStats{CPUBusy: 0, CPUTotal: 1_000_000_000, MemTotal: 1, MemAvailable: 1}
					if stats.Add(1) > 1 {
						gs.CPUBusy, gs.CPUTotal = 1_000_000_001, 1_000_000_001
					}
					b, _ := json.Marshal(gs)
					_ = writeTestFrame(st, 'O', b)
				case "proc_wait":
					_, _ = io.Copy(io.Discard, st) // never ends the process
				}
			}()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := agent.Connect(ctx, host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// A replaced agent must not grow the host's process table (and its pumps,
// one goroutine and agent stream each) by MaxProcs with every proc.list a
// client sends: the host bounds the processes it follows per sandbox.
func TestRedteamAdoptedProcessesBounded(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	m := &hostileAgentMachine{c: startHostileAgent(t), done: make(chan struct{})}
	b := &Backend{ctx: ctx, log: slog.New(slog.DiscardHandler), cfg: Config{Store: logsOnlyStore{}},
		sessions: map[string]*session{"sb1": {machine: m}}}
	t.Cleanup(func() { b.endProcs("sb1") })
	var last int
	for range 5 {
		r, err := b.ListProcesses(ctx, "sb1")
		if err != nil {
			t.Fatal(err)
		}
		last = len(r.Processes)
	}
	if last > agent.MaxProcs {
		t.Fatalf("the host follows %d processes of one sandbox after 5 lists, want at most %d", last, agent.MaxProcs)
	}
}

// Guest CPU counters are the guest's word: a replaced agent whose busy
// ticks grow faster than its total ticks must not report more than 100%.
func TestRedteamGuestCPUPercentBounded(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	m := &hostileAgentMachine{c: startHostileAgent(t), done: make(chan struct{}), dir: t.TempDir()}
	s := &session{machine: m}
	b := &Backend{ctx: ctx, log: slog.New(slog.DiscardHandler), sessions: map[string]*session{"sb1": s}}
	b.metrics.cfg.Keep = 10
	b.metrics.rings, b.metrics.prev = map[string][]subjects.SandboxMetrics{}, map[string]counters{}
	b.sample(ctx, "sb1", s)
	time.Sleep(10 * time.Millisecond)
	got := b.sample(ctx, "sb1", s)
	if got.Error != "" {
		t.Fatal(got.Error)
	}
	if got.GuestCPUPercent < 0 || got.GuestCPUPercent > 100 {
		t.Fatalf("guest CPU %.0f%% from a lying guest, want 0..100", got.GuestCPUPercent)
	}
}
