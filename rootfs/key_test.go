package rootfs

import (
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func contentKey(t *testing.T, dir string) string {
	t.Helper()
	k, err := ContentKey(dir)
	if err != nil {
		t.Fatalf("ContentKey(%s): %v", dir, err)
	}
	return k
}

func TestContentKey(t *testing.T) {
	old := time.Date(2020, 1, 2, 3, 4, 5, 6, time.UTC)
	tests := []struct {
		name   string
		change func(t *testing.T, dir string)
		same   bool
	}{
		{"nothing", func(t *testing.T, dir string) {}, true},
		{"atime only", func(t *testing.T, dir string) {
			mustDo(t, os.Chtimes(filepath.Join(dir, "etc/os-release"), time.Now(), old))
		}, true},
		{"identical copy elsewhere", nil, true},
		{"mtime", func(t *testing.T, dir string) {
			mustDo(t, os.Chtimes(filepath.Join(dir, "etc/os-release"), old, old.Add(time.Nanosecond)))
		}, false},
		{"size", func(t *testing.T, dir string) {
			p := filepath.Join(dir, "bin/sh")
			mustDo(t, os.WriteFile(p, []byte("longer shell"), 0o755))
			mustDo(t, os.Chtimes(p, old, old))
		}, false},
		{"mode", func(t *testing.T, dir string) {
			mustDo(t, os.Chmod(filepath.Join(dir, "bin/sh"), 0o700))
		}, false},
		{"owner", func(t *testing.T, dir string) {
			if os.Geteuid() != 0 {
				t.Skip("skipping: chown needs root")
			}
			mustDo(t, os.Lchown(filepath.Join(dir, "bin/sh"), 1000, 1000))
		}, false},
		{"new empty file", func(t *testing.T, dir string) {
			mustDo(t, os.WriteFile(filepath.Join(dir, "etc/new"), nil, 0o644))
		}, false},
		{"rename", func(t *testing.T, dir string) {
			mustDo(t, os.Rename(filepath.Join(dir, "etc/os-release"), filepath.Join(dir, "etc/os-releasf")))
		}, false},
		{"symlink target", func(t *testing.T, dir string) {
			p := filepath.Join(dir, "usr/bin/sh")
			mustDo(t, os.Remove(p))
			mustDo(t, os.Symlink("/bin/dash", p))
		}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := makeTree(t, old)
			before := contentKey(t, dir)
			if tt.change == nil {
				dir = makeTree(t, old)
			} else {
				tt.change(t, dir)
			}
			after := contentKey(t, dir)
			if (before == after) != tt.same {
				t.Errorf("key before %s, after %s: want same=%v", before, after, tt.same)
			}
		})
	}
}

// makeTree makes a small root filesystem whose entries all have the given
// modification time, so that two calls make trees with equal keys.
func makeTree(t *testing.T, mtime time.Time) string {
	t.Helper()
	dir := t.TempDir()
	writeTree(t, dir, map[string]string{
		"etc/os-release": "ID=test\n",
		"bin/sh":         "shell",
		"usr/lib/libc":   strings.Repeat("x", 5000),
	})
	mustDo(t, os.Chmod(filepath.Join(dir, "bin/sh"), 0o755))
	mustDo(t, os.MkdirAll(filepath.Join(dir, "usr/bin"), 0o755))
	mustDo(t, os.Symlink("/bin/sh", filepath.Join(dir, "usr/bin/sh")))
	// Directories last: creating entries changes their parents' mtimes.
	var paths []string
	mustDo(t, filepath.Walk(dir, func(p string, _ os.FileInfo, err error) error {
		paths = append(paths, p)
		return err
	}))
	for i := len(paths) - 1; i >= 0; i-- {
		mustDo(t, exec.Command("touch", "-h", "-d", mtime.Format(time.RFC3339Nano), paths[i]).Run())
	}
	return dir
}

func mustDo(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestContentKeyOverlay checks the podman case: an overlay mount is keyed by
// its lower layers and upper tree, so two containers of one image (same
// lowers, fresh uppers) share a key, and writes through the overlay change
// it.
func TestContentKeyOverlay(t *testing.T) {
	requires(t, true)
	layers := t.TempDir()
	var lower []string
	for i, files := range []map[string]string{
		{"etc/hostname": "top\n"},
		{"etc/os-release": "ID=test\n", "bin/sh": "shell"},
	} {
		d := filepath.Join(layers, "l"+string(rune('0'+i)))
		writeTree(t, d, files)
		lower = append(lower, d)
	}
	upper1, upper2 := t.TempDir(), t.TempDir()
	m1 := mountOverlay(t, lower, upper1)
	m2 := mountOverlay(t, lower, upper2)
	k1, k2 := contentKey(t, m1), contentKey(t, m2)
	if k1 != k2 {
		t.Errorf("two overlays of the same layers: keys %s and %s differ", k1, k2)
	}
	// The overlay key does not come from a walk of the merged view.
	if w, err := treeKey(m1); err != nil || w == k1 {
		t.Errorf("overlay key %s, tree walk key %s (error %v): want different", k1, w, err)
	}
	mustDo(t, os.WriteFile(filepath.Join(m2, "etc/new"), []byte("x"), 0o644))
	if k := contentKey(t, m2); k == k1 {
		t.Errorf("key unchanged by a write into the overlay")
	}
	mustDo(t, os.Remove(filepath.Join(m1, "etc/hostname")))
	if k := contentKey(t, m1); k == k1 {
		t.Errorf("key unchanged by a whiteout in the upper layer")
	}
}

func TestParseOverlayAt(t *testing.T) {
	const (
		plain   = "36 25 0:32 / /mnt/m rw,relatime shared:1 - overlay overlay rw,lowerdir=/l/a:/l/b,upperdir=/u,workdir=/w\n"
		escaped = `36 25 0:32 / /mnt/with\040space rw - overlay overlay rw,lowerdir=/l/x\134:y:/l/c\054d,upperdir=/u\040v,workdir=/w` + "\n"
		stacked = "36 25 0:32 / /mnt/m rw - overlay overlay rw,lowerdir=/l/a,upperdir=/u,workdir=/w\n" +
			"37 36 0:33 / /mnt/m rw - tmpfs tmpfs rw\n"
		under = "36 25 0:33 / /mnt/m rw - tmpfs tmpfs rw\n" +
			"37 36 0:32 / /mnt/m rw - overlay overlay rw,lowerdir=/l/a,upperdir=/u,workdir=/w\n"
		relative  = "36 25 0:32 / /s/overlay/c1/merged rw - overlay overlay rw,lowerdir=l/A:l/B,upperdir=c1/diff,workdir=c1/work\n"
		lowerPlus = "36 25 0:32 / /mnt/m rw - overlay overlay rw,lowerdir+=/l/a,lowerdir+=/l/b,datadir+=/d\n"
		dataOnly  = "36 25 0:32 / /mnt/m ro - overlay overlay ro,lowerdir=/l/a::/d\n"
	)
	exists := func(p string) bool {
		return p == "/s/overlay/l/A" || p == "/s/overlay/l/B" || p == "/s/overlay/c1/diff"
	}
	tests := []struct {
		name, table, dir string
		want             *overlayMount
	}{
		{"plain", plain, "/mnt/m", &overlayMount{lower: []string{"/l/a", "/l/b"}, upper: "/u"}},
		{"other mount point", plain, "/mnt", nil},
		{"escaped", escaped, "/mnt/with space", &overlayMount{lower: []string{"/l/x:y", "/l/c,d"}, upper: "/u v"}},
		{"tmpfs on top", stacked, "/mnt/m", nil},
		{"overlay on top", under, "/mnt/m", &overlayMount{lower: []string{"/l/a"}, upper: "/u"}},
		{"relative paths", relative, "/s/overlay/c1/merged", &overlayMount{
			lower: []string{"/s/overlay/l/A", "/s/overlay/l/B"}, upper: "/s/overlay/c1/diff"}},
		{"lowerdir+", lowerPlus, "/mnt/m", &overlayMount{lower: []string{"/l/a", "/l/b", "/d"}}},
		{"data-only layers", dataOnly, "/mnt/m", &overlayMount{lower: []string{"/l/a", "/d"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseOverlayAt(strings.NewReader(tt.table), tt.dir, exists)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}
