package backend

import (
	"context"
	"log/slog"
)

// undoStack collects the steps that undo what an operation made, so a later
// failure can undo them in reverse order. A failed undo is logged; the
// operation's first error is what the caller reports.
type undoStack struct {
	steps []undoStep
}

type undoStep struct {
	name string
	fn   func(context.Context) error
}

func (u *undoStack) push(name string, fn func(context.Context) error) {
	u.steps = append(u.steps, undoStep{name, fn})
}

func (u *undoStack) run(ctx context.Context, log *slog.Logger) {
	for i := len(u.steps) - 1; i >= 0; i-- {
		if err := u.steps[i].fn(ctx); err != nil {
			log.Warn("undo failed", "step", u.steps[i].name, "err", err)
		}
	}
	u.steps = nil
}
