package rootfs

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"os"
	"path/filepath"
	"slices"

	"golang.org/x/sys/unix"
)

// keyVersion names everything besides the tree that shapes an image. Change
// it whenever the mkfs.erofs options or the padding change, so that images
// built the old way are never taken for new ones.
const keyVersion = "rund-erofs-v1 -Enoinline_data --preserve-mtime pad=2MiB\n"

// ContentKey returns the cache key for the tree at dir: a hex SHA-256.
//
// If dir is an overlay mount point (a podman or CRI-O container rootfs), the
// key covers the identity of each lower layer (its resolved path, device,
// inode and modification time: container storage never changes a layer in
// place) and a walk of the upper directory, which is empty when a container
// is created. Otherwise it covers a walk of the whole tree: for every entry
// its relative name, type and permission bits, owner, size, modification
// time, symlink target and device number. Extended attributes and hard links
// are not part of the walk key; contents are not read.
func ContentKey(dir string) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", fmt.Errorf("resolving %s: %w", dir, err)
	}
	abs, err = filepath.EvalSymlinks(abs)
	if err != nil {
		return "", fmt.Errorf("resolving %s: %w", dir, err)
	}
	ovl, err := overlayAt(abs)
	if err != nil {
		return "", err
	}
	if ovl != nil {
		h := sha256.New()
		h.Write([]byte(keyVersion))
		ok, err := overlayKey(h, ovl)
		if err != nil {
			return "", err
		}
		if ok {
			return hex.EncodeToString(h.Sum(nil)), nil
		}
	}
	return treeKey(abs)
}

// treeKey returns the key of the tree at dir from a walk of it.
func treeKey(dir string) (string, error) {
	h := sha256.New()
	h.Write([]byte(keyVersion))
	h.Write([]byte("tree\n"))
	if err := walkTree(h, dir, false); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// overlayKey hashes the layer identities and the upper tree of an overlay. It
// reports false if a lower layer cannot be found, in which case the caller
// falls back to walking the merged tree.
func overlayKey(h hash.Hash, m *overlayMount) (bool, error) {
	h.Write([]byte("overlay\n"))
	var b []byte
	for _, l := range m.lower {
		p, err := filepath.EvalSymlinks(l)
		if err != nil {
			return false, nil
		}
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err != nil {
			return false, nil
		}
		b = append(b[:0], p...)
		b = append(b, 0)
		b = binary.AppendUvarint(b, st.Dev)
		b = binary.AppendUvarint(b, st.Ino)
		b = binary.AppendVarint(b, st.Mtim.Sec)
		b = binary.AppendVarint(b, st.Mtim.Nsec)
		h.Write(b)
	}
	h.Write([]byte("upper\n"))
	if m.upper != "" {
		if err := walkTree(h, m.upper, true); err != nil {
			return false, err
		}
	}
	return true, nil
}

// opaqueXattrs mark an overlay upper directory that hides the lower ones.
var opaqueXattrs = []string{"trusted.overlay.opaque", "user.overlay.opaque"}

// walkTree hashes one record per entry of the tree at root, in name order.
// With overlay set (root is an overlay's upper directory) it also hashes the
// opaque marks of directories, and leaves out the root's modification time.
func walkTree(h hash.Hash, root string, overlay bool) error {
	w := &walker{h: h, overlay: overlay, buf: make([]byte, 0, 64*1024)}
	fd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening %s: %w", root, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return fmt.Errorf("stat %s: %w", root, err)
	}
	if overlay {
		// Each container gets a fresh upper directory: its modification
		// time tells nothing about the content.
		st.Mtim = unix.Timespec{}
	}
	if err := w.record(".", fd, "", &st); err != nil {
		unix.Close(fd)
		return fmt.Errorf("reading %s: %w", root, err)
	}
	if err := w.dir(fd, root, ""); err != nil {
		return err
	}
	h.Write(w.buf)
	return nil
}

type walker struct {
	h       hash.Hash
	overlay bool
	buf     []byte
	link    []byte
}

// dir walks the directory open as fd (which it closes), whose path relative
// to the root is rel and whose full path, for messages, is path.
func (w *walker) dir(fd int, path, rel string) error {
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return fmt.Errorf("reading %s: %w", path, err)
	}
	slices.Sort(names)
	for _, name := range names {
		var st unix.Stat_t
		if err := unix.Fstatat(fd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			if errors.Is(err, unix.ENOENT) {
				continue
			}
			return fmt.Errorf("stat %s: %w", filepath.Join(path, name), err)
		}
		crel := name
		if rel != "" {
			crel = rel + "/" + name
		}
		if err := w.record(crel, fd, name, &st); err != nil {
			return fmt.Errorf("reading %s: %w", filepath.Join(path, name), err)
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			continue
		}
		cfd, err := unix.Openat(fd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("opening %s: %w", filepath.Join(path, name), err)
		}
		if err := w.dir(cfd, filepath.Join(path, name), crel); err != nil {
			return err
		}
	}
	return nil
}

// record appends the entry's record to the buffer, flushing it to the hash
// when it grows large. dirfd and name locate the entry for readlink and
// getxattr; name is "" for the root, which is dirfd itself.
func (w *walker) record(rel string, dirfd int, name string, st *unix.Stat_t) error {
	b := append(w.buf, rel...)
	b = append(b, 0)
	b = binary.AppendUvarint(b, uint64(st.Mode))
	b = binary.AppendUvarint(b, uint64(st.Uid))
	b = binary.AppendUvarint(b, uint64(st.Gid))
	b = binary.AppendVarint(b, st.Mtim.Sec)
	b = binary.AppendVarint(b, st.Mtim.Nsec)
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		b = binary.AppendVarint(b, st.Size)
	case unix.S_IFCHR, unix.S_IFBLK:
		b = binary.AppendUvarint(b, st.Rdev)
	case unix.S_IFLNK:
		if cap(w.link) < 256 {
			w.link = make([]byte, 4096)
		}
		n, err := unix.Readlinkat(dirfd, name, w.link[:cap(w.link)])
		if err != nil {
			return fmt.Errorf("readlink: %w", err)
		}
		b = append(b, w.link[:n]...)
		b = append(b, 0)
	case unix.S_IFDIR:
		if w.overlay {
			b = w.opaque(b, dirfd, name)
		}
	}
	if len(b) > 32*1024 {
		w.h.Write(b)
		b = b[:0]
	}
	w.buf = b
	return nil
}

// opaque appends the overlay opaque marks of a directory.
func (w *walker) opaque(b []byte, dirfd int, name string) []byte {
	path := fmt.Sprintf("/proc/self/fd/%d", dirfd)
	if name != "" {
		path += "/" + name
	}
	var v [8]byte
	for _, x := range opaqueXattrs {
		n, err := unix.Lgetxattr(path, x, v[:])
		if err == nil {
			b = append(b, x...)
			b = append(b, '=')
			b = append(b, v[:n]...)
			b = append(b, 0)
		}
	}
	return b
}
