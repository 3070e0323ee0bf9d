package worker

import (
	"fmt"
	"strings"

	"github.com/nats-io/nats.go"

	"github.com/firkin-dev/firkin-worker/backend"
	"github.com/firkin-dev/firkin-worker/errdefs"
	"github.com/firkin-dev/firkin-worker/handlers"
	"github.com/firkin-dev/firkin-worker/subjects"
)

// livePublisher sends live process output: on <prefix>.proc.> through the
// store connection (allowed to publish there), on a client inbox through
// the service connection (which publishes only into inboxes). Any other
// subject is refused, whatever the caller checked.
type livePublisher struct {
	store, service *nats.Conn
	procPrefix     string
	inbox          func(subject string) bool
}

var _ backend.LivePublisher = livePublisher{}

func newLivePublisher(store, service *nats.Conn, subj subjects.Subjects, inbox func(string) bool) livePublisher {
	return livePublisher{store: store, service: service, procPrefix: subj.Prefix + ".proc.", inbox: inbox}
}

// PublishLive publishes one message without waiting: a slow reader costs
// it nothing (the server drops for slow consumers; the log stream has
// everything).
func (l livePublisher) PublishLive(subject string, header map[string][]string, data []byte) error {
	m := &nats.Msg{Subject: subject, Header: nats.Header(header), Data: data}
	switch {
	case strings.HasPrefix(subject, l.procPrefix) && !strings.ContainsAny(subject, "*> "):
		return l.store.PublishMsg(m)
	case l.inbox != nil && l.inbox(subject):
		return l.service.PublishMsg(m)
	}
	return errdefs.Wrap(errdefs.ErrInvalidArgument, fmt.Errorf("live output subject %q is neither a process subject nor a client inbox", subject))
}

// The runtime runs processes (handlers find them by type assertion).
var _ handlers.Processes = (*runtimeFacade)(nil)
