package guest

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/rund-dev/rund/vm/agent/proto"
	"golang.org/x/sys/unix"
)

// container is the container's root, built in the agent's mount namespace.
type container struct {
	id   string
	dir  string // /rund/<id>
	root string // dir/root

	// initPid is the init process's pid in the agent's namespace.
	initPid int
	// initExited is set (under agent.mu) when stream 1's process exited.
	initExited bool
}

// buildContainer mounts the root and applies the spec's mounts, devices,
// masked and read-only paths, sysctls and hostname.
func buildContainer(req proto.CreateRequest, st *stage, warn func(string, ...any), sp *steps) (*container, error) {
	c, err := mountRoot(req.ID, req.Root, sp)
	if err != nil {
		return nil, err
	}
	if err := c.setup(req, st, warn, sp); err != nil {
		if terr := c.teardown(); terr != nil {
			warn("%v", terr)
		}
		return nil, err
	}
	sp.mark("mounts")
	return c, nil
}

// mountRoot mounts the layers of r and the container root over them.
func mountRoot(id string, r proto.Root, sp *steps) (_ *container, err error) {
	name := strings.NewReplacer("/", "_", "\x00", "_").Replace(id)
	if name == "" || name == "." || name == ".." {
		return nil, fmt.Errorf("bad container id %q", id)
	}
	c := &container{id: id, dir: filepath.Join(stateDir, name)}
	c.root = filepath.Join(c.dir, "root")
	if _, err := os.Stat(c.dir); err == nil {
		return nil, fmt.Errorf("container %s already exists in the guest", id)
	}
	defer func() {
		if err != nil {
			_ = c.teardown()
		}
	}()
	if err := os.Rename(spareDir, c.dir); err != nil {
		// No spare (a cold boot, or a second root): make one in place.
		if err := makeContainerDir(c.dir); err != nil {
			return nil, err
		}
	}
	if r.SharedTag != "" {
		var flags uintptr
		if r.Readonly {
			flags = unix.MS_RDONLY
		}
		return c, mountShare(r.SharedTag, r.SharedType, c.root, flags)
	}
	if r.Lower == "" {
		return nil, errors.New("no root filesystem: neither a lower device nor a shared tag")
	}
	lower := filepath.Join(c.dir, "lower")
	if err := waitDevice(r.Lower); err != nil {
		return nil, err
	}
	data := ""
	if r.DAX {
		data = "dax=always"
	}
	typ := r.LowerType
	if typ == "" {
		typ = "erofs"
	}
	if err := unix.Mount(r.Lower, lower, typ, unix.MS_RDONLY, data); err != nil {
		return nil, fmt.Errorf("mounting %s (%s, %q) on %s: %w", r.Lower, typ, data, lower, err)
	}
	sp.mark("lower")
	if r.Upper == "" {
		if err := unix.Mount(lower, c.root, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return nil, fmt.Errorf("binding %s on %s: %w", lower, c.root, err)
		}
		return c, nil
	}
	upper := filepath.Join(c.dir, "upper")
	if err := waitDevice(r.Upper); err != nil {
		return nil, err
	}
	if err := unix.Mount(r.Upper, upper, "ext4", 0, upperOptions); err != nil {
		return nil, fmt.Errorf("mounting %s (ext4, %q) on %s: %w", r.Upper, upperOptions, upper, err)
	}
	sp.mark("upper")
	for _, d := range []string{"upper", "work"} {
		if err := os.MkdirAll(filepath.Join(upper, d), 0o755); err != nil {
			return nil, fmt.Errorf("preparing the writable layer: %w", err)
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s/upper,workdir=%s/work", lower, upper, upper)
	if err := unix.Mount("overlay", c.root, "overlay", 0, opts); err != nil {
		return nil, fmt.Errorf("mounting overlay (%s): %w", opts, err)
	}
	sp.mark("overlay")
	return c, nil
}

// upperOptions are the writable layer's ext4 options. The layer lives and
// dies with the sandbox (its host file is unlinked once opened), so nothing
// of it needs to survive a crash: without the journal and cache flushes a
// clone runs (and translates, under TCG) much less kernel code, and the
// host syncs nothing.
const upperOptions = "noload,nobarrier"

// spareDir is a container directory made in advance (by the warm-up, so a
// clone finds it in its template), renamed to /rund/<id> by the next root.
const spareDir = "/rund-spare"

// makeContainerDir makes dir with the layout of a container directory: the
// mount points, and a tmpfs for the bind-mounted files.
func makeContainerDir(dir string) error {
	for _, d := range []string{"lower", "upper", "root", "files"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			return err
		}
	}
	if err := unix.Mount("tmpfs", filepath.Join(dir, "files"), "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0755"); err != nil {
		return fmt.Errorf("mounting tmpfs for bind-mounted files: %w", err)
	}
	return nil
}

// setup applies everything of req but the process under the root. The
// groups of mounts that st (if any) holds ready are moved in; st is used up.
func (c *container) setup(req proto.CreateRequest, st *stage, warn func(string, ...any), sp *steps) error {
	rootfd, err := unix.Open(c.root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening root: %w", err)
	}
	defer unix.Close(rootfd)
	staged := st.match(req)
	defer st.discard()
	if len(staged) > 0 {
		sp.note("%d staged mount groups", len(staged))
	}
	files := filepath.Join(c.dir, "files")
	for i, m := range req.Mounts {
		if g := groupOf(staged, m.Destination); g != nil {
			if path.Clean("/"+m.Destination) == g.dest {
				if err := st.moveInto(rootfd, g); err != nil {
					return fmt.Errorf("mount %s (%s): %w", m.Destination, m.Type, err)
				}
			}
			continue
		}
		if err := applyMount(rootfd, files, i, m, warn); err != nil {
			return fmt.Errorf("mount %s (%s): %w", m.Destination, m.Type, err)
		}
	}
	if err := makeDevices(rootfd); err != nil {
		return err
	}
	for k, v := range req.Sysctl {
		p := filepath.Join("/proc/sys", strings.ReplaceAll(k, ".", "/"))
		if err := os.WriteFile(p, []byte(v), 0o644); err != nil {
			return fmt.Errorf("sysctl %s=%s: %w", k, v, err)
		}
	}
	if req.Hostname != "" {
		if err := unix.Sethostname([]byte(req.Hostname)); err != nil {
			return fmt.Errorf("setting hostname: %w", err)
		}
	}
	if req.Root.Readonly {
		if err := unix.Mount("", c.root, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
			return fmt.Errorf("remounting root read-only: %w", err)
		}
	}
	for _, p := range req.ReadonlyPaths {
		if groupOf(staged, p) != nil {
			continue
		}
		if err := readonlyPath(rootfd, p); err != nil {
			return fmt.Errorf("read-only path %s: %w", p, err)
		}
	}
	for _, p := range req.MaskedPaths {
		if groupOf(staged, p) != nil {
			continue
		}
		if err := maskPath(rootfd, p); err != nil {
			return fmt.Errorf("masked path %s: %w", p, err)
		}
	}
	return nil
}

// teardown unmounts everything of the container and removes its directories.
func (c *container) teardown() error {
	var errs []error
	for _, mp := range mountsUnder(c.dir) {
		if err := unix.Unmount(mp, 0); err != nil {
			if err2 := unix.Unmount(mp, unix.MNT_DETACH); err2 != nil && !errors.Is(err2, unix.EINVAL) {
				errs = append(errs, fmt.Errorf("unmounting %s: %w", mp, err))
			}
		}
	}
	// Staging directories of shares (empty once unmounted; os.Remove
	// never deletes into a share that is still mounted).
	staged, _ := filepath.Glob(filepath.Join(c.dir, "files", "share-*"))
	for _, d := range staged {
		_ = os.Remove(d)
	}
	for _, d := range []string{"root", "lower", "upper", "files", ""} {
		_ = os.Remove(filepath.Join(c.dir, d))
	}
	if len(errs) > 0 {
		return fmt.Errorf("tearing down container %s: %w", c.id, errors.Join(errs...))
	}
	return nil
}

// mountsUnder lists the mount points at or under dir, deepest first.
func mountsUnder(dir string) []string {
	var out []string
	for _, mp := range mountPoints() {
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out
}

// mountPoints lists the mount points of this mount namespace, in mount order.
func mountPoints() []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 {
			out = append(out, unescapeMountinfo(fields[4]))
		}
	}
	return out
}

// unescapeMountinfo decodes the \ooo escapes of a mountinfo path.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			v := 0
			ok := true
			for _, c := range s[i+1 : i+4] {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + int(c-'0')
			}
			if ok {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// waitDevice waits for a device node to appear (devtmpfs creates nodes
// asynchronously, and nd_pmem probes asynchronously).
func waitDevice(dev string) error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err := os.Stat(dev)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("device %s: %w", dev, err)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// mountShare mounts a directory the host shares under tag. typ is "9p",
// "virtiofs" or empty (whichever the kernel has, virtiofs first).
func mountShare(tag, typ, target string, flags uintptr) error {
	if typ == "" {
		typ = "virtiofs"
		if !haveFilesystem(typ) {
			typ = "9p"
		}
	}
	if !haveFilesystem(typ) {
		return fmt.Errorf("shared directory %q: the guest kernel has no %s filesystem", tag, typ)
	}
	data := ""
	if typ == "9p" {
		// cache=mmap: still write-through, but shared writable mmap
		// works (databases' shared-memory files on volumes).
		data = "trans=virtio,version=9p2000.L,msize=262144,cache=mmap"
	}
	if err := unix.Mount(tag, target, typ, flags, data); err != nil {
		return fmt.Errorf("mounting shared directory %q (%s) on %s: %w", tag, typ, target, err)
	}
	return nil
}

func haveFilesystem(typ string) bool {
	b, err := os.ReadFile("/proc/filesystems")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 0 && f[len(f)-1] == typ {
			return true
		}
	}
	return false
}
