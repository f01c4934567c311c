package guest

import (
	"fmt"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// steps records how long each step of a request took, for the host's debug
// log (a clone runs every code path for the first time under TCG, so where
// the time goes is worth seeing on every request).
type steps struct {
	start, last time.Time
	parts       []string
}

func newSteps() *steps {
	now := time.Now()
	return &steps{start: now, last: now}
}

// mark ends the current step and names it.
func (s *steps) mark(name string) {
	now := time.Now()
	s.parts = append(s.parts, fmt.Sprintf("%s %v", name, roundMs(now.Sub(s.last))))
	s.last = now
}

// note adds a remark that is not a step.
func (s *steps) note(format string, args ...any) {
	s.parts = append(s.parts, fmt.Sprintf(format, args...))
}

// String is the total and every step.
func (s *steps) String() string {
	total := roundMs(time.Since(s.start)).String()
	if len(s.parts) == 0 {
		return total
	}
	return fmt.Sprintf("%s (%s)", total, strings.Join(s.parts, ", "))
}

// roundMs rounds d to a tenth of a millisecond.
func roundMs(d time.Duration) time.Duration { return d.Round(100 * time.Microsecond) }

// monoNow is CLOCK_MONOTONIC in nanoseconds: one clock for every process of
// the VM, so the agent can place a helper's steps on its own timeline.
func monoNow() int64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano()
}
