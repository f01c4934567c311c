package container

import "errors"

// Sentinel errors. Their text is what runc prints; podman, conmon and CRI-O
// match on it.
var (
	ErrExist      = errors.New("container with given ID already exists")
	ErrNotExist   = errors.New("container does not exist")
	ErrNotRunning = errors.New("container not running")
	ErrRunning    = errors.New("container still running")
	ErrPaused     = errors.New("container paused")
	ErrInvalidID  = errors.New("invalid container id")
)
