package lowprio

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// niceOf reads the nice value of thread tid of this process.
func niceOf(t *testing.T, tid int) (int, bool) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/self/task/%d/stat", tid))
	if err != nil {
		return 0, false
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	var nice int
	fmt.Sscan(f[16], &nice) // field 19 of stat, counted after the command
	return nice, true
}

// TestThread: the calling goroutine's thread gets nice 19 until done, the
// test's own thread keeps its priority, and the thread lives on after its
// goroutine with the priority it had (a thread that ended would signal the
// children started from it).
func TestThread(t *testing.T) {
	runtime.LockOSThread() // so that this goroutine's thread stays its own
	defer runtime.UnlockOSThread()
	mine := unix.Gettid()
	before, _ := niceOf(t, mine)
	tid := make(chan int)
	release := make(chan struct{})
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		done := Thread()
		defer done()
		tid <- unix.Gettid()
		<-release
	}()
	bg := <-tid
	if n, ok := niceOf(t, bg); !ok || n != Nice {
		t.Errorf("background thread nice = %d (%v), want %d", n, ok, Nice)
	}
	close(release)
	if n, _ := niceOf(t, mine); n != before {
		t.Errorf("the caller's thread nice changed: %d -> %d", before, n)
	}
	<-ended
	time.Sleep(50 * time.Millisecond) // room for Go to end the thread, if it did
	if n, ok := niceOf(t, bg); !ok || n != before {
		t.Errorf("after done the thread is alive %v with nice %d, want alive with %d", ok, n, before)
	}
}
