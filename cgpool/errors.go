package cgpool

import "errors"

var (
	// ErrExist is returned by Acquire when the name is already leased, or
	// when a cgroup of that name already exists under the parent.
	ErrExist = errors.New("cgroup already exists")
	// ErrNotExist is returned when a name holds no lease, or when a pool has
	// no record.
	ErrNotExist = errors.New("no such lease")
	// ErrCorrupt marks a pool record that failed its checks; Open and
	// Acquire rebuild such a record from the cgroup tree instead.
	ErrCorrupt = errors.New("corrupt pool record")
	// ErrBusy is returned by Destroy when slots are still leased.
	ErrBusy = errors.New("pool has busy slots")
	// ErrControllers is returned by Open when the pool's record was made
	// for another set of cgroup v1 controllers than Options.Controllers.
	ErrControllers = errors.New("pool made for other controllers")
	// ErrInvalidName is returned for a cgroup name that cannot be a single
	// directory name in the record.
	ErrInvalidName = errors.New("invalid cgroup name")
)
