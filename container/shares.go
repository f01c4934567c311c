package container

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/rund-dev/rund/internal/shimapi"
	"github.com/rund-dev/rund/vm"
)

// shareFunc shares host directory dir with the guest (read-only or not) and
// returns its tag and the guest filesystem type that mounts it.
type shareFunc func(dir string, readonly bool) (tag, fsType string, err error)

// shareSet collects the host directories a sandbox shares with its guest:
// 9p with QEMU, virtio-fs with Cloud Hypervisor. A directory shared twice
// the same way is one share.
type shareSet struct {
	max    int
	fsType string
	// noShares, when set, says why the guest cannot mount a share.
	noShares string
	list     []vm.Share
}

// shareClass is the number of 9p devices a sandbox sharing n directories
// gets: 0, or the smallest power of two that holds n (at most max). Each
// class has its own template, so sandboxes without volumes carry no 9p
// device (each costs QEMU about 1.2 MiB), and a few classes serve all.
func shareClass(n, max int) int {
	if n == 0 {
		return 0
	}
	c := 1
	for c < n {
		c *= 2
	}
	return min(c, max)
}

// newShareSet collects the shares of a sandbox on hypervisor whose guest
// runs the guestKernel flavour ("rund" or "cloud").
func newShareSet(max int, hypervisor, guestKernel string) *shareSet {
	s := &shareSet{max: max, fsType: "9p"}
	if guestKernel == "cloud" {
		s.noShares = "sharing host directories (volumes, rund.rootfs=shared) needs 9p in the guest: Debian's cloud kernel has none; build rund's kernel (make kernel) or set guest_kernel = \"rund\""
	}
	if hypervisor == "cloud-hypervisor" {
		s.fsType = "virtiofs"
	}
	return s
}

func (s *shareSet) add(dir string, readonly bool) (string, string, error) {
	if s.noShares != "" {
		return "", "", errors.New(s.noShares)
	}
	// The canonical path: QEMU opens it later, and one directory reached
	// through a symlink is still one share.
	abs, err := filepath.Abs(dir)
	if err == nil {
		abs, err = filepath.EvalSymlinks(abs)
	}
	if err != nil {
		return "", "", fmt.Errorf("shared directory: %w", err)
	}
	fi, err := os.Stat(abs)
	if err != nil {
		return "", "", fmt.Errorf("shared directory: %w", err)
	}
	if !fi.IsDir() {
		return "", "", fmt.Errorf("shared directory %s: not a directory", abs)
	}
	for _, sh := range s.list {
		if sh.Path == abs && sh.ReadOnly == readonly {
			return sh.Tag, s.fsType, nil
		}
	}
	if readonly && s.fsType == "virtiofs" {
		return "", "", fmt.Errorf("sharing %s read-only: Cloud Hypervisor's virtio-fs shares are read-write only (use qemu for read-only volumes)", abs)
	}
	if len(s.list) >= s.max {
		return "", "", fmt.Errorf("sharing %s: the sandbox already shares %d host directories, the most the config allows (shares = %d)", abs, len(s.list), s.max)
	}
	sh := vm.Share{Tag: shimapi.ShareTag(len(s.list)), Path: abs, ReadOnly: readonly}
	s.list = append(s.list, sh)
	return sh.Tag, s.fsType, nil
}
