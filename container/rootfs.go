package container

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/rund-dev/rund/internal/cleanup"
	"github.com/rund-dev/rund/internal/config"
	"github.com/rund-dev/rund/internal/shimapi"
)

// prepareRootfs builds the container's root layers and records them in l.
// It returns files the shim must inherit (the writable layer).
func prepareRootfs(ctx context.Context, cfg config.Config, s *specs.Spec, st *State, l *shimapi.Launch, undo *cleanup.Stack) ([]*os.File, error) {
	img := filepath.Join(l.StateDir, "rootfs.erofs")
	out, err := exec.CommandContext(ctx, "mkfs.erofs", img, st.Rootfs).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("building rootfs image of %s: %w: %s", st.Rootfs, err, out)
	}
	l.RootImage = img
	l.Create.Root.Lower = "/dev/vda"
	l.Create.Root.LowerType = "erofs"
	return nil, nil
}
