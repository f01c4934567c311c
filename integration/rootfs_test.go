//go:build integration

package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// reflinkXFS mounts a fresh XFS with reflink=1 on a loop file and returns its
// mount point; it is unmounted and detached at cleanup.
func reflinkXFS(t *testing.T) string {
	t.Helper()
	for _, tool := range []string{"mkfs.xfs", "losetup"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s", tool)
		}
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "xfs.img")
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(3 << 30)
	f.Close()
	if out, err := exec.Command("mkfs.xfs", "-q", "-m", "reflink=1", img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.xfs: %v: %s", err, out)
	}
	if out, err := exec.Command("mount", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount: %v: %s", err, out)
	}
	t.Cleanup(func() {
		for i := 0; i < 50; i++ {
			if exec.Command("umount", mnt).Run() == nil {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
	return mnt
}

func freeBytes(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(path, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Bavail) * st.Bsize
}

// waitFree waits until path has at least want bytes free (XFS frees an
// unlinked file's blocks in the background).
func waitFree(t *testing.T, path string, want int64) int64 {
	t.Helper()
	var got int64
	for i := 0; i < 100; i++ {
		if got = freeBytes(t, path); got >= want {
			return got
		}
		time.Sleep(100 * time.Millisecond)
	}
	return got
}

// TestWritableLayer: a container's writes are visible to it, invisible to a
// second container of the same image, and their space returns to the host
// filesystem after delete — also when shim and VMM were SIGKILLed.
func TestWritableLayer(t *testing.T) {
	mnt := reflinkXFS(t)
	e := newEnv(t, fmt.Sprintf("data_dir = %q", filepath.Join(mnt, "rund")))
	if out := e.ok("check"); !strings.Contains(out, "supports FICLONE") {
		t.Errorf("rund check does not report reflink on XFS:\n%s", out)
	}
	b := bundle(t, "sleep", "1000")
	e.ok("run", "-d", "--bundle", b, "w1")
	e.ok("run", "-d", "--bundle", b, "w2")
	before := freeBytes(t, mnt)
	e.ok("exec", "w1", "sh", "-c", "dd if=/dev/urandom of=/big bs=1M count=64 2>/dev/null; echo mine > /bin/new-file; sync")
	if out := e.ok("exec", "w1", "cat", "/bin/new-file"); out != "mine\n" {
		t.Errorf("writer reads %q", out)
	}
	if r := e.run("", "exec", "w2", "cat", "/bin/new-file"); r.code == 0 {
		t.Errorf("second container sees the first one's file: %q", r.stdout)
	}
	used := before - freeBytes(t, mnt)
	if used < 60<<20 {
		t.Errorf("64 MiB written in the guest used only %d bytes on the host", used)
	}
	e.ok("delete", "--force", "w1")
	if got := waitFree(t, mnt, before-8<<20); got < before-8<<20 {
		t.Errorf("after delete: %d bytes free, want about %d", got, before)
	}
	// The same after a crash: SIGKILL the shim and the VMM, then delete --force.
	before = freeBytes(t, mnt)
	e.ok("exec", "w2", "sh", "-c", "dd if=/dev/urandom of=/big bs=1M count=64 2>/dev/null; sync")
	st := e.rawState("w2")
	for _, k := range []string{"shim", "vmm"} {
		syscall.Kill(int(st[k].(map[string]any)["pid"].(float64)), syscall.SIGKILL)
	}
	e.ok("delete", "--force", "w2")
	if got := waitFree(t, mnt, before-8<<20); got < before-8<<20 {
		t.Errorf("after a crash and delete --force: %d bytes free, want about %d", got, before)
	}
	// The image is kept for the next container of the same rootfs; the
	// writable layers are gone.
	if ents, _ := os.ReadDir(filepath.Join(mnt, "rund", "writable")); len(ents) > 2 {
		t.Errorf("writable directory holds %d entries after delete", len(ents))
	}
}

// TestReadonlyRoot: root.readonly makes the container's root read-only.
func TestReadonlyRoot(t *testing.T) {
	e := newEnv(t)
	b := bundle(t, "sh", "-c", "touch /x && echo writable; touch /tmp/y 2>/dev/null; exit 0")
	writeSpec(t, b, func(s map[string]any) {
		s["process"].(map[string]any)["args"] = []string{"sh", "-c", "touch /x 2>&1 || echo readonly"}
		s["process"].(map[string]any)["terminal"] = false
		s["root"].(map[string]any)["readonly"] = true
	})
	r := e.run("", "run", "--bundle", b, "ro")
	if !strings.Contains(r.stdout, "readonly") || !strings.Contains(r.stdout, "Read-only file system") {
		t.Errorf("write to a read-only root: %q", r.stdout)
	}
}
