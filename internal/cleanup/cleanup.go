// Package cleanup is a stack of undo steps for partial work: push an undo
// after each step, Run them all in reverse on failure, Release on success.
package cleanup

// Stack holds undo functions.
type Stack struct {
	fns []func()
}

// Add pushes an undo step.
func (s *Stack) Add(fn func()) { s.fns = append(s.fns, fn) }

// Run undoes every step, last first, and empties the stack.
func (s *Stack) Run() {
	for i := len(s.fns) - 1; i >= 0; i-- {
		s.fns[i]()
	}
	s.fns = nil
}

// Release forgets the undo steps: the work is kept.
func (s *Stack) Release() { s.fns = nil }
