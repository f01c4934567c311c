package rootfs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// ext4Options are the mkfs.ext4 options of the writable layer, chosen for a
// disk that lives exactly as long as its sandbox and is cloned, not written,
// on creation:
//   - no journal: crash consistency buys nothing for a layer that vanishes
//     with the sandbox, and every journal write would unshare a block of the
//     clone and cost the guest a jbd2 thread;
//   - inode tables and the (absent) journal initialised now, not lazily by
//     the guest's ext4lazyinit thread, which would write (and so unshare)
//     the whole inode table in every clone;
//   - 4 KiB blocks (mke2fs picks 1 KiB below 512 MiB), no reserved blocks,
//     no discard (the file is new), root-owned root directory.
var ext4Options = []string{
	"-q", "-F", "-b", "4096", "-i", "16384", "-m", "0", "-L", "rund-rw",
	"-O", "^has_journal",
	"-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard,root_owner=0:0",
}

// ext4Version names ext4Options in base image names; change it with them.
const ext4Version = "v1"

// FormatExt4 makes path a file of size bytes holding an empty ext4
// filesystem formatted as the writable layer is.
func FormatExt4(ctx context.Context, path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("formatting %s: %w", path, err)
	}
	err = f.Truncate(size)
	f.Close()
	if err != nil {
		return fmt.Errorf("formatting %s: %w", path, err)
	}
	args := append(append([]string{}, ext4Options...), path)
	if out, err := exec.CommandContext(ctx, "mkfs.ext4", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("formatting %s: mkfs.ext4: %w: %s", path, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// WritableOptions tunes a [WritableStore].
type WritableOptions struct {
	// Logf receives the store's one warning about falling back to copies;
	// nil discards it.
	Logf func(format string, args ...any)
	// NoReflink makes the store copy even where it could clone.
	NoReflink bool
}

// WritableStore makes the per-sandbox writable disks of one size in a data
// directory. Each disk is an independent copy of a base ext4 image formatted
// once: a FICLONE reflink where the filesystem supports it (XFS with
// reflink=1, btrfs), which shares every block until the guest writes it,
// otherwise a sparse copy. A WritableStore is safe for concurrent use.
type WritableStore struct {
	dir     string
	size    int64
	base    *os.File
	reflink atomic.Bool
	logf    func(string, ...any)
	warn    sync.Once
}

// OpenWritableStore opens the store for disks of sizeBytes (a multiple of
// 4 KiB) in dir, formatting its base image unless an earlier call, in any
// process, already did.
func OpenWritableStore(ctx context.Context, dir string, sizeBytes int64, opts WritableOptions) (*WritableStore, error) {
	if sizeBytes < 1<<20 || sizeBytes%4096 != 0 {
		return nil, fmt.Errorf("writable disk size %d: not a multiple of 4 KiB of at least 1 MiB", sizeBytes)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating writable store: %w", err)
	}
	removeStaleBases(dir)
	path := filepath.Join(dir, fmt.Sprintf("base-%s-%d.ext4", ext4Version, sizeBytes))
	base, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		if err := formatBase(ctx, path, sizeBytes); err != nil {
			return nil, err
		}
		base, err = os.Open(path)
	}
	if err != nil {
		return nil, fmt.Errorf("opening writable base image: %w", err)
	}
	s := &WritableStore{dir: dir, size: sizeBytes, base: base, logf: opts.Logf}
	if s.logf == nil {
		s.logf = func(string, ...any) {}
	}
	if !opts.NoReflink {
		ok, err := SupportsReflink(dir)
		if err != nil {
			base.Close()
			return nil, err
		}
		s.reflink.Store(ok)
	}
	return s, nil
}

// formatBase formats the base image into a temporary file, locked so that no
// cleaner takes it for a crash's leftover, and moves it to path unless a
// concurrent opener got there first.
func formatBase(ctx context.Context, path string, size int64) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".base-*.tmp")
	if err != nil {
		return fmt.Errorf("formatting writable base image: %w", err)
	}
	defer tmp.Close()
	defer os.Remove(tmp.Name())
	if _, err := tryLock(tmp, unix.LOCK_EX); err != nil {
		return fmt.Errorf("formatting writable base image: %w", err)
	}
	if err := FormatExt4(ctx, tmp.Name(), size); err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("syncing writable base image: %w", err)
	}
	err = unix.Renameat2(unix.AT_FDCWD, tmp.Name(), unix.AT_FDCWD, path, unix.RENAME_NOREPLACE)
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("installing writable base image: %w", err)
	}
	return syncDir(filepath.Dir(path))
}

// removeStaleBases removes base images whose formatting crashed: a format in
// progress holds its file locked. A file younger than a minute is left
// alone too: its creator may not have locked it yet.
func removeStaleBases(dir string) {
	matches, _ := filepath.Glob(filepath.Join(dir, ".base-*.tmp"))
	for _, m := range matches {
		if fi, err := os.Stat(m); err != nil || time.Since(fi.ModTime()) < time.Minute {
			continue
		}
		f, err := os.Open(m)
		if err != nil {
			continue
		}
		if ok, _ := tryLock(f, unix.LOCK_EX); ok {
			os.Remove(m)
		}
		f.Close()
	}
}

// New returns a new writable disk: an open, read-write, already unlinked
// file holding a copy of the base image. Its space returns to the filesystem
// when the last descriptor of it is closed, so hand it to the VMM and close
// it here.
func (s *WritableStore) New() (*os.File, error) {
	f, err := openUnlinked(s.dir)
	if err != nil {
		return nil, fmt.Errorf("creating writable disk: %w", err)
	}
	if s.reflink.Load() {
		err := unix.IoctlFileClone(int(f.Fd()), int(s.base.Fd()))
		if err == nil {
			return f, nil
		}
		if !isNoReflink(err) {
			f.Close()
			return nil, fmt.Errorf("cloning writable disk: %w", err)
		}
		s.reflink.Store(false)
	}
	s.warn.Do(func() {
		s.logf("rootfs: %s has no reflink support: writable disks are sparse copies (slower; put it on XFS with reflink=1 or btrfs)", s.dir)
	})
	if err := sparseCopy(f, s.base, s.size); err != nil {
		f.Close()
		return nil, fmt.Errorf("copying writable disk: %w", err)
	}
	return f, nil
}

// Reflink reports whether New clones (rather than copies) the base image.
func (s *WritableStore) Reflink() bool { return s.reflink.Load() }

// Size returns the size of the store's disks in bytes.
func (s *WritableStore) Size() int64 { return s.size }

// BasePath returns the path of the base image the disks are copies of.
func (s *WritableStore) BasePath() string { return s.base.Name() }

// Close releases the base image. Disks made by New stay valid.
func (s *WritableStore) Close() error { return s.base.Close() }

// SupportsReflink reports whether files in dir can be cloned with FICLONE.
func SupportsReflink(dir string) (bool, error) {
	src, err := openUnlinked(dir)
	if err != nil {
		return false, fmt.Errorf("probing reflink in %s: %w", dir, err)
	}
	defer src.Close()
	if _, err := src.Write(make([]byte, 4096)); err != nil {
		return false, fmt.Errorf("probing reflink in %s: %w", dir, err)
	}
	dst, err := openUnlinked(dir)
	if err != nil {
		return false, fmt.Errorf("probing reflink in %s: %w", dir, err)
	}
	defer dst.Close()
	err = unix.IoctlFileClone(int(dst.Fd()), int(src.Fd()))
	switch {
	case err == nil:
		return true, nil
	case isNoReflink(err):
		return false, nil
	default:
		return false, fmt.Errorf("probing reflink in %s: %w", dir, err)
	}
}

// isNoReflink reports whether a FICLONE error means that the filesystem
// cannot clone, as opposed to a failure of this one clone.
func isNoReflink(err error) bool {
	for _, e := range []error{unix.EOPNOTSUPP, unix.EXDEV, unix.EINVAL, unix.ENOTTY, unix.ENOSYS} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// openUnlinked opens a new, nameless read-write file in dir: O_TMPFILE where
// the filesystem has it, else a file created and unlinked at once.
func openUnlinked(dir string) (*os.File, error) {
	fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, 0o600)
	if err == nil {
		return os.NewFile(uintptr(fd), filepath.Join(dir, "(unlinked)")), nil
	}
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EISDIR) {
		return nil, fmt.Errorf("opening unlinked file in %s: %w", dir, err)
	}
	f, err := os.CreateTemp(dir, ".disk-*")
	if err != nil {
		return nil, err
	}
	if err := os.Remove(f.Name()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		f.Close()
		return nil, err
	}
	return f, nil
}

// sparseCopy copies the first size bytes of src to dst, writing only the
// ranges that hold data and leaving holes elsewhere. It reads and writes
// through user space, so it copies even where copy_file_range would clone.
func sparseCopy(dst, src *os.File, size int64) error {
	buf := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(buf)
	sfd, dfd := int(src.Fd()), int(dst.Fd())
	for off := int64(0); off < size; {
		data, err := unix.Seek(sfd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			return fmt.Errorf("seeking data: %w", err)
		}
		hole, err := unix.Seek(sfd, data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("seeking hole: %w", err)
		}
		hole = min(hole, size)
		if err := copyRange(dfd, sfd, data, hole, *buf); err != nil {
			return err
		}
		off = hole
	}
	if err := dst.Truncate(size); err != nil {
		return err
	}
	return nil
}

func copyRange(dfd, sfd int, from, to int64, buf []byte) error {
	for off := from; off < to; {
		n, err := unix.Pread(sfd, buf[:min(int64(len(buf)), to-off)], off)
		if err != nil {
			return fmt.Errorf("reading: %w", err)
		}
		if n == 0 {
			return fmt.Errorf("reading at %d: %w", off, io.ErrUnexpectedEOF)
		}
		for w := 0; w < n; {
			m, err := unix.Pwrite(dfd, buf[w:n], off+int64(w))
			if err != nil {
				return fmt.Errorf("writing: %w", err)
			}
			w += m
		}
		off += int64(n)
	}
	return nil
}

var copyBufs = sync.Pool{New: func() any {
	b := make([]byte, 1<<20)
	return &b
}}
