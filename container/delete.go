package container

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
)

// Delete destroys a container and releases everything it took. A running
// (or paused) container is refused unless force; force also cleans up after
// a shim or VMM that died, and succeeds for an unknown id (runc's rules).
func Delete(ctx context.Context, o Options, id string, force bool) error {
	l, err := lock(ctx, o.Root, id)
	if err != nil {
		if force && errors.Is(err, ErrNotExist) {
			return nil
		}
		return err
	}
	defer l.Release()
	st, err := Load(o.Root, id)
	if err != nil {
		if errors.Is(err, ErrNotExist) && force {
			// A half-made directory (crash during create): remove it.
			return removeState(o.Root, id)
		}
		if errors.Is(err, ErrNotExist) {
			return err
		}
		if !force {
			return err
		}
		logrus.Warnf("deleting %s with unreadable state: %v", id, err)
		return removeState(o.Root, id)
	}
	switch s := st.Refresh(); s {
	case Stopped, Created, Creating:
		if s == Creating && !force {
			return fmt.Errorf("container %s is being created", id)
		}
	default:
		if !force {
			return fmt.Errorf("%s: %w", id, ErrRunning)
		}
	}
	destroy(ctx, o, st)
	return nil
}

// destroy kills the shim and the VMM (checking they are still the recorded
// processes), then releases the cgroup and removes the state.
func destroy(ctx context.Context, o Options, st *State) {
	for _, p := range []Proc{st.Shim, st.VMM} {
		if p.Alive() {
			p.Signal(syscall.SIGKILL)
		}
	}
	for _, p := range []Proc{st.Shim, st.VMM} {
		waitGone(&p, 10*time.Second)
	}
	if err := releaseCgroup(ctx, o, st); err != nil {
		logrus.Warnf("releasing cgroup of %s: %v", st.ID, err)
	}
	if err := removeState(o.Root, st.ID); err != nil {
		logrus.Warnf("removing state of %s: %v", st.ID, err)
	}
}

func removeState(root, id string) error {
	os.RemoveAll(vmDirOf(root, id))
	if err := os.RemoveAll(dirOf(root, id)); err != nil {
		return fmt.Errorf("removing state of %s: %w", id, err)
	}
	return nil
}
