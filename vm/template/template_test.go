package template

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
)

func testStore(t *testing.T) *Store {
	t.Helper()
	d := t.TempDir()
	return &Store{Dir: filepath.Join(d, "templates"), MemDir: filepath.Join(d, "mem")}
}

// fakeBuild writes a memory file and a state file, counting calls.
func fakeBuild(n *atomic.Int32) BuildFunc {
	return func(ctx context.Context, memPath, dir string) error {
		n.Add(1)
		if err := os.WriteFile(memPath, make([]byte, 4096), 0o600); err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dir, "state"), []byte("device state"), 0o600)
	}
}

func TestEnsureBuildsOnceAndReuses(t *testing.T) {
	s := testStore(t)
	var n atomic.Int32
	key := Key{Backend: "qemu", VCPUs: 1, MemoryMiB: 256}
	t1, built, err := s.Ensure(context.Background(), key, fakeBuild(&n))
	if err != nil || !built {
		t.Fatalf("first Ensure: built %v err %v", built, err)
	}
	t2, built, err := s.Ensure(context.Background(), key, fakeBuild(&n))
	if err != nil || built {
		t.Fatalf("second Ensure: built %v err %v", built, err)
	}
	if t1.Dir != t2.Dir || n.Load() != 1 {
		t.Fatalf("dirs %s %s, builds %d", t1.Dir, t2.Dir, n.Load())
	}
}

func TestConcurrentEnsureBuildsOnce(t *testing.T) {
	s := testStore(t)
	var n atomic.Int32
	key := Key{Backend: "qemu"}
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, _, err := s.Ensure(context.Background(), key, fakeBuild(&n)); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if got := n.Load(); got != 1 {
		t.Fatalf("builds: got %d, want 1", got)
	}
}

func TestCorruptionIsDetectedAndRebuilt(t *testing.T) {
	tests := []struct {
		name    string
		corrupt func(t *testing.T, tpl *Template)
	}{
		{"truncated state", func(t *testing.T, tpl *Template) {
			os.Truncate(filepath.Join(tpl.Dir, "state"), 3)
		}},
		{"flipped byte", func(t *testing.T, tpl *Template) {
			os.WriteFile(filepath.Join(tpl.Dir, "state"), []byte("device stat3"), 0o600)
		}},
		{"memory file gone", func(t *testing.T, tpl *Template) { os.Remove(tpl.Manifest.MemPath) }},
		{"manifest edited", func(t *testing.T, tpl *Template) {
			p := filepath.Join(tpl.Dir, manifestFile)
			b, _ := os.ReadFile(p)
			b[len(b)/2] ^= 1
			os.WriteFile(p, b, 0o600)
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := testStore(t)
			var n atomic.Int32
			key := Key{Backend: "qemu", Cmdline: tc.name}
			tpl, _, err := s.Ensure(context.Background(), key, fakeBuild(&n))
			if err != nil {
				t.Fatal(err)
			}
			tc.corrupt(t, tpl)
			if _, err := s.Get(key); err == nil {
				t.Fatalf("Get of a corrupt template succeeded")
			}
			if _, built, err := s.Ensure(context.Background(), key, fakeBuild(&n)); err != nil || !built {
				t.Fatalf("Ensure after corruption: built %v err %v", built, err)
			}
			if _, err := s.Get(key); err != nil {
				t.Fatalf("Get after rebuild: %v", err)
			}
		})
	}
}

func TestKeyChangeMeansNewTemplate(t *testing.T) {
	s := testStore(t)
	var n atomic.Int32
	k1 := Key{Backend: "qemu", Kernel: FileID{Path: "/k", Size: 1, ModTime: 1}}
	k2 := k1
	k2.Kernel.ModTime = 2
	if k1.ID() == k2.ID() {
		t.Fatal("keys of different kernels share an id")
	}
	s.Ensure(context.Background(), k1, fakeBuild(&n))
	if _, err := s.Get(k2); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get of new key: got %v, want ErrNotFound", err)
	}
}

func TestRemoveAndList(t *testing.T) {
	s := testStore(t)
	var n atomic.Int32
	key := Key{Backend: "qemu"}
	tpl, _, err := s.Ensure(context.Background(), key, fakeBuild(&n))
	if err != nil {
		t.Fatal(err)
	}
	l, err := s.List()
	if err != nil || len(l) != 1 || l[0].ID != key.ID() {
		t.Fatalf("List: %v %v", l, err)
	}
	if err := s.Remove(context.Background(), key.ID()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(tpl.Manifest.MemPath); err == nil {
		t.Errorf("memory file left after Remove")
	}
	if err := s.Remove(context.Background(), key.ID()); !errors.Is(err, ErrNotFound) {
		t.Errorf("second Remove: got %v, want ErrNotFound", err)
	}
}

func TestStaleTemplatesPruned(t *testing.T) {
	s := testStore(t)
	var n atomic.Int32
	old := Key{Backend: "qemu", Kernel: FileID{Path: "/k", Size: 1, ModTime: 1}, Initrd: FileID{Path: "/i", Size: 1, ModTime: 1}}
	other := old
	other.VCPUs = 2 // another shape of the same files: kept
	s.Ensure(context.Background(), old, fakeBuild(&n))
	s.Ensure(context.Background(), other, fakeBuild(&n))
	newer := old
	newer.Initrd.ModTime = 2 // the initramfs was rebuilt
	s.Ensure(context.Background(), newer, fakeBuild(&n))
	l, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	ids := map[string]bool{}
	for _, m := range l {
		ids[m.ID] = true
	}
	if ids[old.ID()] || ids[other.ID()] || !ids[newer.ID()] {
		t.Fatalf("templates after rebuild: %v (old %s, other %s, newer %s)", ids, old.ID(), other.ID(), newer.ID())
	}
}
