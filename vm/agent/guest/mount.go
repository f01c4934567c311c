package guest

import (
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/rund-dev/rund/vm/agent/proto"
	"golang.org/x/sys/unix"
)

// mountFlag is what a mount option does to the flags.
type mountFlag struct {
	clear bool
	flag  uintptr
}

var mountFlags = map[string]mountFlag{
	"ro": {false, unix.MS_RDONLY}, "rw": {true, unix.MS_RDONLY},
	"nosuid": {false, unix.MS_NOSUID}, "suid": {true, unix.MS_NOSUID},
	"nodev": {false, unix.MS_NODEV}, "dev": {true, unix.MS_NODEV},
	"noexec": {false, unix.MS_NOEXEC}, "exec": {true, unix.MS_NOEXEC},
	"sync": {false, unix.MS_SYNCHRONOUS}, "async": {true, unix.MS_SYNCHRONOUS},
	"dirsync": {false, unix.MS_DIRSYNC}, "remount": {false, unix.MS_REMOUNT},
	"mand": {false, unix.MS_MANDLOCK}, "nomand": {true, unix.MS_MANDLOCK},
	"noatime": {false, unix.MS_NOATIME}, "atime": {true, unix.MS_NOATIME},
	"nodiratime": {false, unix.MS_NODIRATIME}, "diratime": {true, unix.MS_NODIRATIME},
	"relatime": {false, unix.MS_RELATIME}, "norelatime": {true, unix.MS_RELATIME},
	"strictatime": {false, unix.MS_STRICTATIME}, "nostrictatime": {true, unix.MS_STRICTATIME},
	"bind": {false, unix.MS_BIND}, "rbind": {false, unix.MS_BIND | unix.MS_REC},
	"silent": {false, unix.MS_SILENT}, "loud": {true, unix.MS_SILENT},
}

var propagationFlags = map[string]uintptr{
	"private": unix.MS_PRIVATE, "rprivate": unix.MS_PRIVATE | unix.MS_REC,
	"shared": unix.MS_SHARED, "rshared": unix.MS_SHARED | unix.MS_REC,
	"slave": unix.MS_SLAVE, "rslave": unix.MS_SLAVE | unix.MS_REC,
	"unbindable": unix.MS_UNBINDABLE, "runbindable": unix.MS_UNBINDABLE | unix.MS_REC,
}

// ignoredOptions are accepted from OCI configs but mean nothing here.
var ignoredOptions = map[string]bool{"defaults": true, "tmpcopyup": true, "notmpcopyup": true, "copyup": true, "nocopyup": true}

// mountOptions is a parsed option list.
type mountOptions struct {
	flags uintptr
	prop  uintptr
	data  string
}

func parseOptions(opts []string) mountOptions {
	var o mountOptions
	var data []string
	for _, s := range opts {
		if f, ok := mountFlags[s]; ok {
			if f.clear {
				o.flags &^= f.flag
			} else {
				o.flags |= f.flag
			}
			continue
		}
		if p, ok := propagationFlags[s]; ok {
			o.prop |= p
			continue
		}
		if ignoredOptions[s] || strings.HasPrefix(s, "x-") {
			continue
		}
		data = append(data, s)
	}
	o.data = strings.Join(data, ",")
	return o
}

// fdPath names an open fd so that mount(2) can take it as a path.
func fdPath(fd int) string { return "/proc/self/fd/" + strconv.Itoa(fd) }

// applyMount applies one spec mount under the root.
func applyMount(rootfd int, filesDir string, i int, m proto.Mount, warn func(string, ...any)) error {
	if !path.IsAbs(m.Destination) {
		return errors.New("destination is not absolute")
	}
	o := parseOptions(m.Options)
	bind := m.Type == "bind" || m.Type == "rbind" || o.flags&unix.MS_BIND != 0
	var fd int
	var err error
	switch {
	case m.Tag != "":
		// A share's channel can be mounted once: mount it at a staging
		// directory and bind that, so one host directory can appear at
		// several destinations with their own flags.
		typ := "" // whichever the kernel has
		if m.Type == "9p" || m.Type == "virtiofs" {
			typ = m.Type
		}
		src, serr := stagedShare(filesDir, m.Tag, typ)
		if serr != nil {
			return serr
		}
		if fd, err = mkdirAllIn(rootfd, m.Destination); err != nil {
			return err
		}
		defer unix.Close(fd)
		if err = unix.Mount(src, fdPath(fd), "", unix.MS_BIND|unix.MS_REC, ""); err == nil {
			if rest := o.flags &^ (unix.MS_BIND | unix.MS_REC | unix.MS_REMOUNT); rest != 0 {
				err = remountBind(rootfd, m.Destination, rest)
			}
		}
	case bind:
		// A host file, sent as Data (an empty file arrives without Data: the
		// JSON field is omitted when empty).
		src := filepath.Join(filesDir, strconv.Itoa(i))
		if err := os.WriteFile(src, m.Data, 0o644); err != nil {
			return fmt.Errorf("writing bind source: %w", err)
		}
		if fd, err = createFileIn(rootfd, m.Destination); err != nil {
			return err
		}
		defer unix.Close(fd)
		if err = unix.Mount(src, fdPath(fd), "", unix.MS_BIND, ""); err == nil {
			if rest := o.flags &^ (unix.MS_BIND | unix.MS_REC | unix.MS_REMOUNT); rest != 0 {
				err = remountBind(rootfd, m.Destination, rest)
			}
		}
	case m.Type == "cgroup" || m.Type == "cgroup2":
		if fd, err = mkdirAllIn(rootfd, m.Destination); err != nil {
			return err
		}
		defer unix.Close(fd)
		// The VM is the container: its whole cgroup2 tree is the
		// container's. Best effort, as runc does for a missing hierarchy.
		if err := unix.Mount("cgroup2", fdPath(fd), "cgroup2", o.flags, ""); err != nil {
			warn("mount %s (%s): %v; skipped", m.Destination, m.Type, err)
		}
		return nil
	default:
		if m.Type == "" {
			return errors.New("no filesystem type")
		}
		if fd, err = mkdirAllIn(rootfd, m.Destination); err != nil {
			return err
		}
		defer unix.Close(fd)
		src := m.Source
		if src == "" {
			src = m.Type
		}
		err = unix.Mount(src, fdPath(fd), m.Type, o.flags, o.data)
	}
	if err != nil {
		return err
	}
	if o.prop != 0 {
		nfd, err := openIn(rootfd, m.Destination)
		if err != nil {
			return err
		}
		defer unix.Close(nfd)
		if err := unix.Mount("", fdPath(nfd), "", o.prop, ""); err != nil {
			return fmt.Errorf("setting propagation: %w", err)
		}
	}
	return nil
}

// stagedShare mounts the share tag at dir/share-<tag> unless it is mounted
// there already, and returns that path.
func stagedShare(dir, tag, typ string) (string, error) {
	staging := filepath.Join(dir, "share-"+tag)
	if err := os.MkdirAll(staging, 0o700); err != nil {
		return "", fmt.Errorf("shared directory %q: %w", tag, err)
	}
	var parent, st unix.Stat_t
	if unix.Stat(dir, &parent) == nil && unix.Stat(staging, &st) == nil && st.Dev != parent.Dev {
		return staging, nil // mounted by an earlier destination
	}
	if err := mountShare(tag, typ, staging, 0); err != nil {
		return "", err
	}
	return staging, nil
}

// remountBind applies flags to the bind mount at dest. The path is opened
// again so that it names the new mount, not the directory under it.
func remountBind(rootfd int, dest string, flags uintptr) error {
	fd, err := openIn(rootfd, dest)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Mount("", fdPath(fd), "", unix.MS_REMOUNT|unix.MS_BIND|flags, ""); err != nil {
		return fmt.Errorf("remounting bind with flags %#x: %w", flags, err)
	}
	return nil
}

// openIn opens p (a container path) with O_PATH, resolving every symlink
// as if the root were /.
func openIn(rootfd int, p string) (int, error) {
	rel := strings.TrimLeft(path.Clean("/"+p), "/")
	if rel == "" {
		rel = "."
	}
	fd, err := unix.Openat2(rootfd, rel, &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
	})
	if err != nil {
		return -1, &os.PathError{Op: "open", Path: p, Err: err}
	}
	return fd, nil
}

// mkdirAllIn creates the directory p and its parents in the root and
// returns it opened with O_PATH.
func mkdirAllIn(rootfd int, p string) (int, error) {
	fd, err := unix.Dup(rootfd)
	if err != nil {
		return -1, err
	}
	cur := "/"
	for _, comp := range strings.Split(strings.Trim(path.Clean("/"+p), "/"), "/") {
		if comp == "" {
			continue
		}
		next := path.Join(cur, comp)
		nfd, err := openIn(rootfd, next)
		if errors.Is(err, unix.ENOENT) {
			if err := unix.Mkdirat(fd, comp, 0o755); err != nil && !errors.Is(err, unix.EEXIST) {
				unix.Close(fd)
				return -1, &os.PathError{Op: "mkdir", Path: next, Err: err}
			}
			nfd, err = openIn(rootfd, next)
		}
		unix.Close(fd)
		if err != nil {
			return -1, err
		}
		fd, cur = nfd, next
	}
	return fd, nil
}

// createFileIn makes sure the file p exists in the root (creating it and
// its parents when missing) and returns it opened with O_PATH.
func createFileIn(rootfd int, p string) (int, error) {
	fd, err := openIn(rootfd, p)
	if err == nil || !errors.Is(err, unix.ENOENT) {
		return fd, err
	}
	dfd, err := mkdirAllIn(rootfd, path.Dir(path.Clean("/"+p)))
	if err != nil {
		return -1, err
	}
	defer unix.Close(dfd)
	nfd, err := unix.Openat(dfd, path.Base(p), unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o644)
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return -1, &os.PathError{Op: "create", Path: p, Err: err}
	}
	if err == nil {
		unix.Close(nfd)
	}
	return openIn(rootfd, p)
}

// device is a standard device node every container gets.
type device struct {
	name         string
	major, minor uint32
}

var devices = []device{
	{"null", 1, 3}, {"zero", 1, 5}, {"full", 1, 7},
	{"random", 1, 8}, {"urandom", 1, 9}, {"tty", 5, 0},
}

var devLinks = [][2]string{
	{"fd", "/proc/self/fd"}, {"stdin", "/proc/self/fd/0"},
	{"stdout", "/proc/self/fd/1"}, {"stderr", "/proc/self/fd/2"},
	{"ptmx", "pts/ptmx"},
}

// makeDevices creates the standard nodes and links in the container's /dev
// when they are missing.
func makeDevices(rootfd int) error {
	dfd, err := openIn(rootfd, "/dev")
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return err
	}
	defer unix.Close(dfd)
	for _, d := range devices {
		err := unix.Mknodat(dfd, d.name, unix.S_IFCHR|0o666, int(unix.Mkdev(d.major, d.minor)))
		if err != nil && !errors.Is(err, unix.EEXIST) && !errors.Is(err, unix.EROFS) {
			return fmt.Errorf("creating /dev/%s: %w", d.name, err)
		}
	}
	for _, l := range devLinks {
		err := unix.Symlinkat(l[1], dfd, l[0])
		if err != nil && !errors.Is(err, unix.EEXIST) && !errors.Is(err, unix.EROFS) {
			return fmt.Errorf("creating /dev/%s: %w", l[0], err)
		}
	}
	return nil
}

// maskPath hides p: /dev/null over a file, an empty read-only tmpfs over a
// directory. A missing path is not an error.
func maskPath(rootfd int, p string) error {
	fd, err := openIn(rootfd, p)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		return unix.Mount("tmpfs", fdPath(fd), "tmpfs", unix.MS_RDONLY, "size=0")
	}
	return unix.Mount("/dev/null", fdPath(fd), "", unix.MS_BIND, "")
}

// readonlyPath makes p read-only by binding it onto itself. A missing path
// is not an error.
func readonlyPath(rootfd int, p string) error {
	fd, err := openIn(rootfd, p)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return err
	}
	err = unix.Mount(fdPath(fd), fdPath(fd), "", unix.MS_BIND|unix.MS_REC, "")
	unix.Close(fd)
	if err != nil {
		return err
	}
	return remountBind(rootfd, p, unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC|unix.MS_REC)
}

// ptmxFor returns the ptmx device a terminal of the container comes from:
// its own devpts instance when it mounted one.
func ptmxFor(root string) string {
	var st unix.Statfs_t
	pts := filepath.Join(root, "dev/pts")
	if unix.Statfs(pts, &st) == nil && st.Type == unix.DEVPTS_SUPER_MAGIC {
		if _, err := os.Stat(filepath.Join(pts, "ptmx")); err == nil {
			return filepath.Join(pts, "ptmx")
		}
	}
	return "/dev/ptmx"
}
