package rootfs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// PmemAlign is the unit image sizes are padded to: virtio-pmem maps its
// backing file in 2 MiB pages.
const PmemAlign = 2 << 20

const (
	imagesSub = "images" // <key>.erofs, complete images only
	locksSub  = "locks"  // <key>.lock, held while the image is built
	tmpSub    = "tmp"    // <key>.<random>, images being built
	imageExt  = ".erofs"
	evictLock = "evict.lock"
)

// mkfsErofs is the image builder; tests count its runs through a wrapper.
var mkfsErofs = "mkfs.erofs"

// ImageCache keeps read-only EROFS images of container root filesystems in a
// directory, keyed by [ContentKey]. It is safe for concurrent use by
// goroutines and processes sharing the directory: an image is built once,
// under a per-key lock file, into a temporary file that is renamed into place
// when complete. Every [Image] holds a shared flock on its file while in use;
// eviction, which removes the least recently used images while their total
// size exceeds the bound, skips any image so held.
type ImageCache struct {
	dir      string
	maxBytes int64
}

// Image is a complete EROFS image held in an [ImageCache]. It stays held, and
// so is never evicted, until Release; the hold travels with the open file
// description of [Image.File], so a VMM that inherits that descriptor keeps
// the image held for as long as it runs.
type Image struct {
	// Path is the image file, to attach read-only through virtio-pmem.
	Path string
	// Size is the file's size, a multiple of [PmemAlign].
	Size int64
	// Key is the content key the image was built for.
	Key string

	mu sync.Mutex
	f  *os.File // read-only, shared flock held; nil once released
}

// OpenImageCache opens (creating it if needed) the image cache at dir, which
// evicts unused images once their total size exceeds maxBytes (0 or less:
// never). Leftovers of builds that crashed are removed.
func OpenImageCache(dir string, maxBytes int64) (*ImageCache, error) {
	for _, sub := range []string{imagesSub, locksSub, tmpSub} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o700); err != nil {
			return nil, fmt.Errorf("creating image cache: %w", err)
		}
	}
	c := &ImageCache{dir: dir, maxBytes: maxBytes}
	if err := c.removeStale(""); err != nil {
		return nil, err
	}
	return c, nil
}

// Get returns a held image of the tree at rootfsDir, building it with
// mkfs.erofs unless the cache already has one with the same content key.
// Concurrent Gets of one key, in any process, build it once; the others wait
// for that build, or until ctx ends. The caller must Release the image.
func (c *ImageCache) Get(ctx context.Context, rootfsDir string) (*Image, error) {
	key, err := ContentKey(rootfsDir)
	if err != nil {
		return nil, fmt.Errorf("computing content key: %w", err)
	}
	if im, err := c.Open(ctx, key); !errors.Is(err, ErrNotExist) {
		return im, err
	}
	lk, err := lockPath(ctx, filepath.Join(c.dir, locksSub, key+".lock"), unix.LOCK_EX, true)
	if err != nil {
		return nil, fmt.Errorf("locking image %s: %w", key, err)
	}
	im, err := c.Open(ctx, key)
	if errors.Is(err, ErrNotExist) {
		im, err = c.build(ctx, key, rootfsDir)
	}
	lk.Close()
	if err != nil {
		return nil, err
	}
	// Eviction is best effort: an image that cannot be removed now is
	// considered again after the next build or by an explicit Evict.
	_ = c.Evict()
	return im, nil
}

// Open returns the held image with the given key, or an error wrapping
// [ErrNotExist] if the cache has none. It marks the image as just used.
func (c *ImageCache) Open(ctx context.Context, key string) (*Image, error) {
	path := c.imagePath(key)
	f, err := lockPath(ctx, path, unix.LOCK_SH, false)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("image %s: %w", key, ErrNotExist)
	}
	if err != nil {
		return nil, fmt.Errorf("opening image %s: %w", key, err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("opening image %s: %w", key, err)
	}
	now := time.Now()
	if err := os.Chtimes(path, now, now); err != nil {
		f.Close()
		return nil, fmt.Errorf("marking image %s used: %w", key, err)
	}
	return &Image{Path: path, Size: fi.Size(), Key: key, f: f}, nil
}

// build makes the image for key from the tree at src.
// Preconditions: the key's lock file is held exclusively.
func (c *ImageCache) build(ctx context.Context, key, src string) (*Image, error) {
	if err := c.removeStale(key); err != nil {
		return nil, err
	}
	tmp, err := c.createTemp(key)
	if err != nil {
		return nil, fmt.Errorf("building image %s: %w", key, err)
	}
	im, err := c.buildInto(ctx, tmp, key, src)
	tmp.Close()
	if err != nil {
		os.Remove(tmp.Name())
		return nil, fmt.Errorf("building image %s from %s: %w", key, src, err)
	}
	return im, nil
}

func (c *ImageCache) buildInto(ctx context.Context, tmp *os.File, key, src string) (*Image, error) {
	cmd := exec.CommandContext(ctx, mkfsErofs, "--quiet", "-Enoinline_data", "--preserve-mtime", tmp.Name(), src)
	// Cancelling kills the builder's whole process group, so no child of it
	// holds the output pipe open.
	cmd.SysProcAttr = &unix.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return unix.Kill(-cmd.Process.Pid, unix.SIGKILL) }
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("mkfs.erofs: %w: %s", err, strings.TrimSpace(string(out)))
	}
	fi, err := tmp.Stat()
	if err != nil {
		return nil, err
	}
	size := (fi.Size() + PmemAlign - 1) / PmemAlign * PmemAlign
	if size == 0 {
		size = PmemAlign
	}
	if err := tmp.Truncate(size); err != nil {
		return nil, fmt.Errorf("padding: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return nil, fmt.Errorf("syncing: %w", err)
	}
	// Hold a read-only descriptor of the same file before it becomes
	// visible, so that no evictor can take it in between.
	ro, err := os.Open(fmt.Sprintf("/proc/self/fd/%d", tmp.Fd()))
	if err != nil {
		return nil, fmt.Errorf("reopening: %w", err)
	}
	if _, err := tryLock(ro, unix.LOCK_SH); err != nil {
		ro.Close()
		return nil, err
	}
	path := c.imagePath(key)
	if err := os.Rename(tmp.Name(), path); err != nil {
		ro.Close()
		return nil, err
	}
	if err := syncDir(filepath.Dir(path)); err != nil {
		ro.Close()
		return nil, err
	}
	return &Image{Path: path, Size: size, Key: key, f: ro}, nil
}

// createTemp creates a temporary file for key's image holding a shared lock:
// the lock marks it as in use from birth, since cleaners and evictors need it
// exclusively. A file a cleaner removed before the lock was taken is
// replaced.
func (c *ImageCache) createTemp(key string) (*os.File, error) {
	for {
		tmp, err := os.CreateTemp(filepath.Join(c.dir, tmpSub), key+".*")
		if err != nil {
			return nil, err
		}
		if _, err := tryLock(tmp, unix.LOCK_SH); err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
			return nil, err
		}
		same, err := sameFile(tmp, tmp.Name())
		if same {
			return tmp, nil
		}
		tmp.Close()
		if err != nil {
			return nil, err
		}
	}
}

// removeStale removes the temporary files of builds that no longer run (for
// the given key, or for all keys if key is ""): a build holds its file
// locked, so a file that can be locked exclusively is a crash's leftover.
func (c *ImageCache) removeStale(key string) error {
	entries, err := os.ReadDir(filepath.Join(c.dir, tmpSub))
	if err != nil {
		return fmt.Errorf("cleaning image cache: %w", err)
	}
	for _, e := range entries {
		if key != "" && !strings.HasPrefix(e.Name(), key+".") {
			continue
		}
		path := filepath.Join(c.dir, tmpSub, e.Name())
		f, err := os.Open(path)
		if err != nil {
			continue // removed by another cleaner
		}
		if ok, _ := tryLock(f, unix.LOCK_EX); ok {
			os.Remove(path)
		}
		f.Close()
	}
	return nil
}

// Evict removes the least recently used images that no one holds until the
// images' total size is within the cache's bound, or only held images are
// left.
func (c *ImageCache) Evict() error {
	if c.maxBytes <= 0 {
		return nil
	}
	lk, err := lockPath(context.Background(), filepath.Join(c.dir, evictLock), unix.LOCK_EX, true)
	if err != nil {
		return fmt.Errorf("evicting images: %w", err)
	}
	defer lk.Close()
	type entry struct {
		key   string
		size  int64
		mtime time.Time
	}
	dirents, err := os.ReadDir(filepath.Join(c.dir, imagesSub))
	if err != nil {
		return fmt.Errorf("evicting images: %w", err)
	}
	var images []entry
	var total int64
	for _, d := range dirents {
		key, ok := strings.CutSuffix(d.Name(), imageExt)
		if !ok {
			continue
		}
		fi, err := d.Info()
		if err != nil {
			continue
		}
		// Count the space an image takes, not its apparent size: images
		// are padded (sparse) to a virtio-pmem region's size.
		size := fi.Size()
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			size = st.Blocks * 512
		}
		images = append(images, entry{key, size, fi.ModTime()})
		total += size
	}
	slices.SortFunc(images, func(a, b entry) int { return a.mtime.Compare(b.mtime) })
	var errs []error
	for _, im := range images {
		if total <= c.maxBytes {
			break
		}
		removed, err := c.remove(im.key)
		if err != nil {
			errs = append(errs, err)
		}
		if removed {
			total -= im.size
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("evicting images: %w", err)
	}
	return nil
}

// remove deletes the image with the given key, and its lock file, unless
// someone holds it.
func (c *ImageCache) remove(key string) (bool, error) {
	path := c.imagePath(key)
	f, err := os.Open(path)
	if err != nil {
		return false, nil
	}
	defer f.Close()
	if ok, err := tryLock(f, unix.LOCK_EX); !ok || err != nil {
		return false, err
	}
	if same, err := sameFile(f, path); !same || err != nil {
		return false, err
	}
	if err := os.Remove(path); err != nil {
		return false, err
	}
	lpath := filepath.Join(c.dir, locksSub, key+".lock")
	if l, err := os.Open(lpath); err == nil {
		if ok, _ := tryLock(l, unix.LOCK_EX); ok {
			if same, _ := sameFile(l, lpath); same {
				os.Remove(lpath)
			}
		}
		l.Close()
	}
	return true, nil
}

func (c *ImageCache) imagePath(key string) string {
	return filepath.Join(c.dir, imagesSub, key+imageExt)
}

// File returns the image's read-only file, which carries the hold, or nil
// once the image is released. Hand it to the VMM (as an inherited
// descriptor) to keep the image held for the VM's lifetime.
func (im *Image) File() *os.File {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.f
}

// Release drops this process's hold on the image. The image stays held while
// any other descriptor of the same open file (one a VMM inherited) is open.
func (im *Image) Release() error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.f == nil {
		return ErrReleased
	}
	err := im.f.Close()
	im.f = nil
	if err != nil {
		return fmt.Errorf("releasing image %s: %w", im.Key, err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", dir, err)
	}
	return nil
}
