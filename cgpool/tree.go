package cgpool

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/opencontainers/cgroups"
	"github.com/opencontainers/cgroups/fs"
	"golang.org/x/sys/unix"
)

const slotPrefix = "rund-slot-"

func slotName(id int) string { return slotPrefix + strconv.Itoa(id) }

// parseSlotName returns the id of a directory named like a slot.
func parseSlotName(name string) (int, bool) {
	s, ok := strings.CutPrefix(name, slotPrefix)
	if !ok {
		return 0, false
	}
	id, err := strconv.Atoi(s)
	return id, err == nil && id >= 0 && strconv.Itoa(id) == s
}

// pathsFor returns the slot's directories under the parent, keyed like
// runc's cgroup paths (controller name; "" for v2).
func (p *Pool) pathsFor(s slot) map[string]string {
	out := make(map[string]string, len(p.hs)+2)
	for i, h := range p.hs {
		d := p.parents[i] + "/" + p.dirIn(i, s) // a clean parent and one name: no Join
		for _, c := range h.controllers {
			out[c] = d
		}
	}
	return out
}

// dirName is where a leased slot lives in the renamed hierarchies: its
// lease name on v1, its own name on v2, where cgroups cannot be renamed.
func (p *Pool) dirName(s slot) string {
	if p.mode == ModeV2 || s.name == "" {
		return slotName(s.id)
	}
	return s.name
}

// dirIn is the slot's directory name in hierarchy i: dirName where slots
// are renamed, the slot's own name elsewhere.
func (p *Pool) dirIn(i int, s slot) string {
	if !p.hs[i].named {
		return slotName(s.id)
	}
	return p.dirName(s)
}

// makeDir creates one slot directory and makes it joinable: a v1 cpuset
// cgroup needs cpuset.cpus and cpuset.mems before a task may join.
func (p *Pool) makeDir(i int, name string, id int) error {
	d := filepath.Join(p.parents[i], name)
	if err := unix.Mkdir(d, 0o755); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("creating cgroup %s: %w", d, ErrExist)
		}
		return &os.PathError{Op: "mkdir", Path: d, Err: err}
	}
	if h := p.hs[i]; !h.cgroupfs && p.mode == ModeV2 {
		// A plain directory stands in for a cgroup: give it the file
		// cgroupfs would, which the v2 resource code reads.
		if b, err := os.ReadFile(filepath.Join(h.dir, "cgroup.controllers")); err == nil {
			_ = os.WriteFile(filepath.Join(d, "cgroup.controllers"), b, 0o644)
		}
	} else if h.cgroupfs && h.has("cpuset") {
		if err := (&fs.CpusetGroup{}).ApplyDir(d, &cgroups.Resources{}, -1); err != nil {
			_ = unix.Rmdir(d)
			return fmt.Errorf("preparing cpuset of %s: %w", d, err)
		}
	}
	if err := setSlotXattr(d, id); err != nil {
		_ = unix.Rmdir(d)
		return err
	}
	return nil
}

// makeDirs creates the slot's directory in every hierarchy, named as
// dirIn says, all or none.
func (p *Pool) makeDirs(s slot) error {
	for i := range p.hs {
		if err := p.makeDir(i, p.dirIn(i, s), s.id); err != nil {
			for j := i - 1; j >= 0; j-- {
				_ = unix.Rmdir(filepath.Join(p.parents[j], p.dirIn(j, s)))
			}
			return err
		}
	}
	return nil
}

// renameAll renames the slot in every hierarchy where slots are renamed,
// all or none: a failure part-way renames the ones already done back.
func (p *Pool) renameAll(from, to string) error {
	for i, h := range p.hs {
		if !h.named {
			continue
		}
		err := renameAt(p.pfds[i], from, to, h.cgroupfs)
		if err == nil {
			continue
		}
		if errors.Is(err, unix.EEXIST) || errors.Is(err, unix.ENOTEMPTY) {
			err = fmt.Errorf("%w: %w", ErrExist, err)
		}
		var rb []error
		for j := i - 1; j >= 0; j-- {
			if p.hs[j].named {
				rb = append(rb, renameAt(p.pfds[j], to, from, p.hs[j].cgroupfs))
			}
		}
		return errors.Join(append([]error{err}, rb...)...)
	}
	return nil
}

// cleanup returns a slot to the idle shape: its directory exists under its
// slot name in every hierarchy and holds no process and no child cgroup.
// Unless lazy, it also carries a fresh cgroup's resource values; a lazy
// cleanup leaves the lease's values, which the record keeps, for the next
// Acquire to overwrite. The fast path assumes the slot is where the record
// says; when it is not, it copes with any point a holder may have died at:
// directories half renamed, or not yet created.
func (p *Pool) cleanup(s slot, lazy bool) error {
	dirs := make([]string, len(p.hs))
	for i := range p.hs {
		dirs[i] = p.parents[i] + "/" + p.dirIn(i, s)
	}
	err := p.cleanupAt(s, dirs, lazy)
	if err == nil || !errors.Is(err, os.ErrNotExist) {
		return err
	}
	idle := slotName(s.id)
	for i, h := range p.hs {
		dirs[i] = filepath.Join(p.parents[i], idle)
		if s.name != "" && p.mode != ModeV2 {
			// A hierarchy whose slots are not renamed may still hold one
			// under the lease's name if an older rund renamed it there;
			// it is taken back only if it carries this slot's id.
			named := filepath.Join(p.parents[i], s.name)
			if !exists(dirs[i]) && exists(named) && (h.named || slotXattrIs(named, s.id)) {
				dirs[i] = named
			}
		}
		if !exists(dirs[i]) {
			if err := p.makeDir(i, idle, s.id); err != nil {
				return fmt.Errorf("recreating slot %d: %w", s.id, err)
			}
		}
	}
	return p.cleanupAt(s, dirs, lazy)
}

// cleanupAt empties, resets (unless lazy) and renames back the slot found
// at dirs.
func (p *Pool) cleanupAt(s slot, dirs []string, lazy bool) error {
	idle := slotName(s.id)
	for i, d := range dirs {
		// A directory to be renamed back is checked by the rename. A
		// lazy release does not look for one, in a v1 hierarchy whose
		// slots are not renamed, that was removed behind the record's
		// back: the next Acquire remakes it when a write to it fails, a
		// full release (ReleaseReset) here.
		if (!lazy || p.mode == ModeV2 || p.hs[i].named) && filepath.Base(d) == idle && !exists(d) {
			return &os.PathError{Op: "cleanup", Path: d, Err: os.ErrNotExist}
		}
	}
	if err := p.killAll(dirs); err != nil {
		return fmt.Errorf("emptying slot %d: %w", s.id, err)
	}
	if err := p.resetUsage(dirs); err != nil {
		return fmt.Errorf("resetting slot %d: %w", s.id, err)
	}
	if !lazy {
		paths := make(map[string]string, len(dirs))
		for i, h := range p.hs {
			for _, c := range h.controllers {
				paths[c] = dirs[i]
			}
		}
		if err := resetResources(p.mode, paths, s.mask); err != nil {
			return fmt.Errorf("resetting slot %d: %w", s.id, err)
		}
	}
	if p.mode == ModeV2 && s.name != "" {
		clearNameXattr(dirs[0])
	}
	for i, d := range dirs {
		if filepath.Base(d) == idle {
			continue
		}
		if err := renameAt(p.pfds[i], filepath.Base(d), idle, p.hs[i].cgroupfs); err != nil {
			return fmt.Errorf("returning slot %d: %w", s.id, err)
		}
	}
	return nil
}

// resetUsage zeroes the slot's CPU time (cgroup v1 cpuacct.usage), which
// would otherwise carry the last sandbox's into the next one: podman stats
// and the kubelet read a container's CPU time there. cgroup v2 has no way
// to reset cpu.stat, so a v2 lease's CPU time starts where the slot's last
// lease left it (rates are right; totals are not).
func (p *Pool) resetUsage(dirs []string) error {
	if p.mode != ModeV1 {
		return nil
	}
	for i, h := range p.hs {
		if !h.cgroupfs || !h.has("cpuacct") {
			continue
		}
		fd, err := unix.Openat(p.pfds[i], filepath.Base(dirs[i])+"/cpuacct.usage", unix.O_WRONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
		if err != nil {
			return &os.PathError{Op: "open", Path: filepath.Join(dirs[i], "cpuacct.usage"), Err: err}
		}
		_, err = unix.Write(fd, []byte("0"))
		unix.Close(fd)
		if err != nil {
			return &os.PathError{Op: "write", Path: filepath.Join(dirs[i], "cpuacct.usage"), Err: err}
		}
	}
	return nil
}

// killAll SIGKILLs every process in dirs and their child cgroups, waits
// until they have left, and removes the child cgroups.
func (p *Pool) killAll(dirs []string) error {
	deadline := time.Now().Add(p.opts.KillTimeout)
	if p.mode == ModeV2 {
		for _, d := range dirs {
			if err := cgroups.WriteFile(d, "cgroup.kill", "1"); err != nil && !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("killing %s: %w", d, err)
			}
		}
	}
	if p.empty(dirs) {
		return nil
	}
	delay := 200 * time.Microsecond
	for {
		var pids []int
		var children []string
		for i, d := range dirs {
			if !p.hs[i].cgroupfs {
				// A plain directory standing in for a cgroup holds no
				// process; its subdirectories go as a whole.
				if err := removeSubdirs(d); err != nil {
					return err
				}
				continue
			}
			walkProcs(d, &pids, &children)
		}
		if len(pids) == 0 {
			// Deepest first: a cgroup can be removed only without children.
			for i := len(children) - 1; i >= 0; i-- {
				if err := unix.Rmdir(children[i]); err != nil && !errors.Is(err, unix.ENOENT) {
					return &os.PathError{Op: "rmdir", Path: children[i], Err: err}
				}
			}
			return nil
		}
		for _, pid := range pids {
			_ = unix.Kill(pid, unix.SIGKILL)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d processes still running after %v", len(pids), p.opts.KillTimeout)
		}
		time.Sleep(delay)
		delay = min(2*delay, 20*time.Millisecond)
	}
}

// empty is the cheap check that the slot holds no process, so that
// releasing an already stopped sandbox reads no pid list (building one
// costs ~20µs per v1 hierarchy). It looks at one directory: the pids
// hierarchy's on v1, whose pids.current counts the tasks of the whole
// subtree, and the tree's only one on v2, whose cgroup.events says whether
// any process is in it or below. A stat of that directory also catches
// child cgroups (a cgroup's link count is 2 plus its children). Without a
// pids hierarchy it answers false and killAll scans every hierarchy.
//
// A process that a third party moved into only the slot's non-pids
// hierarchies, or a child cgroup made only there, is not seen: rund puts
// the shim and the VMM into every hierarchy of the lease and makes no
// child cgroups on the host. It works relative to the parents' fds: no
// path walk from the root.
func (p *Pool) empty(dirs []string) bool {
	for i, d := range dirs {
		h := p.hs[i]
		file := "cgroup.events"
		if p.mode != ModeV2 {
			if !h.has("pids") {
				continue
			}
			file = "pids.current"
		}
		if !h.cgroupfs {
			return false
		}
		base := filepath.Base(d)
		var st unix.Stat_t
		if err := unix.Fstatat(p.pfds[i], base, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil || st.Nlink > 2 {
			return false // missing, or has child cgroups
		}
		v, ok := readAt(p.pfds[i], base+"/"+file)
		if p.mode == ModeV2 {
			return ok && strings.Contains(v, "populated 0")
		}
		return ok && strings.TrimSpace(v) == "0"
	}
	return false
}

// readAt reads a small control file below the directory dirfd.
func readAt(dirfd int, name string) (string, bool) {
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return "", false
	}
	defer unix.Close(fd)
	var buf [512]byte
	n, err := unix.Read(fd, buf[:])
	if err != nil || n < 0 {
		return "", false
	}
	return string(buf[:n]), true
}

// walkProcs appends the pids in dir and below, and the child cgroups in
// walk order (parents before children).
func walkProcs(dir string, pids *[]int, children *[]string) {
	*pids = append(*pids, readProcs(dir)...)
	// A cgroup directory's link count is 2 plus its child cgroups: skip
	// listing the dozens of control files when there are none.
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil || st.Nlink <= 2 {
		return
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		if e.IsDir() {
			c := filepath.Join(dir, e.Name())
			*children = append(*children, c)
			walkProcs(c, pids, children)
		}
	}
}

// readProcs lists cgroup.procs; a missing file (fake trees) is empty.
func readProcs(dir string) []int {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

func removeSubdirs(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil // as walkProcs: nothing below a missing directory
	}
	if err != nil {
		return fmt.Errorf("reading %s: %w", dir, err)
	}
	for _, e := range entries {
		if e.IsDir() {
			if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
				return fmt.Errorf("removing child of %s: %w", dir, err)
			}
		}
	}
	return nil
}
