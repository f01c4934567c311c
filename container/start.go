package container

import (
	"context"
	"fmt"

	"github.com/rund-dev/rund/internal/shimapi"
)

// Start runs the user's process of a created container (runtime-spec:
// start is only valid in the created state).
func Start(ctx context.Context, root, id string) error {
	l, err := lock(ctx, root, id)
	if err != nil {
		return err
	}
	defer l.Release()
	st, err := Load(root, id)
	if err != nil {
		return err
	}
	switch s := st.Refresh(); s {
	case Created:
	case Stopped:
		return fmt.Errorf("cannot start a container that has stopped")
	default:
		return fmt.Errorf("cannot start a container in the %s state", s)
	}
	if _, err := callShim(ctx, root, id, shimapi.Request{Op: shimapi.OpStart}); err != nil {
		return fmt.Errorf("starting container %s: %w", id, err)
	}
	st.Status = Running
	return st.saveLocked(root)
}
