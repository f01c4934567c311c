package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rund-dev/rund/vm"
)

func TestColdBoot(t *testing.T) {
	g := newTestGuest(t)
	b := New(Options{})
	cfg := g.config(t.TempDir())
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()

	start := time.Now()
	m, err := b.Start(ctx, cfg)
	if err != nil {
		t.Fatalf("start: %v", err)
	}
	shutdownOnCleanup(t, m, cfg)
	ch := dialGuest(t, m)
	if got := ch.line(); got != "ready" {
		t.Fatalf("first line: got %q, want %q", got, "ready")
	}
	t.Logf("cold boot to a working channel: %v (firmware %q)", time.Since(start), b.Firmware())
	if got := ch.call("ping"); got != "pong" {
		t.Errorf("ping: got %q, want %q", got, "pong")
	}
	if _, err := m.Dial(ctx); err == nil {
		t.Errorf("second dial: got no error")
	}

	if err := m.Pause(ctx); err != nil {
		t.Fatalf("pause: %v", err)
	}
	if err := m.Pause(ctx); err != nil {
		t.Fatalf("pausing a paused vm: %v", err)
	}
	if err := m.Resume(ctx); err != nil {
		t.Fatalf("resume: %v", err)
	}
	if got := ch.call("ping"); got != "pong" {
		t.Errorf("ping after resume: got %q, want %q", got, "pong")
	}

	if err := m.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	if err := m.Wait(); err != nil {
		t.Errorf("wait after shutdown: %v", err)
	}
	if _, err := os.Stat(filepath.Join(cfg.Dir, agentSocketName)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("agent socket after shutdown: got %v, want it gone", err)
	}
}

func TestDialFailsWhenQEMUExits(t *testing.T) {
	testKernel(t)
	cfg := vm.Config{
		Dir: t.TempDir(), Kernel: "/nonexistent/vmlinuz", MemoryMiB: 64, Accel: "tcg",
	}
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	_, err := New(Options{}).Start(ctx, cfg)
	if !errors.Is(err, vm.ErrExited) {
		t.Fatalf("start with a missing kernel: got %v, want vm.ErrExited", err)
	}
	t.Logf("start: %v", err)
	if qemuRunningIn(t, cfg.Dir) {
		t.Errorf("qemu still running after a failed start")
	}
}

// template boots a template VM with a placeholder disk and a pmem device,
// pauses it and snapshots it into snapDir. It returns the template's config.
func buildTemplate(t *testing.T, g *testGuest, b *Backend, shm, snapDir string) vm.Config {
	t.Helper()
	cfg := g.config(t.TempDir())
	cfg.MemPath = filepath.Join(shm, "mem")
	cfg.MemShared = true
	diskFile(t, filepath.Join(shm, "placeholder.img"), "placeholder")
	cfg.Disks = []vm.Disk{{ID: "rootrw", Path: filepath.Join(shm, "placeholder.img")}}
	pmem := filepath.Join(shm, "pmem-placeholder.img")
	if err := os.WriteFile(pmem, make([]byte, 2<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg.Pmems = []vm.Pmem{{ID: "rootro", Path: pmem, Size: 2 << 20, ReadOnly: true}}

	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	m, err := b.Start(ctx, cfg)
	if err != nil {
		t.Fatalf("starting the template: %v", err)
	}
	shutdownOnCleanup(t, m, cfg)
	ch := dialGuest(t, m)
	if got := ch.line(); got != "ready" {
		t.Fatalf("template's first line: got %q, want %q", got, "ready")
	}
	if got := ch.call("disk"); got != "disk:placeholder" {
		t.Fatalf("template's disk: got %q, want %q", got, "disk:placeholder")
	}
	if err := m.Pause(ctx); err != nil {
		t.Fatalf("pausing the template: %v", err)
	}
	start := time.Now()
	if err := m.Snapshot(ctx, snapDir); err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	t.Logf("snapshot: %v", time.Since(start))
	if err := m.Resume(ctx); err == nil {
		t.Errorf("resuming a saved template: got no error")
	}
	if err := m.Shutdown(ctx); err != nil {
		t.Fatalf("shutting the template down: %v", err)
	}
	return cfg
}

// cloneConfig is the template's config with the clone's own disk.
func cloneConfig(t *testing.T, tmpl vm.Config, content string) vm.Config {
	t.Helper()
	cfg := tmpl
	cfg.Dir = t.TempDir()
	cfg.ConsoleLog = filepath.Join(cfg.Dir, "console.log")
	cfg.MemShared = false
	disk := filepath.Join(cfg.Dir, "disk.img")
	diskFile(t, disk, content)
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	cfg.Files = nil
	cfg.Disks = []vm.Disk{{ID: "rootrw", Path: cfg.AddFile(f)}}
	return cfg
}

func TestTemplateClones(t *testing.T) {
	g := newTestGuest(t)
	b := New(Options{})
	shm := shmDir(t)
	snap := t.TempDir()
	tmpl := buildTemplate(t, g, b, shm, snap)

	t.Run("clones", func(t *testing.T) {
		for i := range 2 {
			content := fmt.Sprintf("clone-%d", i)
			cfg := cloneConfig(t, tmpl, content)
			t.Run(content, func(t *testing.T) {
				t.Parallel()
				ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
				defer cancel()
				start := time.Now()
				m, err := b.Restore(ctx, cfg, snap)
				if err != nil {
					t.Fatalf("restore: %v", err)
				}
				shutdownOnCleanup(t, m, cfg)
				ch := dialGuest(t, m)
				if got, want := ch.call("disk"), "disk:"+content; got != want {
					t.Errorf("clone's disk: got %q, want %q", got, want)
				}
				t.Logf("restore to a working channel: %v", time.Since(start))
				if got := ch.call("ping"); got != "pong" {
					t.Errorf("ping: got %q, want %q", got, "pong")
				}
			})
		}
	})
	t.Run("bad snapshots", func(t *testing.T) {
		testBadSnapshots(t, b, tmpl, snap)
	})
}

func testBadSnapshots(t *testing.T, b *Backend, tmpl vm.Config, snap string) {
	meta, err := readMeta(snap)
	if err != nil {
		t.Fatal(err)
	}
	state, err := os.ReadFile(filepath.Join(snap, stateName))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		// prepare writes the snapshot into dir and may change cfg.
		prepare func(t *testing.T, dir string, cfg *vm.Config)
	}{
		{"truncated state", func(t *testing.T, dir string, cfg *vm.Config) {
			writeSnapshot(t, dir, meta, state[:len(state)/2])
		}},
		{"truncated state that matches its metadata", func(t *testing.T, dir string, cfg *vm.Config) {
			// Only QEMU can tell: it fails the migration.
			m := *meta
			m.StateSize, m.StateCRC32C = checksumBytes(state[:len(state)/2])
			writeSnapshot(t, dir, &m, state[:len(state)/2])
		}},
		{"missing state", func(t *testing.T, dir string, cfg *vm.Config) {
			writeSnapshot(t, dir, meta, nil)
			os.Remove(filepath.Join(dir, stateName))
		}},
		{"different devices", func(t *testing.T, dir string, cfg *vm.Config) {
			writeSnapshot(t, dir, meta, state)
			cfg.Disks = append(cfg.Disks, cfg.Disks[0])
		}},
		{"different memory", func(t *testing.T, dir string, cfg *vm.Config) {
			writeSnapshot(t, dir, meta, state)
			cfg.MemoryMiB *= 2
		}},
		{"missing template memory", func(t *testing.T, dir string, cfg *vm.Config) {
			writeSnapshot(t, dir, meta, state)
			cfg.MemPath = filepath.Join(dir, "no-such-mem")
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			cfg := cloneConfig(t, tmpl, "bad")
			tc.prepare(t, dir, &cfg)
			ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
			defer cancel()
			m, err := b.Restore(ctx, cfg, dir)
			if err == nil {
				m.Shutdown(ctx)
				t.Fatalf("restore: got no error, want vm.ErrBadSnapshot")
			}
			if !errors.Is(err, vm.ErrBadSnapshot) {
				t.Errorf("restore: got %v, want vm.ErrBadSnapshot", err)
			}
			t.Logf("restore: %v", err)
			if qemuRunningIn(t, cfg.Dir) {
				t.Errorf("qemu still running after a failed restore")
			}
			if _, err := os.Stat(filepath.Join(cfg.Dir, agentSocketName)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("agent socket after a failed restore: got %v, want it gone", err)
			}
		})
	}
}

func checksumBytes(b []byte) (int64, uint32) {
	return int64(len(b)), crc32.Checksum(b, castagnoli)
}

func writeSnapshot(t *testing.T, dir string, meta *snapshotMeta, state []byte) {
	t.Helper()
	b, err := json.Marshal(meta)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, metaName), b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, stateName), state, 0o600); err != nil {
		t.Fatal(err)
	}
}
