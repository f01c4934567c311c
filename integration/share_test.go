//go:build integration

package integration

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// addMounts appends bind mounts (destination, source, options...) to the
// bundle's config.json.
func addMounts(t *testing.T, dir string, mounts ...map[string]any) {
	t.Helper()
	editSpec(t, dir, func(s map[string]any) {
		for _, m := range mounts {
			s["mounts"] = append(s["mounts"].([]any), m)
		}
	})
}

// TestHostDirectoryVolumes: bind mounts of host directories reach the
// guest over 9p: the container reads what the host put there, its writes
// land on the host, a read-only one refuses writes, and a template clone
// (not a cold boot) serves it.
func TestHostDirectoryVolumes(t *testing.T) {
	e := newEnv(t)
	vol, rovol := t.TempDir(), t.TempDir()
	os.WriteFile(filepath.Join(vol, "in.txt"), []byte("from-host\n"), 0o644)
	os.WriteFile(filepath.Join(rovol, "ro.txt"), []byte("read-only-data\n"), 0o644)
	b := bundle(t, "sh", "-c", `cat /vol/in.txt /rovol/ro.txt /vol-again/in.txt; echo from-guest > /vol/out.txt && mkdir /vol/sub && echo wrote; (echo x > /rovol/y) 2>/dev/null || echo ro-refused`)
	addMounts(t, b,
		map[string]any{"destination": "/vol", "type": "bind", "source": vol, "options": []string{"rbind", "rw"}},
		map[string]any{"destination": "/rovol", "type": "bind", "source": rovol, "options": []string{"rbind", "ro"}},
		// The same directory twice (one share, mounted once in the guest).
		map[string]any{"destination": "/vol-again", "type": "bind", "source": vol, "options": []string{"rbind", "rshared"}},
	)
	r := e.run("", "run", "--bundle", b, "vols")
	if r.code != 0 {
		t.Fatalf("run: exit %d: %s %s", r.code, r.stdout, r.stderr)
	}
	if strings.Count(r.stdout, "from-host") != 2 {
		t.Errorf("one directory at two destinations:\n%s", r.stdout)
	}
	for _, want := range []string{"from-host", "read-only-data", "wrote", "ro-refused"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("output lacks %q:\n%s\nstderr: %s", want, r.stdout, r.stderr)
		}
	}
	if strings.Contains(r.stderr, "empty tmpfs") || strings.Contains(r.stderr, "cold-boot") {
		t.Errorf("stderr: %s", r.stderr)
	}
	if got, _ := os.ReadFile(filepath.Join(vol, "out.txt")); string(got) != "from-guest\n" {
		t.Errorf("host sees %q in out.txt", got)
	}
	if fi, err := os.Stat(filepath.Join(vol, "sub")); err != nil || !fi.IsDir() {
		t.Errorf("directory made in the guest: %v", err)
	}
	if _, err := os.Stat(filepath.Join(rovol, "y")); err == nil {
		t.Error("a write reached the read-only volume")
	}

	// A running container sees the host's later writes.
	b2 := bundle(t, "sleep", "1000")
	addMounts(t, b2, map[string]any{"destination": "/vol", "type": "bind", "source": vol, "options": []string{"rbind"}})
	e.ok("run", "-d", "--bundle", b2, "vols2")
	defer e.ok("delete", "--force", "vols2")
	if tpl, _ := e.rawState("vols2")["template"].(string); tpl == "" {
		t.Error("a sandbox with volumes was not cloned from the template")
	}
	os.WriteFile(filepath.Join(vol, "later.txt"), []byte("written-later\n"), 0o644)
	if out := e.execUntil("vols2", "cat", "/vol/later.txt"); !strings.Contains(out, "written-later") {
		t.Errorf("later host write: %q", out)
	}

	// More host directories than `shares` allows: a clear error, nothing left.
	e1 := newEnv(t, "shares = 1")
	r = e1.run("", "run", "--bundle", b, "toomany")
	if r.code == 0 || !strings.Contains(r.stderr, "shares = 1") {
		t.Errorf("two volumes with shares = 1: exit %d, stderr %s", r.code, r.stderr)
	}
	if _, err := os.Stat(filepath.Join(e1.root, "toomany")); err == nil {
		t.Error("a refused create left its state directory")
	}
}

// TestSharedRootfs: with rund.rootfs = shared the container's root is the
// bundle's rootfs itself: its writes land there, as with runc.
func TestSharedRootfs(t *testing.T) {
	e := newEnv(t)
	vol := t.TempDir()
	b := bundle(t, "sh", "-c", "cat /etc/group | head -1; echo made-in-guest > /root/created; echo to-volume > /vol/v; echo done")
	writeSpecAnnotation(t, b, "rund.rootfs", "shared")
	addMounts(t, b, map[string]any{"destination": "/vol", "type": "bind", "source": vol, "options": []string{"rbind"}})
	r := e.run("", "run", "--bundle", b, "shared1")
	if r.code != 0 || !strings.Contains(r.stdout, "root:x:0:") || !strings.Contains(r.stdout, "done") {
		t.Fatalf("run: exit %d: %s %s", r.code, r.stdout, r.stderr)
	}
	if got, _ := os.ReadFile(filepath.Join(b, "rootfs", "root", "created")); string(got) != "made-in-guest\n" {
		t.Errorf("the guest's write is not in the bundle's rootfs: %q", got)
	}
	if got, _ := os.ReadFile(filepath.Join(vol, "v")); string(got) != "to-volume\n" {
		t.Errorf("a volume of a shared-root container: the host sees %q", got)
	}
	// Read-only root: writes are refused, the bundle is untouched.
	b2 := bundle(t, "sh", "-c", "(echo x > /root/nope) 2>/dev/null || echo refused")
	writeSpecAnnotation(t, b2, "rund.rootfs", "shared")
	editSpec(t, b2, func(s map[string]any) { s["root"].(map[string]any)["readonly"] = true })
	if out := e.ok("run", "--bundle", b2, "shared2"); !strings.Contains(out, "refused") {
		t.Errorf("write to a read-only shared root: %q", out)
	}
	if _, err := os.Stat(filepath.Join(b2, "rootfs", "root", "nope")); err == nil {
		t.Error("a write reached a read-only shared root")
	}
}

// writeSpecAnnotation sets one annotation in the bundle's config.json.
func writeSpecAnnotation(t *testing.T, dir, key, value string) {
	t.Helper()
	editSpec(t, dir, func(s map[string]any) {
		a, _ := s["annotations"].(map[string]any)
		if a == nil {
			a = map[string]any{}
		}
		a[key] = value
		s["annotations"] = a
	})
}

// TestBindSources: a relative bind source is relative to the bundle; a
// socket cannot cross the VM and is skipped with a warning, not an error;
// a container with CAP_MKNOD cannot plant a device node in a volume: QEMU,
// which serves the share, runs without CAP_MKNOD (and QEMU 7.2's 9p server
// also fails a mknod of a node it cannot open).
func TestBindSources(t *testing.T) {
	e := newEnv(t)
	b := bundle(t, "sh", "-c", `cat /rel/f; (mknod /rel/null c 1 3) 2>/dev/null && echo MKNOD-OK || echo mknod-refused`)
	rel := filepath.Join(b, "reldir")
	os.Mkdir(rel, 0o755)
	os.WriteFile(filepath.Join(rel, "f"), []byte("relative-source\n"), 0o644)
	sock := filepath.Join(t.TempDir(), "s.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	addMounts(t, b,
		map[string]any{"destination": "/rel", "type": "bind", "source": "reldir", "options": []string{"rbind"}},
		map[string]any{"destination": "/run/s.sock", "type": "bind", "source": sock, "options": []string{"bind"}},
	)
	editSpec(t, b, func(s map[string]any) {
		p := s["process"].(map[string]any)
		caps, _ := p["capabilities"].(map[string]any)
		if caps == nil {
			caps = map[string]any{}
			p["capabilities"] = caps
		}
		for _, set := range []string{"bounding", "effective", "permitted"} {
			have, _ := caps[set].([]any)
			caps[set] = append(have, "CAP_MKNOD")
		}
	})
	r := e.run("", "run", "--bundle", b, "binds")
	if r.code != 0 {
		t.Fatalf("run: exit %d: %s %s", r.code, r.stdout, r.stderr)
	}
	if !strings.Contains(r.stdout, "relative-source") {
		t.Errorf("relative bind source: %q", r.stdout)
	}
	if !strings.Contains(r.stdout, "mknod-refused") || strings.Contains(r.stdout, "MKNOD-OK") {
		t.Errorf("mknod of a block device in a volume: %q", r.stdout)
	}
	if fi, err := os.Lstat(filepath.Join(rel, "null")); err == nil {
		t.Errorf("a device node reached the host: %v", fi.Mode())
	}
	if !strings.Contains(r.stderr, "socket cannot cross the VM boundary") {
		t.Errorf("no warning for the socket bind: %q", r.stderr)
	}
}
