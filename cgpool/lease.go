package cgpool

import (
	"fmt"
	"maps"

	"github.com/opencontainers/cgroups"
)

// Lease is a slot held under a container's cgroup name.
type Lease struct {
	pool  *Pool
	id    int
	name  string
	paths map[string]string
}

func (p *Pool) lease(s slot) *Lease {
	return &Lease{pool: p, id: s.id, name: s.name, paths: p.pathsFor(s)}
}

// Name returns the cgroup name the lease was taken under.
func (l *Lease) Name() string { return l.name }

// Slot returns the id of the slot behind the lease.
func (l *Lease) Slot() int { return l.id }

// Paths returns the lease's cgroup directory per controller, as runc keys
// them ("cpu", "memory", "name=systemd", ...; "" alone on cgroup v2).
func (l *Lease) Paths() map[string]string { return maps.Clone(l.paths) }

// AddProcess moves pid into the lease's cgroup in every hierarchy. Start
// the VMM first and add it afterwards: creating a VM inside a v1 cgroup
// costs more than moving it in.
func (l *Lease) AddProcess(pid int) error {
	done := map[string]bool{}
	for _, d := range l.paths {
		if done[d] {
			continue
		}
		done[d] = true
		if err := cgroups.WriteCgroupProc(d, pid); err != nil {
			return fmt.Errorf("adding process %d to cgroup %q: %w", pid, l.name, err)
		}
	}
	return nil
}

// SetOwner hands the lease to another process, e.g. from rund create to
// the shim: the lease then lives as long as that process.
func (l *Lease) SetOwner(pid int) error {
	o, err := ownerOf(pid)
	if err != nil {
		return fmt.Errorf("moving cgroup %q: %w", l.name, err)
	}
	return l.pool.withLock(func(slots []slot) error {
		if l.id >= len(slots) || slots[l.id].name != l.name || slots[l.id].state != stateBusy {
			return fmt.Errorf("moving cgroup %q: %w", l.name, ErrNotExist)
		}
		s := slots[l.id]
		s.owner = o
		return l.pool.rec.writeSlotLocked(s)
	})
}

// Release returns the lease to its pool (Pool.Release).
func (l *Lease) Release() error { return l.pool.Release(l.name) }
