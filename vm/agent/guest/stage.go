package guest

import (
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"

	"github.com/rund-dev/rund/vm/agent/proto"
	"golang.org/x/sys/unix"
)

// A stage holds the usual spec mounts (proc, /dev and its tmpfs, devpts,
// shm and mqueue, sysfs, with the usual masked and read-only paths under
// them), made by the warm-up so that a clone finds them in its template.
// A Create whose mounts under one of those destinations are exactly the
// staged ones moves the staged tree into the container root (one MS_MOVE)
// instead of making each mount: under TCG a clone translates every
// filesystem's mount code afresh, a move runs only the move.
//
// The staged filesystems hold nothing of the template but what a fresh
// mount of them would (device nodes in /dev, empty tmpfs, proc and sysfs,
// which show the live kernel).
type stage struct {
	dir    string
	groups []*mountGroup
}

// stageDir is where the warm-up builds the stage.
const stageDir = "/rund-stage"

// The usual mounts and paths: those of the runtime-spec's example config
// (and `rund spec`).
var (
	usualMounts = []proto.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc"},
		{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
		{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"}},
		{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
		{Destination: "/dev/mqueue", Type: "mqueue", Source: "mqueue", Options: []string{"nosuid", "noexec", "nodev"}},
		{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
	}
	usualMasked = []string{"/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
		"/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"}
	usualReadonly = []string{"/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"}
)

// mountGroup is the mounts at or under one destination (the first mount of
// the group), with the read-only and masked paths under it, in order.
type mountGroup struct {
	dest             string
	mounts           []proto.Mount
	readonly, masked []string
}

// under reports whether p is dir or below it.
func under(p, dir string) bool {
	return p == dir || dir == "/" || strings.HasPrefix(p, dir+"/")
}

// groupMounts splits a request's mounts into groups. A path of ro or masked
// that is under no mount's destination belongs to no group.
func groupMounts(mounts []proto.Mount, ro, masked []string) []*mountGroup {
	var groups []*mountGroup
	find := func(p string) *mountGroup {
		for _, g := range groups {
			if under(p, g.dest) {
				return g
			}
		}
		return nil
	}
	for _, m := range mounts {
		dest := path.Clean("/" + m.Destination)
		if g := find(dest); g != nil {
			g.mounts = append(g.mounts, m)
			continue
		}
		groups = append(groups, &mountGroup{dest: dest, mounts: []proto.Mount{m}})
	}
	for _, p := range ro {
		if g := find(path.Clean("/" + p)); g != nil {
			g.readonly = append(g.readonly, p)
		}
	}
	for _, p := range masked {
		if g := find(path.Clean("/" + p)); g != nil {
			g.masked = append(g.masked, p)
		}
	}
	return groups
}

// stageable reports whether a mount can be made in advance: a filesystem
// of no content of the container's (no bind, share or host data).
func stageable(m proto.Mount) bool {
	switch m.Type {
	case "proc", "sysfs", "tmpfs", "devpts", "mqueue":
	default:
		return false
	}
	return m.Data == nil && m.Tag == "" && parseOptions(m.Options).flags&unix.MS_BIND == 0
}

func (g *mountGroup) equal(o *mountGroup) bool {
	return g.dest == o.dest && slices.Equal(g.readonly, o.readonly) && slices.Equal(g.masked, o.masked) &&
		slices.EqualFunc(g.mounts, o.mounts, func(a, b proto.Mount) bool {
			return a.Destination == b.Destination && a.Type == b.Type && a.Source == b.Source &&
				slices.Equal(a.Options, b.Options) && a.Data == nil && b.Data == nil && a.Tag == "" && b.Tag == ""
		})
}

// buildStage makes the usual mounts in a tmpfs at dir.
func buildStage(dir string, warn func(string, ...any)) (_ *stage, err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0755"); err != nil {
		return nil, fmt.Errorf("mounting the stage: %w", err)
	}
	s := &stage{dir: dir}
	defer func() {
		if err != nil {
			s.discard()
		}
	}()
	rootfd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(rootfd)
	for _, g := range groupMounts(usualMounts, usualReadonly, usualMasked) {
		if !slices.ContainsFunc(g.mounts, func(m proto.Mount) bool { return !stageable(m) }) {
			s.groups = append(s.groups, g)
		}
	}
	for _, g := range s.groups {
		for i, m := range g.mounts {
			if err := applyMount(rootfd, "", i, m, warn); err != nil {
				return nil, fmt.Errorf("staging mount %s (%s): %w", m.Destination, m.Type, err)
			}
		}
		if g.dest == "/dev" {
			if err := makeDevices(rootfd); err != nil {
				return nil, fmt.Errorf("staging /dev: %w", err)
			}
		}
		for _, p := range g.readonly {
			if err := readonlyPath(rootfd, p); err != nil {
				return nil, fmt.Errorf("staging read-only path %s: %w", p, err)
			}
		}
		for _, p := range g.masked {
			if err := maskPath(rootfd, p); err != nil {
				return nil, fmt.Errorf("staging masked path %s: %w", p, err)
			}
		}
	}
	return s, nil
}

// match returns the staged groups that req can use as they are.
func (s *stage) match(req proto.CreateRequest) []*mountGroup {
	if s == nil {
		return nil
	}
	var use []*mountGroup
	for _, g := range groupMounts(req.Mounts, req.ReadonlyPaths, req.MaskedPaths) {
		for _, sg := range s.groups {
			if sg.equal(g) {
				use = append(use, sg)
			}
		}
	}
	return use
}

// moveInto moves the staged group g to its destination in the root.
func (s *stage) moveInto(rootfd int, g *mountGroup) error {
	fd, err := mkdirAllIn(rootfd, g.dest)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Mount(filepath.Join(s.dir, g.dest), fdPath(fd), "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("moving staged %s: %w", g.dest, err)
	}
	return nil
}

// discard detaches what is left of the stage.
func (s *stage) discard() {
	if s == nil {
		return
	}
	if err := unix.Unmount(s.dir, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
		consolef("rund-agent: discarding the stage: %v", err)
	}
	_ = os.Remove(s.dir)
}

// groupOf returns the group of use that p is at or under, or nil.
func groupOf(use []*mountGroup, p string) *mountGroup {
	p = path.Clean("/" + p)
	for _, g := range use {
		if under(p, g.dest) {
			return g
		}
	}
	return nil
}
