package rootfs

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// requires skips the test unless it runs as root (if root is set) and every
// named command is installed.
func requires(t *testing.T, root bool, cmds ...string) {
	t.Helper()
	if root && os.Geteuid() != 0 {
		t.Skip("skipping: needs root (mount, loop devices)")
	}
	for _, c := range cmds {
		if _, err := exec.LookPath(c); err != nil {
			t.Skipf("skipping: %s not installed", c)
		}
	}
}

// run runs a command and returns its standard output, failing the test on
// error.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).Output()
	if err != nil {
		msg := ""
		if ee := (*exec.ExitError)(nil); errors.As(err, &ee) {
			msg = string(ee.Stderr)
		}
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, msg)
	}
	return string(out)
}

// reflinkDir mounts a fresh XFS with reflink=1, on a loop device over a file
// in a temporary directory, and returns its mount point. The mount and the
// loop device are removed when the test ends, whether or not it passed.
func reflinkDir(t *testing.T) string {
	t.Helper()
	requires(t, true, "mkfs.xfs", "losetup", "mount", "umount")
	tmp := t.TempDir()
	img := filepath.Join(tmp, "xfs.img")
	f, err := os.OpenFile(img, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	err = f.Truncate(512 << 20)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	run(t, "mkfs.xfs", "-q", "-m", "reflink=1", img)
	dev := strings.TrimSpace(run(t, "losetup", "--find", "--show", img))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	mnt := filepath.Join(tmp, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	run(t, "mount", "-t", "xfs", dev, mnt)
	t.Cleanup(func() { unmount(t, mnt) })
	return mnt
}

// mountOverlay mounts an overlay of the given lower directories (top first)
// and upper directory at a new directory and returns it; the mount is
// removed when the test ends.
func mountOverlay(t *testing.T, lower []string, upper string) string {
	t.Helper()
	requires(t, true, "mount", "umount")
	tmp := t.TempDir()
	work := filepath.Join(tmp, "work")
	merged := filepath.Join(tmp, "merged")
	for _, d := range []string{work, merged} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	opts := "lowerdir=" + strings.Join(lower, ":") + ",upperdir=" + upper + ",workdir=" + work
	run(t, "mount", "-t", "overlay", "overlay", "-o", opts, merged)
	t.Cleanup(func() { unmount(t, merged) })
	return merged
}

func unmount(t *testing.T, dir string) {
	if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
		t.Errorf("umount %s: %v: %s", dir, err, out)
		if out, err := exec.Command("umount", "-l", dir).CombinedOutput(); err != nil {
			t.Errorf("umount -l %s: %v: %s", dir, err, out)
		}
	}
}

// writeTree creates files under dir from a map of relative path to content.
func writeTree(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
