package rootfs

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const testDiskSize = 64 << 20

func openStore(t *testing.T, dir string, opts WritableOptions) *WritableStore {
	t.Helper()
	requires(t, false, "mkfs.ext4")
	s, err := OpenWritableStore(context.Background(), dir, testDiskSize, opts)
	if err != nil {
		t.Fatalf("OpenWritableStore: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func newDisk(t *testing.T, s *WritableStore) *os.File {
	t.Helper()
	f, err := s.New()
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// e2fsck checks the filesystem in an open disk file, passed as an inherited
// descriptor since the file has no name.
func e2fsck(t *testing.T, f *os.File) {
	t.Helper()
	cmd := exec.Command("e2fsck", "-fn", "/dev/fd/3")
	cmd.ExtraFiles = []*os.File{f}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("e2fsck: %v: %s", err, out)
	}
}

func readAt(t *testing.T, f *os.File, off int64, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatalf("reading %s at %d: %v", f.Name(), off, err)
	}
	return b
}

func TestSupportsReflink(t *testing.T) {
	tests := []struct {
		name string
		dir  func(t *testing.T) string
		want bool
	}{
		{"temp dir (ext4 or tmpfs)", func(t *testing.T) string { return t.TempDir() }, false},
		{"xfs reflink=1", reflinkDir, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := SupportsReflink(tt.dir(t))
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("got %v, want %v", got, tt.want)
			}
		})
	}
}

// TestWritableDisks covers both ways of making a disk: every disk is a
// valid, empty ext4 filesystem, equal to the base, and independent of the
// base and of the other disks. Without reflink the store copies sparsely and
// warns exactly once.
func TestWritableDisks(t *testing.T) {
	tests := []struct {
		name        string
		dir         func(t *testing.T) string
		noReflink   bool
		wantReflink bool
	}{
		{"xfs reflink", reflinkDir, false, true},
		{"xfs forced copy", reflinkDir, true, false},
		{"no reflink fs", func(t *testing.T) string { return t.TempDir() }, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			requires(t, false, "e2fsck")
			var mu sync.Mutex
			var warnings []string
			s := openStore(t, tt.dir(t), WritableOptions{
				NoReflink: tt.noReflink,
				Logf: func(format string, args ...any) {
					mu.Lock()
					defer mu.Unlock()
					warnings = append(warnings, fmt.Sprintf(format, args...))
				},
			})
			if s.Reflink() != tt.wantReflink {
				t.Fatalf("Reflink() = %v, want %v", s.Reflink(), tt.wantReflink)
			}
			base, err := os.Open(s.BasePath())
			if err != nil {
				t.Fatal(err)
			}
			defer base.Close()
			baseHead := readAt(t, base, 0, 1<<20)

			a, b, c := newDisk(t, s), newDisk(t, s), newDisk(t, s)
			for _, d := range []*os.File{a, b, c} {
				fi, err := d.Stat()
				if err != nil {
					t.Fatal(err)
				}
				if fi.Size() != testDiskSize {
					t.Errorf("disk size %d, want %d", fi.Size(), testDiskSize)
				}
				if !bytes.Equal(readAt(t, d, 0, 1<<20), baseHead) {
					t.Errorf("disk head differs from the base image")
				}
				e2fsck(t, d)
			}
			// The disks are nameless: nothing but the base is left in dir.
			entries, err := os.ReadDir(filepath.Dir(s.BasePath()))
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range entries {
				if e.Name() != filepath.Base(s.BasePath()) && e.Name() != "lost+found" {
					t.Errorf("unexpected file %s in the store", e.Name())
				}
			}

			// Write into a: b, c and the base keep their contents.
			junk := bytes.Repeat([]byte{0xa5}, 8192)
			if _, err := a.WriteAt(junk, 0); err != nil {
				t.Fatal(err)
			}
			if _, err := a.WriteAt(junk, testDiskSize/2); err != nil {
				t.Fatal(err)
			}
			if err := a.Sync(); err != nil {
				t.Fatal(err)
			}
			for name, f := range map[string]*os.File{"other disk": b, "base": base} {
				if !bytes.Equal(readAt(t, f, 0, 1<<20), baseHead) {
					t.Errorf("%s changed by a write to a disk", name)
				}
				if bytes.Equal(readAt(t, f, testDiskSize/2, len(junk)), junk) {
					t.Errorf("%s changed by a write to a disk", name)
				}
			}
			e2fsck(t, c)

			wantWarnings := 0
			if !tt.wantReflink {
				wantWarnings = 1
				var st, bst unix.Stat_t
				if err := unix.Fstat(int(c.Fd()), &st); err != nil {
					t.Fatal(err)
				}
				if err := unix.Fstat(int(base.Fd()), &bst); err != nil {
					t.Fatal(err)
				}
				if st.Blocks > bst.Blocks {
					t.Errorf("copy allocates %d blocks, base %d: not sparse", st.Blocks, bst.Blocks)
				}
			}
			mu.Lock()
			defer mu.Unlock()
			if len(warnings) != wantWarnings {
				t.Errorf("got %d warnings %q, want %d", len(warnings), warnings, wantWarnings)
			}
		})
	}
}

// TestWritableSpaceReturned checks that a disk's blocks go back to the
// filesystem once its descriptor is closed.
func TestWritableSpaceReturned(t *testing.T) {
	dir := reflinkDir(t)
	s := openStore(t, dir, WritableOptions{})
	before := freeBytes(t, dir)
	var disks []*os.File
	chunk := bytes.Repeat([]byte{1}, 1<<20)
	for range 4 {
		d, err := s.New()
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		disks = append(disks, d)
		for off := int64(0); off < 16<<20; off += int64(len(chunk)) {
			if _, err := d.WriteAt(chunk, off); err != nil {
				t.Fatal(err)
			}
		}
		if err := d.Sync(); err != nil {
			t.Fatal(err)
		}
	}
	during := freeBytes(t, dir)
	if before-during < 3*16<<20 {
		t.Fatalf("free space went from %d to %d with 64 MiB written to disks", before, during)
	}
	for _, d := range disks {
		d.Close()
	}
	// XFS frees an unlinked file's blocks in the background (statfs only
	// hastens it), so poll; it may keep a few metadata blocks for itself.
	after := freeBytes(t, dir)
	for i := 0; i < 100 && after < before-1<<20; i++ {
		time.Sleep(50 * time.Millisecond)
		after = freeBytes(t, dir)
	}
	if after < before-1<<20 {
		t.Errorf("free space %d after closing the disks, %d before", after, before)
	}
}

// freeBytes returns the free space of the filesystem holding dir, after
// syncfs has flushed the deferred inode inactivation that returns an
// unlinked file's blocks.
func freeBytes(t *testing.T, dir string) int64 {
	t.Helper()
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Syncfs(fd); err != nil {
		t.Fatal(err)
	}
	var st unix.Statfs_t
	if err := unix.Fstatfs(fd, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Bfree) * st.Bsize
}

// TestOpenWritableStoreConcurrent opens one store from many goroutines at
// once: one base image results and no temporary file is left.
func TestOpenWritableStoreConcurrent(t *testing.T) {
	requires(t, false, "mkfs.ext4")
	dir := t.TempDir()
	// A crash's leftover: unlocked and old, so removed.
	leftover := filepath.Join(dir, ".base-1.tmp")
	if err := os.WriteFile(leftover, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	old := time.Now().Add(-time.Hour)
	if err := os.Chtimes(leftover, old, old); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make([]error, 6)
	for i := range errs {
		wg.Go(func() {
			s, err := OpenWritableStore(context.Background(), dir, testDiskSize, WritableOptions{})
			if err == nil {
				s.Close()
			}
			errs[i] = err
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("opener %d: %v", i, err)
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	want := fmt.Sprintf("base-%s-%d.ext4", ext4Version, testDiskSize)
	if len(names) != 1 || names[0] != want {
		t.Errorf("got files %v, want [%s]", names, want)
	}
}

func TestFormatExt4(t *testing.T) {
	requires(t, false, "mkfs.ext4", "dumpe2fs")
	path := filepath.Join(t.TempDir(), "disk")
	if err := FormatExt4(context.Background(), path, testDiskSize); err != nil {
		t.Fatal(err)
	}
	out := run(t, "dumpe2fs", "-h", path)
	for _, want := range []string{"Block size:               4096", "Reserved block count:     0", "Filesystem volume name:   rund-rw"} {
		if !strings.Contains(out, want) {
			t.Errorf("dumpe2fs output lacks %q", want)
		}
	}
	if strings.Contains(out, "has_journal") {
		t.Errorf("filesystem has a journal")
	}
}

func TestOpenWritableStoreBadSize(t *testing.T) {
	for _, size := range []int64{0, 4096, 1<<20 + 1} {
		if _, err := OpenWritableStore(context.Background(), t.TempDir(), size, WritableOptions{}); err == nil {
			t.Errorf("size %d: got no error", size)
		}
	}
}
