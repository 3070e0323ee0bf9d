// Package lowprio runs background work in the worker process at the
// lowest CPU priority, so that it yields to the work requests wait for.
package lowprio

// Nice is the priority background threads get (the lowest).
const Nice = 19
