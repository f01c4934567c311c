package container

import (
	"context"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/rund-dev/rund/internal/cleanup"
	"github.com/rund-dev/rund/internal/shimapi"
)

// prepareCgroup takes the container's cgroup and records it in st and l.
func prepareCgroup(ctx context.Context, o CreateOptions, s *specs.Spec, st *State, l *shimapi.Launch, undo *cleanup.Stack) error {
	return nil
}

// releaseCgroup returns the container's cgroup.
func releaseCgroup(ctx context.Context, o Options, st *State) error {
	return nil
}
