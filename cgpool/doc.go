// Package cgpool keeps a pool of pre-created cgroups that sandboxes take by
// rename instead of creating and destroying their own (RunD's third insight:
// cgroup mkdir/rmdir serialise on kernel-wide locks, a rename is cheap).
//
// A pool belongs to one parent cgroup. Its slots are directories named
// rund-slot-<id> under that parent, in every cgroup v1 hierarchy of the pool
// or once in the cgroup v2 tree. An on-disk record (one fixed-size,
// checksummed line per slot, rewritten in place under flock) says which slot
// is idle or busy, under which name, and which process — pid plus start
// time — holds it.
//
// Acquire takes an idle slot in one short critical section (preferring one
// whose last lease had the same limits, so that nothing need be written),
// then, outside the lock, renames it to the container's cgroup name and
// writes the limits that differ. On v1 the rename happens in the
// hierarchies where a container's limits and usage are looked up by its
// cgroupsPath (memory, cpu, cpuacct, pids: NamedControllers), all or none;
// in the pool's other hierarchies (cpuset) the lease stays in the slot's
// directory, as every lease does on v2, and Lease.Paths says where.
//
// Release holds the slot line's OFD lock (which dies with its process) while
// it kills what is left in the slot, renames it back and marks it idle: the
// only write to the record is that last one, and the lock keeps the next
// Acquire from reclaiming the slot meanwhile. The limits stay on the idle
// slot (lazy reset); the record keeps them for the next Acquire to overwrite.
// A slot whose holder died is reclaimed by an Acquire that comes by; a
// record that fails its checksums is rebuilt from the cgroup tree.
//
// Cgroup v2 cannot rename a cgroup (the kernel has no rename operation for
// cgroup2 directories; rename(2) returns EPERM), so on v2 a lease keeps the
// slot's own directory name, with the lease's name in an xattr.
package cgpool
