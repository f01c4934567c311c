package rootfs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// countBuilds makes the cache build through a wrapper of mkfs.erofs that
// counts its runs and stalls for a moment (widening any race between
// concurrent Gets), and returns a function reporting the count.
func countBuilds(t *testing.T, stall string) func() int {
	t.Helper()
	requires(t, false, "mkfs.erofs", "fsck.erofs")
	dir := t.TempDir()
	count := filepath.Join(dir, "count")
	script := filepath.Join(dir, "mkfs.erofs")
	body := fmt.Sprintf("#!/bin/sh\necho >> %s\nsleep %s\nexec mkfs.erofs \"$@\"\n", count, stall)
	mustDo(t, os.WriteFile(script, []byte(body), 0o755))
	old := mkfsErofs
	mkfsErofs = script
	t.Cleanup(func() { mkfsErofs = old })
	return func() int {
		b, err := os.ReadFile(count)
		if errors.Is(err, os.ErrNotExist) {
			return 0
		}
		mustDo(t, err)
		return strings.Count(string(b), "\n")
	}
}

func openCache(t *testing.T, dir string, maxBytes int64) *ImageCache {
	t.Helper()
	c, err := OpenImageCache(dir, maxBytes)
	if err != nil {
		t.Fatalf("OpenImageCache: %v", err)
	}
	return c
}

func get(t *testing.T, c *ImageCache, dir string) *Image {
	t.Helper()
	im, err := c.Get(context.Background(), dir)
	if err != nil {
		t.Fatalf("Get(%s): %v", dir, err)
	}
	t.Cleanup(func() { im.Release() })
	return im
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	mustDo(t, unix.Stat(path, &st))
	return st.Ino
}

// checkImage checks the image with fsck.erofs and that it holds the files.
func checkImage(t *testing.T, im *Image, files map[string]string) {
	t.Helper()
	if im.Size <= 0 || im.Size%PmemAlign != 0 {
		t.Errorf("image size %d, want a positive multiple of %d", im.Size, PmemAlign)
	}
	if fi, err := os.Stat(im.Path); err != nil || fi.Size() != im.Size {
		t.Errorf("image file: %v, %v; want size %d", fi, err, im.Size)
	}
	out := filepath.Join(t.TempDir(), "x")
	run(t, "fsck.erofs", "--extract="+out, im.Path)
	for name, want := range files {
		got, err := os.ReadFile(filepath.Join(out, name))
		if err != nil || string(got) != want {
			t.Errorf("%s in image: %q, %v; want %q", name, got, err, want)
		}
	}
}

var testFiles = map[string]string{"etc/os-release": "ID=test\n", "bin/sh": "shell"}

func TestImageCacheGet(t *testing.T) {
	builds := countBuilds(t, "0")
	c := openCache(t, t.TempDir(), 0)
	src := t.TempDir()
	writeTree(t, src, testFiles)

	im1 := get(t, c, src)
	checkImage(t, im1, testFiles)
	mustDo(t, im1.Release())
	if err := im1.Release(); !errors.Is(err, ErrReleased) {
		t.Errorf("second Release: got %v, want %v", err, ErrReleased)
	}
	im2 := get(t, c, src)
	if im2.Path != im1.Path || im2.Key != im1.Key || builds() != 1 {
		t.Errorf("second Get: path %s key %s after %d builds, want %s %s after 1", im2.Path, im2.Key, builds(), im1.Path, im1.Key)
	}
	if im2.File() == nil {
		t.Errorf("held image has no file")
	}

	// A content change is a new key, and a new image beside the old.
	mustDo(t, os.WriteFile(filepath.Join(src, "bin/sh"), []byte("new shell"), 0o755))
	im3 := get(t, c, src)
	if im3.Key == im1.Key || builds() != 2 {
		t.Errorf("Get after a change: key %s after %d builds, want a new key after 2", im3.Key, builds())
	}
	checkImage(t, im3, map[string]string{"bin/sh": "new shell"})
	if _, err := os.Stat(im1.Path); err != nil {
		t.Errorf("old image: %v", err)
	}
}

// TestImageCacheConcurrentGets gets one tree from many goroutines through
// two caches on one directory (as two processes would): one build, one file.
func TestImageCacheConcurrentGets(t *testing.T) {
	builds := countBuilds(t, "0.3")
	dir := t.TempDir()
	caches := []*ImageCache{openCache(t, dir, 0), openCache(t, dir, 0)}
	src := t.TempDir()
	writeTree(t, src, testFiles)

	images := make([]*Image, 8)
	errs := make([]error, len(images))
	var wg sync.WaitGroup
	for i := range images {
		wg.Go(func() {
			images[i], errs[i] = caches[i%2].Get(context.Background(), src)
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("Get %d: %v", i, err)
		}
		defer images[i].Release()
	}
	if n := builds(); n != 1 {
		t.Errorf("got %d builds, want 1", n)
	}
	want := inode(t, images[0].Path)
	for i, im := range images {
		var st unix.Stat_t
		mustDo(t, unix.Fstat(int(im.File().Fd()), &st))
		if st.Ino != want || im.Path != images[0].Path {
			t.Errorf("image %d: %s inode %d, want %s inode %d", i, im.Path, st.Ino, images[0].Path, want)
		}
	}
	checkImage(t, images[0], testFiles)
}

// TestImageCacheLeftovers checks that a build that crashed leaves nothing
// that is ever used, and that its leftovers are cleaned, while a build in
// progress elsewhere is left alone.
func TestImageCacheLeftovers(t *testing.T) {
	builds := countBuilds(t, "0")
	dir := t.TempDir()
	src := t.TempDir()
	writeTree(t, src, testFiles)
	key, err := ContentKey(src)
	mustDo(t, err)

	c := openCache(t, dir, 0)
	crashed := filepath.Join(dir, tmpSub, key+".123")
	mustDo(t, os.WriteFile(crashed, []byte("half an image"), 0o600))
	running := filepath.Join(dir, tmpSub, "otherkey.456")
	mustDo(t, os.WriteFile(running, []byte("being built"), 0o600))
	f, err := os.Open(running)
	mustDo(t, err)
	defer f.Close()
	mustDo(t, unix.Flock(int(f.Fd()), unix.LOCK_SH))

	if _, err := c.Open(context.Background(), key); !errors.Is(err, ErrNotExist) {
		t.Errorf("Open with only a leftover: got %v, want %v", err, ErrNotExist)
	}
	im := get(t, c, src)
	if builds() != 1 {
		t.Errorf("got %d builds, want 1", builds())
	}
	checkImage(t, im, testFiles)
	if _, err := os.Stat(crashed); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("leftover of the key built: %v, want it removed", err)
	}

	mustDo(t, os.WriteFile(crashed, []byte("half an image"), 0o600))
	openCache(t, dir, 0)
	if _, err := os.Stat(crashed); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("leftover after OpenImageCache: %v, want it removed", err)
	}
	if _, err := os.Stat(running); err != nil {
		t.Errorf("locked temporary file: %v, want it kept", err)
	}
}

// TestImageCacheBuildFails checks a build that fails or is cancelled midway:
// an error, no image, no temporary file.
func TestImageCacheBuildFails(t *testing.T) {
	countBuilds(t, "30")
	dir := t.TempDir()
	c := openCache(t, dir, 0)
	src := t.TempDir()
	writeTree(t, src, testFiles)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if im, err := c.Get(ctx, src); err == nil {
		im.Release()
		t.Fatal("Get with a build cancelled midway: got no error")
	}
	for _, sub := range []string{imagesSub, tmpSub} {
		entries, err := os.ReadDir(filepath.Join(dir, sub))
		mustDo(t, err)
		if len(entries) != 0 {
			t.Errorf("%s holds %v after a failed build, want nothing", sub, entries)
		}
	}
}

// TestImageCacheEviction builds 2 MiB images in a cache bounded to 5 MiB:
// the least recently used unheld images go, held ones stay even above the
// bound.
func TestImageCacheEviction(t *testing.T) {
	countBuilds(t, "0")
	dir := t.TempDir()
	srcs := map[string]string{}
	for _, name := range []string{"a", "b", "c", "d", "e"} {
		srcs[name] = t.TempDir()
		writeTree(t, srcs[name], map[string]string{"name": name})
	}
	// The bound counts the space images take (they are sparse): room for
	// two and a half of them, measured on a probe.
	probe := get(t, openCache(t, t.TempDir(), 0), srcs["a"])
	var st syscall.Stat_t
	mustDo(t, syscall.Stat(probe.Path, &st))
	mustDo(t, probe.Release())
	c := openCache(t, dir, st.Blocks*512*5/2)
	exists := func(im *Image) bool {
		_, err := os.Stat(im.Path)
		return err == nil
	}
	age := func(im *Image, d time.Duration) {
		t.Helper()
		old := time.Now().Add(-d)
		mustDo(t, os.Chtimes(im.Path, old, old))
	}

	a := get(t, c, srcs["a"])
	mustDo(t, a.Release())
	age(a, time.Hour)
	b := get(t, c, srcs["b"])
	mustDo(t, b.Release())
	age(b, time.Minute)
	cc := get(t, c, srcs["c"]) // 6 MiB: a, the oldest, goes
	if exists(a) || !exists(b) || !exists(cc) {
		t.Errorf("after c: a %v b %v c %v, want false true true", exists(a), exists(b), exists(cc))
	}
	// a again is a miss that evicts b; c is held.
	age(cc, 2*time.Hour)
	a2 := get(t, c, srcs["a"])
	if exists(b) || !exists(cc) || !exists(a2) {
		t.Errorf("after a again: b %v c %v a %v, want false true true", exists(b), exists(cc), exists(a2))
	}
	// Everything held: the bound gives way.
	d := get(t, c, srcs["d"])
	if !exists(cc) || !exists(a2) || !exists(d) {
		t.Errorf("all held: c %v a %v d %v, want true true true", exists(cc), exists(a2), exists(d))
	}
	mustDo(t, cc.Release())
	mustDo(t, c.Evict())
	if exists(cc) || !exists(a2) || !exists(d) {
		t.Errorf("c released: c %v a %v d %v, want false true true", exists(cc), exists(a2), exists(d))
	}
	if _, err := c.Open(context.Background(), cc.Key); !errors.Is(err, ErrNotExist) {
		t.Errorf("Open of an evicted image: got %v, want %v", err, ErrNotExist)
	}
	if _, err := os.Stat(filepath.Join(dir, locksSub, cc.Key+".lock")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("lock file of an evicted image: %v, want it removed", err)
	}
}

// TestImageCacheGetOverlay builds the image of a podman-style overlay root:
// it holds the merged tree.
func TestImageCacheGetOverlay(t *testing.T) {
	countBuilds(t, "0")
	layers := t.TempDir()
	top, bottom := filepath.Join(layers, "top"), filepath.Join(layers, "bottom")
	writeTree(t, bottom, testFiles)
	writeTree(t, top, map[string]string{"bin/sh": "top shell"})
	merged := mountOverlay(t, []string{top, bottom}, t.TempDir())
	c := openCache(t, t.TempDir(), 0)
	im := get(t, c, merged)
	checkImage(t, im, map[string]string{"bin/sh": "top shell", "etc/os-release": testFiles["etc/os-release"]})
}
