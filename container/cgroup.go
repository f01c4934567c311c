package container

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/rund-dev/rund/cgpool"
	"github.com/rund-dev/rund/internal/cleanup"
	"github.com/rund-dev/rund/internal/shimapi"
)

// vmmOverhead is what a sandbox's host cgroup holds beyond the guest's
// memory: the VMM's own heap, the translation cache, the shim.
const vmmOverhead = 128 << 20

// prepareCgroup takes the container's cgroup from the pool of its parent
// (linux.cgroupsPath) with the spec's resources applied, and tells the shim
// to put itself and the VMM in it. It returns the function that makes the
// shim the lease's owner: a lease whose owner is dead is reclaimed (and what
// runs in it killed) by the next acquire, and create exits right after. The
// pool stays open until then, so a background refill overlaps the boot.
func prepareCgroup(ctx context.Context, o CreateOptions, s *specs.Spec, st *State, l *shimapi.Launch, undo *cleanup.Stack) (func(shimPid int) error, error) {
	if o.Config.CgroupPool == "off" {
		return func(int) error { return nil }, nil
	}
	var cgPath string
	var res *specs.LinuxResources
	if s.Linux != nil {
		cgPath, res = s.Linux.CgroupsPath, hostResources(s.Linux.Resources, l.MemoryMiB)
	}
	parent, name, err := cgpool.ResolvePath(cgPath, o.SystemdCgroup, o.ID)
	if err != nil {
		return nil, err
	}
	if cgPath == "" && o.Config.CgroupParent != "" {
		parent = o.Config.CgroupParent
	}
	pool, err := cgpool.Open(cgpool.Options{Parent: parent})
	if err != nil {
		return nil, fmt.Errorf("opening cgroup pool %s: %w", parent, err)
	}
	lease, err := pool.Acquire(ctx, name, 0, res)
	if err != nil {
		pool.Close()
		return nil, fmt.Errorf("acquiring cgroup %s/%s: %w", parent, name, err)
	}
	closePool := sync.OnceFunc(func() { pool.Close() })
	undo.Add(func() { closePool(); releaseLease(parent, name, lease.Slot(), false) })
	st.CgroupParent, st.CgroupName, st.CgroupSlot, st.CgroupPooled = parent, name, lease.Slot(), true
	for _, p := range lease.Paths() {
		l.CgroupProcs = append(l.CgroupProcs, filepath.Join(p, "cgroup.procs"))
	}
	return func(shimPid int) error {
		defer closePool()
		return lease.SetOwner(shimPid)
	}, nil
}

// hostResources maps the spec's resources onto the host cgroup that holds
// the VMM: the memory limit must leave room for the whole guest's memory
// plus the VMM's overhead (the guest enforces the container's own limit by
// having no more memory than that); CPU and pids limits apply as they are.
func hostResources(r *specs.LinuxResources, guestMiB int) *specs.LinuxResources {
	if r == nil {
		return nil
	}
	out := &specs.LinuxResources{CPU: r.CPU, Pids: r.Pids}
	if r.Memory != nil && r.Memory.Limit != nil && *r.Memory.Limit > 0 {
		lim := max(*r.Memory.Limit, int64(guestMiB)<<20) + vmmOverhead
		out.Memory = &specs.LinuxMemory{Limit: &lim}
	}
	return out
}

// releaseCgroup returns the container's cgroup to its pool (killing what is
// left in it).
func releaseCgroup(ctx context.Context, o Options, st *State) error {
	if !st.CgroupPooled {
		return nil
	}
	return releaseLease(st.CgroupParent, st.CgroupName, st.CgroupSlot, true)
}

// releaseLease returns a lease to its pool; lazy leaves its limits for
// the next lease to overwrite, as after a sandbox that ran. After a failed
// create, the release resets and checks the whole slot instead.
func releaseLease(parent, name string, slot int, lazy bool) error {
	pool, err := cgpool.Open(cgpool.Options{Parent: parent, LowWater: -1})
	if err != nil {
		return fmt.Errorf("opening cgroup pool %s: %w", parent, err)
	}
	defer pool.Close()
	pool.Hint(name, slot)
	if !lazy {
		return pool.ReleaseReset(name)
	}
	return pool.Release(name)
}
