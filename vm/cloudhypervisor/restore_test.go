package cloudhypervisor

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rund-dev/rund/vm"
)

// template is a built template: its snapshot and the config it ran with.
type template struct {
	cfg  vm.Config
	snap string
}

// buildTemplate does what the template builder does: boot with the sandbox's
// placeholder devices (and, with memFile, RAM in a shared file), open the
// agent channel, close it, pause, snapshot, shut down.
func buildTemplate(t *testing.T, b *Backend, memFile bool) (template, []string) {
	t.Helper()
	cfg := testConfig(t)
	base := filepath.Dir(cfg.Dir)
	cfg.ConsoleLog = filepath.Join(cfg.Dir, "console.log")
	cfg.Disks = []vm.Disk{{ID: "rw", Path: emptyFile(t, filepath.Join(base, "rw-placeholder"), 4<<20)}}
	cfg.Pmems = []vm.Pmem{{ID: "ro", Path: emptyFile(t, filepath.Join(base, "ro-placeholder"), 2<<20), Size: 2 << 20, ReadOnly: true}}
	if memFile {
		shm := "/dev/shm"
		if _, err := os.Stat(shm); err != nil {
			shm = base
		}
		mem, err := os.CreateTemp(shm, "rund-ch-test-mem")
		if err != nil {
			t.Fatal(err)
		}
		mem.Close()
		t.Cleanup(func() { os.Remove(mem.Name()) })
		cfg.MemPath = emptyFile(t, mem.Name(), int64(cfg.MemoryMiB)<<20)
		cfg.MemShared = true
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m := startMachine(t, b, cfg)
	conn, err := m.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
	snap := filepath.Join(base, "snap")
	if err := os.Mkdir(snap, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := m.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if err := m.Snapshot(ctx, snap); err != nil {
		t.Fatal(err)
	}
	if err := m.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	return template{cfg: cfg, snap: snap}, collapse(sequence(processRequests(t, cfg.Dir)))
}

// cloneConfig is a clone's config: its own directory, console, and disk and
// pmem backings of the template's sizes.
func cloneConfig(t *testing.T, tmpl template) vm.Config {
	t.Helper()
	c := testConfig(t)
	base := filepath.Dir(c.Dir)
	c.Kernel, c.Initrd = tmpl.cfg.Kernel, tmpl.cfg.Initrd
	c.ConsoleLog = filepath.Join(c.Dir, "console.log")
	c.MemPath = tmpl.cfg.MemPath
	rw, err := os.OpenFile(emptyFile(t, filepath.Join(base, "rw"), 4<<20), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rw.Close() })
	c.Disks = []vm.Disk{{ID: "rw", Path: c.AddFile(rw)}}
	c.Pmems = []vm.Pmem{{ID: "ro", Path: emptyFile(t, filepath.Join(base, "image.erofs"), 2<<20), Size: 2 << 20, ReadOnly: true}}
	return c
}

func restoreMachine(t *testing.T, b *Backend, cfg vm.Config, snap string) *Machine {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err := b.Restore(ctx, cfg, snap)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.(*Machine).Kill() })
	return m.(*Machine)
}

func readJSON(t *testing.T, path string) map[string]any {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// TestTemplateBuildAndRestore is the template path as a sequence of
// requests: build (create, boot, pause, snapshot into a directory with no
// memory-ranges), then a copy-on-write clone (restore from a per-clone
// config, hot-add what the template lacks, resume).
func TestTemplateBuildAndRestore(t *testing.T) {
	b := fakeBackend(t)
	tmpl, seq := buildTemplate(t, b, true)
	want := []string{"GET vmm.ping", "PUT vm.create", "PUT vm.boot", "PUT vm.pause", "PUT vm.snapshot", "PUT vmm.shutdown"}
	if !reflect.DeepEqual(seq, want) {
		t.Errorf("build: got %q, want %q", seq, want)
	}
	for name, wantExist := range map[string]bool{snapConfig: true, snapState: true, snapMemory: false} {
		if _, err := os.Stat(filepath.Join(tmpl.snap, name)); (err == nil) != wantExist {
			t.Errorf("snapshot file %s: exists=%t, want %t", name, err == nil, wantExist)
		}
	}

	cfg := cloneConfig(t, tmpl)
	extra := emptyFile(t, filepath.Join(filepath.Dir(cfg.Dir), "data"), 1<<20)
	cfg.Disks = append(cfg.Disks, vm.Disk{ID: "data", Path: extra})
	m := restoreMachine(t, b, cfg, tmpl.snap)

	reqs := processRequests(t, cfg.Dir)
	wantSeq := []string{"GET vmm.ping", "PUT vm.restore", "PUT vm.add-disk", "PUT vm.resume"}
	if got := collapse(sequence(reqs)); !reflect.DeepEqual(got, wantSeq) {
		t.Errorf("restore: got %q, want %q", got, wantSeq)
	}
	cloneSnap := filepath.Join(cfg.Dir, cloneDirName)
	for _, r := range reqs {
		switch r.Endpoint {
		case "vm.restore":
			if w := `{"source_url":"file://` + cloneSnap + `"}`; r.Body != w {
				t.Errorf("vm.restore body %s, want %s", r.Body, w)
			}
		case "vm.add-disk":
			if w := `{"path":"` + extra + `","id":"data","serial":"data","image_type":"Raw"}`; r.Body != w {
				t.Errorf("vm.add-disk body %s, want %s", r.Body, w)
			}
		}
	}

	conf := readJSON(t, filepath.Join(cloneSnap, snapConfig))
	mem := conf["memory"].(map[string]any)
	zone := mem["zones"].([]any)[0].(map[string]any)
	if mem["shared"] != false || zone["shared"] != false || zone["file"] != tmpl.cfg.MemPath {
		t.Errorf("clone memory %v, want the template's file mapped private", mem)
	}
	if got := conf["vsock"].(map[string]any)["socket"]; got != filepath.Join(cfg.Dir, vsockSocketName) {
		t.Errorf("clone vsock socket %v", got)
	}
	if got := conf["serial"].(map[string]any); got["mode"] != "File" || got["file"] != cfg.ConsoleLog {
		t.Errorf("clone serial %v", got)
	}
	if got := conf["disks"].([]any)[0].(map[string]any)["path"]; got != "/proc/self/fd/3" {
		t.Errorf("clone disk path %v", got)
	}
	if got := conf["pmem"].([]any)[0].(map[string]any)["file"]; got != cfg.Pmems[0].Path {
		t.Errorf("clone pmem file %v", got)
	}
	// The template's own snapshot is untouched.
	tconf := readJSON(t, filepath.Join(tmpl.snap, snapConfig))
	if z := tconf["memory"].(map[string]any)["zones"].([]any)[0].(map[string]any); z["shared"] != true {
		t.Errorf("template config was modified: %v", z)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	info, err := m.API().Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State != StateRunning || len(info.Config.Disks) != 2 {
		t.Errorf("clone info: %+v", info)
	}
	conn, err := m.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
	if err := m.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestClonesSideBySide restores several clones of one template at once:
// nothing per-clone (sockets, console, disks) may collide.
func TestClonesSideBySide(t *testing.T) {
	b := fakeBackend(t)
	tmpl, _ := buildTemplate(t, b, true)
	var wg sync.WaitGroup
	errs := make(chan error, 3)
	for range 3 {
		cfg := cloneConfig(t, tmpl)
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			m, err := b.Restore(ctx, cfg, tmpl.snap)
			if err != nil {
				errs <- err
				return
			}
			defer m.Shutdown(ctx)
			conn, err := m.Dial(ctx)
			if err != nil {
				errs <- err
				return
			}
			conn.Close()
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestRestoreCopiedMemory: a template with anonymous RAM snapshots
// memory-ranges, which each clone links rather than copies.
func TestRestoreCopiedMemory(t *testing.T) {
	b := fakeBackend(t)
	tmpl, _ := buildTemplate(t, b, false)
	cfg := cloneConfig(t, tmpl)
	restoreMachine(t, b, cfg, tmpl.snap)
	var a, c syscall.Stat_t
	if err := syscall.Stat(filepath.Join(tmpl.snap, snapMemory), &a); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Stat(filepath.Join(cfg.Dir, cloneDirName, snapMemory), &c); err != nil {
		t.Fatal(err)
	}
	if a.Ino != c.Ino {
		t.Error("clone's memory-ranges is not a link to the template's")
	}
}

func TestRestoreErrors(t *testing.T) {
	b := fakeBackend(t)
	tmpl, _ := buildTemplate(t, b, true)
	tests := []struct {
		name   string
		edit   func(t *testing.T, c *vm.Config) string // returns the snapshot dir
		env    []string
		wantIs error
		want   string
	}{
		{"missing snapshot", func(t *testing.T, c *vm.Config) string { return filepath.Join(tmpl.snap, "nope") },
			nil, vm.ErrBadSnapshot, "no such file"},
		{"vcpu count differs", func(t *testing.T, c *vm.Config) string { c.VCPUs = 2; return tmpl.snap },
			nil, vm.ErrBadSnapshot, "template has 1 vcpus, the clone wants 2"},
		{"memory size differs", func(t *testing.T, c *vm.Config) string { c.MemoryMiB = 256; return tmpl.snap },
			nil, vm.ErrBadSnapshot, "128 MiB"},
		{"template disk left without backing", func(t *testing.T, c *vm.Config) string { c.Disks = nil; return tmpl.snap },
			nil, vm.ErrBadSnapshot, `template disk "rw" has no backing`},
		{"disk of another size", func(t *testing.T, c *vm.Config) string {
			c.Disks[0].Path = emptyFile(t, filepath.Join(filepath.Dir(c.Dir), "small"), 1<<20)
			return tmpl.snap
		}, nil, vm.ErrBadSnapshot, "the template's is 4194304"},
		{"read-only flag differs", func(t *testing.T, c *vm.Config) string { c.Disks[0].ReadOnly = true; return tmpl.snap },
			nil, vm.ErrBadSnapshot, "read-only"},
		{"pmem of another size", func(t *testing.T, c *vm.Config) string { c.Pmems[0].Size = 4 << 20; return tmpl.snap },
			nil, vm.ErrBadSnapshot, "pmem ro"},
		{"memory file mapped shared", func(t *testing.T, c *vm.Config) string { c.MemShared = true; return tmpl.snap },
			nil, vm.ErrBadSnapshot, "cannot map the template's memory file shared"},
		{"memory file missing", func(t *testing.T, c *vm.Config) string { c.MemPath = c.Dir + "-nomem"; return tmpl.snap },
			nil, vm.ErrBadSnapshot, "memory zone"},
		{"shares", func(t *testing.T, c *vm.Config) string {
			c.Shares = []vm.Share{{Tag: "x", Path: "/"}}
			return tmpl.snap
		}, nil, vm.ErrBadSnapshot, "virtio-fs"},
		{"tcg", func(t *testing.T, c *vm.Config) string { c.Accel = "tcg"; return tmpl.snap },
			nil, vm.ErrUnavailable, "kvm"},
		{"vmm refuses the restore", func(t *testing.T, c *vm.Config) string { return tmpl.snap },
			[]string{"FAKE_CH_FAIL_ON=vm.restore"}, nil, "cloud-hypervisor PUT vm.restore: 500"},
		{"vmm dies during restore", func(t *testing.T, c *vm.Config) string { return tmpl.snap },
			[]string{"FAKE_CH_DIE_ON=vm.restore"}, vm.ErrExited, "exit status 1"},
		{"hot-add after restore fails", func(t *testing.T, c *vm.Config) string {
			c.Disks = append(c.Disks, vm.Disk{ID: "data", Path: c.Dir + "-missing"})
			return tmpl.snap
		}, nil, nil, "adding disk data"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := cloneConfig(t, tmpl)
			snap := tt.edit(t, &cfg)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			m, err := fakeBackend(t, tt.env...).Restore(ctx, cfg, snap)
			if err == nil {
				_ = m.Shutdown(ctx)
				t.Fatal("restore succeeded")
			}
			t.Logf("error: %v", err)
			if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
				t.Errorf("got %v, want it to match %v", err, tt.wantIs)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("got %q, want it to contain %q", err, tt.want)
			}
			if _, err := NewClient(filepath.Join(cfg.Dir, apiSocketName)).Ping(context.Background()); err == nil {
				t.Error("the failed VMM still answers")
			}
		})
	}
}
