package cgpool

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Mode is the cgroup version a pool works with.
type Mode string

const (
	// ModeAuto detects the version from the tree under Options.Root.
	ModeAuto Mode = ""
	// ModeV1 uses one directory per controller hierarchy.
	ModeV1 Mode = "v1"
	// ModeV2 uses the unified hierarchy: one directory carries every
	// controller.
	ModeV2 Mode = "v2"
)

// hierarchy is one mounted cgroup tree the pool keeps slots in.
type hierarchy struct {
	// dir is the hierarchy's mount point (v1) or the cgroup2 root (v2).
	dir string
	// controllers are the runc-style keys of Lease.Paths served by dir:
	// "cpu", "memory", "name=systemd", ... ("" for v2).
	controllers []string
	// cgroupfs is false for a plain directory standing in for a hierarchy
	// (tests, benchmarks on fake trees).
	cgroupfs bool
	// named is set where a lease's slot is renamed to the lease's name
	// (see NamedControllers); elsewhere the slot keeps its own name.
	named bool
}

func (h hierarchy) has(ctrl string) bool {
	for _, c := range h.controllers {
		if c == ctrl {
			return true
		}
	}
	return false
}

// detect finds the hierarchies under root. On a v1 host every cgroup v1
// mount under root is one hierarchy and a cgroup2 mount (hybrid mode's
// "unified") is skipped: cgroup2 directories cannot be renamed. A root that
// holds no cgroupfs at all is read as a fake tree: cgroup.controllers in
// root means v2, otherwise each subdirectory is a v1 hierarchy named by its
// controllers ("cpu,cpuacct", "systemd" for name=systemd).
func detect(root string, want Mode) (Mode, []hierarchy, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(root, &st); err != nil {
		return "", nil, &os.PathError{Op: "statfs", Path: root, Err: err}
	}
	if st.Type == unix.CGROUP2_SUPER_MAGIC {
		if want == ModeV1 {
			return "", nil, fmt.Errorf("cgroup root %s is cgroup v2, v1 requested", root)
		}
		return ModeV2, []hierarchy{{dir: root, controllers: []string{""}, cgroupfs: true}}, nil
	}
	entries, err := os.ReadDir(root)
	if err != nil {
		return "", nil, fmt.Errorf("reading cgroup root: %w", err)
	}
	mounts := cgroupMounts()
	var hs []hierarchy
	seen := map[string]bool{}
	for _, e := range entries {
		dir := filepath.Join(root, e.Name())
		real, err := filepath.EvalSymlinks(dir)
		if err != nil || seen[real] {
			continue
		}
		if fi, err := os.Stat(real); err != nil || !fi.IsDir() {
			continue
		}
		seen[real] = true
		if err := unix.Statfs(real, &st); err != nil || st.Type != unix.CGROUP_SUPER_MAGIC {
			continue
		}
		ctrls := mounts[real]
		if len(ctrls) == 0 {
			ctrls = controllersFromName(filepath.Base(real))
		}
		hs = append(hs, hierarchy{dir: real, controllers: ctrls, cgroupfs: true})
	}
	if len(hs) > 0 {
		if want == ModeV2 {
			return "", nil, fmt.Errorf("cgroup root %s is cgroup v1, v2 requested", root)
		}
		return ModeV1, hs, nil
	}
	return detectFake(root, want, entries)
}

func detectFake(root string, want Mode, entries []fs.DirEntry) (Mode, []hierarchy, error) {
	_, err := os.Stat(filepath.Join(root, "cgroup.controllers"))
	if want == ModeV2 || (want == ModeAuto && err == nil) {
		return ModeV2, []hierarchy{{dir: root, controllers: []string{""}}}, nil
	}
	var hs []hierarchy
	for _, e := range entries {
		if !e.IsDir() || e.Name() == "unified" {
			continue
		}
		hs = append(hs, hierarchy{dir: filepath.Join(root, e.Name()), controllers: controllersFromName(e.Name())})
	}
	if len(hs) == 0 {
		return "", nil, fmt.Errorf("no cgroup hierarchy under %s", root)
	}
	return ModeV1, hs, nil
}

func controllersFromName(name string) []string {
	var out []string
	for _, c := range strings.Split(name, ",") {
		if c == "systemd" {
			c = "name=systemd"
		}
		out = append(out, c)
	}
	return out
}

// cgroupMounts maps each cgroup v1 mount point to its controllers, read
// from the super options in /proc/self/mountinfo.
func cgroupMounts() map[string][]string {
	out := map[string][]string{}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return out
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		pf, qf := strings.Fields(pre), strings.Fields(post)
		if len(pf) < 5 || len(qf) < 3 || qf[0] != "cgroup" {
			continue
		}
		var ctrls []string
		for _, o := range strings.Split(qf[2], ",") {
			switch {
			case o == "rw", o == "ro", o == "noprefix", o == "clone_children", o == "xattr",
				o == "cpuset_v2_mode", strings.HasPrefix(o, "release_agent="):
			default:
				ctrls = append(ctrls, o)
			}
		}
		sort.Strings(ctrls)
		out[unescapeMount(pf[4])] = ctrls
	}
	return out
}

// unescapeMount undoes the octal escapes of mountinfo paths (\040 etc.).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// slotXattr names the extended attribute that marks a slot directory with
// its id, so a record can be rebuilt from the tree after renames.
const slotXattr = "trusted.rund.slot"

func setSlotXattr(dir string, id int) error {
	err := unix.Setxattr(dir, slotXattr, []byte(strconv.Itoa(id)), 0)
	if errors.Is(err, unix.ENOTSUP) || errors.Is(err, unix.EOPNOTSUPP) {
		return nil // rebuild then recognises slots by name only
	}
	if err != nil {
		return &os.PathError{Op: "setxattr", Path: dir, Err: err}
	}
	return nil
}

// nameXattr keeps a v2 lease's name on its slot directory, which keeps
// its slot name because cgroup2 directories cannot be renamed.
const nameXattr = "trusted.rund.name"

func setNameXattr(dir, name string) error {
	err := unix.Setxattr(dir, nameXattr, []byte(name), 0)
	if err != nil && !errors.Is(err, unix.ENOTSUP) {
		return &os.PathError{Op: "setxattr", Path: dir, Err: err}
	}
	return nil
}

func clearNameXattr(dir string) { _ = unix.Removexattr(dir, nameXattr) }

func nameXattrOf(dir string) string {
	var buf [maxNameLen + 1]byte
	n, err := unix.Getxattr(dir, nameXattr, buf[:])
	if err != nil {
		return ""
	}
	return string(buf[:n])
}

// slotXattrIs reports whether dir is marked as slot id.
func slotXattrIs(dir string, id int) bool {
	got, ok := slotXattrID(dir)
	return ok && got == id
}

func slotXattrID(dir string) (int, bool) {
	var buf [16]byte
	n, err := unix.Getxattr(dir, slotXattr, buf[:])
	if err != nil {
		return 0, false
	}
	id, err := strconv.Atoi(string(buf[:n]))
	return id, err == nil
}

// renameNoReplace renames a directory, never over an existing one. cgroupfs
// refuses renameat2 flags but never replaces an existing cgroup anyway.
func renameNoReplace(from, to string, cgroupfs bool) error {
	return renameAt(unix.AT_FDCWD, from, to, cgroupfs)
}

// renameAt is renameNoReplace of two names under the directory dirfd: a
// cached parent fd saves the path walk through the cgroup mount (about
// half the cost of a cgroup v1 rename here).
func renameAt(dirfd int, from, to string, cgroupfs bool) error {
	var err error
	if cgroupfs {
		err = unix.Renameat(dirfd, from, dirfd, to)
	} else {
		err = unix.Renameat2(dirfd, from, dirfd, to, unix.RENAME_NOREPLACE)
	}
	if err != nil {
		return &os.LinkError{Op: "rename", Old: from, New: to, Err: err}
	}
	return nil
}

// AllControllers in Options.Controllers keeps slots in every mounted
// cgroup v1 hierarchy, as runc's fs manager creates a cgroup in each.
const AllControllers = "all"

// DefaultControllers are the cgroup v1 controllers a sandbox's VMM needs on
// the host: its memory, its CPU time and accounting, the CPUs and memory
// nodes it may use, and its task count. Devices, network and the rest are
// enforced inside the guest, so a lease needs no cgroup there (RunD's
// "lightweight cgroup"); every hierarchy left out saves two renames per
// lease.
var DefaultControllers = []string{"cpu", "cpuacct", "cpuset", "memory", "pids"}

// NamedControllers are the cgroup v1 controllers whose hierarchies show a
// lease under the container's own cgroup name: those where runc users, OCI
// tests and monitoring (podman stats, the kubelet) look up a container's
// limits and usage by its cgroupsPath. In the pool's other hierarchies
// (cpuset) a lease stays in its slot's directory, under the slot's name,
// as every lease does on cgroup v2: its processes and limits are there all
// the same, and Lease.Paths says where. Each hierarchy left unrenamed saves
// two renames per lease.
var NamedControllers = []string{"cpu", "cpuacct", "memory", "pids"}

// markNamed sets which v1 hierarchies are renamed: those serving one of
// NamedControllers, or all of them if none does, so that the tree always
// shows a lease's name somewhere (a rebuild reads it back from there).
func markNamed(hs []hierarchy) []hierarchy {
	out := make([]hierarchy, len(hs))
	any := false
	for i, h := range hs {
		for _, c := range NamedControllers {
			h.named = h.named || h.has(c)
		}
		any = any || h.named
		out[i] = h
	}
	if !any {
		for i := range out {
			out[i].named = true
		}
	}
	return out
}

// selectHierarchies keeps the v1 hierarchies that serve one of want; a
// controller that is not mounted is skipped (the default set must work on
// hosts without, say, cpuset), as long as one hierarchy remains.
func selectHierarchies(hs []hierarchy, want []string) ([]hierarchy, error) {
	for _, w := range want {
		if w == AllControllers {
			return hs, nil
		}
	}
	var out []hierarchy
	for _, h := range hs {
		for _, w := range want {
			if h.has(w) {
				out = append(out, h)
				break
			}
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("none of the controllers %s is mounted", strings.Join(want, ","))
	}
	return out, nil
}

// controllerSet names the hierarchies' controllers, sorted, as the record
// keeps them: the pool's shape, which every process opening it must share.
func controllerSet(mode Mode, hs []hierarchy) string {
	if mode == ModeV2 {
		return "-"
	}
	var all []string
	for _, h := range hs {
		all = append(all, h.controllers...)
	}
	sort.Strings(all)
	return strings.Join(all, ",")
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}
