// Package cgpool keeps a pool of pre-created cgroups that sandboxes take by
// rename instead of creating and destroying their own (RunD's third insight:
// cgroup mkdir/rmdir serialise on kernel-wide locks, a rename is cheap).
//
// A pool belongs to one parent cgroup. Its slots are directories named
// rund-slot-<id> under that parent, in every cgroup v1 hierarchy or once in
// the cgroup v2 tree. An on-disk record (one fixed-size, checksummed line per
// slot, rewritten in place under flock) says which slot is idle or busy, under
// which name, and which process — pid plus start time — holds it.
//
// Acquire takes an idle slot in one short critical section, then, outside the
// lock, renames it to the container's cgroup name (all hierarchies or none)
// and writes the resources that differ from a fresh cgroup. Release kills
// what is left in the slot, resets what Acquire wrote, renames it back and
// marks it idle. A slot whose holder died is reclaimed by the next Acquire;
// a record that fails its checksums is rebuilt from the cgroup tree, where
// each slot directory carries its id in the trusted.rund.slot xattr.
//
// Cgroup v2 cannot rename a cgroup (the kernel has no rename operation for
// cgroup2 directories; rename(2) returns EPERM), so on v2 a lease keeps the
// slot's own directory name and Lease.Paths says where it is.
package cgpool
