package cgpool

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"testing"

	"github.com/opencontainers/cgroups"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) != "" {
		helperMain()
		return
	}
	// Fake trees are plain directories: let the cgroup library create the
	// files it writes and skip its cgroupfs check.
	cgroups.TestMode = true
	os.Exit(m.Run())
}

// fakeTree builds a plain-directory stand-in for a cgroup root.
func fakeTree(t *testing.T, mode Mode) string {
	t.Helper()
	root := t.TempDir()
	if mode == ModeV2 {
		if err := os.WriteFile(filepath.Join(root, "cgroup.controllers"), []byte("memory pids cpu\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		return root
	}
	for _, h := range []string{"cpu,cpuacct", "cpuset", "memory", "pids", "systemd", "unified"} {
		if err := os.Mkdir(filepath.Join(root, h), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func openPool(t *testing.T, opts Options) *Pool {
	t.Helper()
	if opts.StateDir == "" {
		opts.StateDir = t.TempDir()
	}
	p, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}

// subdirs lists the child directories of the parent in every hierarchy.
func subdirs(t *testing.T, p *Pool) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	for _, d := range p.parents {
		entries, err := os.ReadDir(d)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, e := range entries {
			if e.IsDir() {
				names = append(names, e.Name())
			}
		}
		sort.Strings(names)
		out[d] = names
	}
	return out
}

// checkNoLeaks checks that every slot is idle and that the tree holds
// exactly the slot directories, in every hierarchy.
func checkNoLeaks(t *testing.T, p *Pool) {
	t.Helper()
	st, err := p.Status()
	if err != nil {
		t.Fatal(err)
	}
	if st.Busy != 0 || st.Leaked != 0 || st.Idle != len(st.Slots) {
		t.Fatalf("got idle %d busy %d leaked %d of %d slots, want all idle", st.Idle, st.Busy, st.Leaked, len(st.Slots))
	}
	var want []string
	for _, s := range st.Slots {
		want = append(want, slotName(s.ID))
	}
	sort.Strings(want)
	for d, got := range subdirs(t, p) {
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("%s: got %v, want %v", d, got, want)
		}
	}
}

func TestDetectFake(t *testing.T) {
	for _, mode := range []Mode{ModeV1, ModeV2} {
		t.Run(string(mode), func(t *testing.T) {
			root := fakeTree(t, mode)
			got, hs, err := detect(root, ModeAuto)
			if err != nil || got != mode {
				t.Fatalf("got %v %v, want %v", got, err, mode)
			}
			if mode == ModeV1 {
				var ctrls []string
				for _, h := range hs {
					ctrls = append(ctrls, h.controllers...)
				}
				sort.Strings(ctrls)
				if want := "[cpu cpuacct cpuset memory name=systemd pids]"; fmt.Sprint(ctrls) != want {
					t.Fatalf("got controllers %v, want %s", ctrls, want)
				}
			}
		})
	}
}

func TestAcquireRelease(t *testing.T) {
	for _, mode := range []Mode{ModeV1, ModeV2} {
		t.Run(string(mode), func(t *testing.T) {
			p := openPool(t, Options{Root: fakeTree(t, mode), Parent: "/pool/parent", LowWater: -1})
			if err := p.Init(1); err != nil {
				t.Fatal(err)
			}
			pids := int64(64)
			l, err := p.Acquire(context.Background(), "ctr1", 0, &specs.LinuxResources{Pids: &specs.LinuxPids{Limit: &pids}})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := p.Acquire(context.Background(), "ctr1", 0, nil); !errors.Is(err, ErrExist) {
				t.Fatalf("second acquire of ctr1: got %v, want ErrExist", err)
			}
			dir := l.Paths()["pids"]
			if mode == ModeV2 {
				dir = l.Paths()[""]
				if filepath.Base(dir) != slotName(l.Slot()) {
					t.Fatalf("v2 lease at %s, want the slot's own directory", dir)
				}
			} else if filepath.Base(dir) != "ctr1" || l.Paths()["cpuacct"] != l.Paths()["cpu"] {
				t.Fatalf("got paths %v, want ctr1 in each hierarchy", l.Paths())
			}
			if b, err := os.ReadFile(filepath.Join(dir, "pids.max")); err != nil || string(b) != "64" {
				t.Fatalf("pids.max: got %q %v, want 64", b, err)
			}
			if got, err := p.Lease("ctr1"); err != nil || got.Slot() != l.Slot() {
				t.Fatalf("Lease: got %v %v", got, err)
			}
			st, _ := p.Status()
			if st.Busy != 1 || st.Idle != 0 {
				t.Fatalf("got busy %d idle %d, want 1 and 0", st.Busy, st.Idle)
			}
			if err := p.Release("ctr1"); err != nil {
				t.Fatal(err)
			}
			if err := p.Release("ctr1"); err != nil {
				t.Fatalf("second release: got %v, want nil", err)
			}
			// The limit stays on the idle slot (lazy reset), and the next
			// lease of the slot, which asks for no pids limit, must not
			// inherit it.
			shares := uint64(512)
			l2, err := p.Acquire(context.Background(), "ctr2", 0, &specs.LinuxResources{CPU: &specs.LinuxCPU{Shares: &shares}})
			if err != nil || l2.Slot() != l.Slot() {
				t.Fatalf("re-acquire: got %v %v, want slot %d", l2, err, l.Slot())
			}
			dir2 := l2.Paths()["pids"]
			if mode == ModeV2 {
				dir2 = l2.Paths()[""]
			}
			if b, err := os.ReadFile(filepath.Join(dir2, "pids.max")); err != nil || string(b) != "max" {
				t.Fatalf("pids.max of the next lease: got %q %v, want max", b, err)
			}
			if err := p.Release("ctr2"); err != nil {
				t.Fatal(err)
			}
			checkNoLeaks(t, p)
		})
	}
}

func TestAcquireGrowsAndRefills(t *testing.T) {
	p := openPool(t, Options{Root: fakeTree(t, ModeV1), Parent: "p", LowWater: 2, Refill: 3})
	// An empty pool grows on demand, and refills below the low-water mark.
	if _, err := p.Acquire(context.Background(), "c0", 0, nil); err != nil {
		t.Fatal(err)
	}
	p.refillWG.Wait()
	st, err := p.Status()
	if err != nil {
		t.Fatal(err)
	}
	if st.Busy != 1 || st.Idle != 3 {
		t.Fatalf("got busy %d idle %d, want 1 and 3", st.Busy, st.Idle)
	}
	names := []string{"c0"}
	for i := 1; i < 6; i++ {
		name := "c" + strconv.Itoa(i)
		if _, err := p.Acquire(context.Background(), name, 0, nil); err != nil {
			t.Fatal(err)
		}
		names = append(names, name)
	}
	p.refillWG.Wait()
	for _, n := range names {
		if err := p.Release(n); err != nil {
			t.Fatal(err)
		}
	}
	checkNoLeaks(t, p)
}

func TestAcquireNameTaken(t *testing.T) {
	p := openPool(t, Options{Root: fakeTree(t, ModeV1), Parent: "p", LowWater: -1})
	if err := p.Init(1); err != nil {
		t.Fatal(err)
	}
	// A cgroup outside the pool already has the name: all-or-nothing
	// rename must roll back and leave the slot idle.
	if err := os.Mkdir(filepath.Join(p.parents[2], "taken"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Acquire(context.Background(), "taken", 0, nil); !errors.Is(err, ErrExist) {
		t.Fatalf("got %v, want ErrExist", err)
	}
	if err := os.Remove(filepath.Join(p.parents[2], "taken")); err != nil {
		t.Fatal(err)
	}
	checkNoLeaks(t, p)
	for _, bad := range []string{"", "a/b", "..", slotName(3), "a b"} {
		if _, err := p.Acquire(context.Background(), bad, 0, nil); !errors.Is(err, ErrInvalidName) {
			t.Fatalf("name %q: got %v, want ErrInvalidName", bad, err)
		}
	}
}

// startSleeper starts a process to own leases; kill it to make it a dead
// owner.
func startSleeper(t *testing.T) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "1000")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	return cmd
}

func TestDeadOwnerReclaimed(t *testing.T) {
	p := openPool(t, Options{Root: fakeTree(t, ModeV1), Parent: "p", LowWater: -1})
	owner := startSleeper(t)
	if _, err := p.Acquire(context.Background(), "orphan", owner.Process.Pid, nil); err != nil {
		t.Fatal(err)
	}
	// While the owner lives, its name is taken.
	if _, err := p.Acquire(context.Background(), "orphan", 0, nil); !errors.Is(err, ErrExist) {
		t.Fatalf("got %v, want ErrExist", err)
	}
	_ = owner.Process.Kill()
	_ = owner.Wait()
	st, _ := p.Status()
	if st.Leaked != 1 {
		t.Fatalf("got %d leaked, want 1", st.Leaked)
	}
	// The pool is empty of idle slots: this Acquire reclaims the dead
	// owner's slot rather than only growing.
	l, err := p.Acquire(context.Background(), "orphan", 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Release(); err != nil {
		t.Fatal(err)
	}
	checkNoLeaks(t, p)
}

func TestCorruptRecordRebuilt(t *testing.T) {
	for _, mode := range []Mode{ModeV1, ModeV2} {
		t.Run(string(mode), func(t *testing.T) {
			opts := Options{Root: fakeTree(t, mode), Parent: "p", StateDir: t.TempDir(), LowWater: -1}
			p := openPool(t, opts)
			if err := p.Init(3); err != nil {
				t.Fatal(err)
			}
			if _, err := p.Acquire(context.Background(), "kept", 0, nil); err != nil {
				t.Fatal(err)
			}
			// Scribble over the record; a second pool (another process)
			// must not trust it.
			if err := os.WriteFile(recordPath(p.opts), []byte("garbage\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			q := openPool(t, opts)
			st, err := q.Status()
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("status of a corrupt record: got %v, want ErrCorrupt", err)
			}
			if _, err := q.Acquire(context.Background(), "next", 0, nil); err != nil {
				t.Fatal(err)
			}
			st, err = q.Status()
			if err != nil {
				t.Fatal(err)
			}
			// "kept" is found in the tree as a lease with no process in
			// it, so no owner: reclaimable, as a slot of a dead holder.
			if len(st.Slots) != 3 || st.Busy < 1 {
				t.Fatalf("rebuilt: got %+v", st)
			}
			for _, n := range []string{"next", "kept"} {
				if err := q.Release(n); err != nil {
					t.Fatal(err)
				}
			}
			checkNoLeaks(t, q)
		})
	}
}

func TestDestroy(t *testing.T) {
	p := openPool(t, Options{Root: fakeTree(t, ModeV1), Parent: "p", LowWater: -1})
	if err := p.Init(3); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Acquire(context.Background(), "x", 0, nil); err != nil {
		t.Fatal(err)
	}
	if err := p.Destroy(true); err != nil {
		t.Fatal(err)
	}
	// The parent, which the pool made, goes too.
	for _, d := range p.parents {
		if _, err := os.Stat(d); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("%s after destroy: %v, want it removed", d, err)
		}
	}
	// A parent that existed before the pool stays, with what else is in it.
	root := fakeTree(t, ModeV1)
	keep := filepath.Join(root, "memory", "a", "b")
	if err := os.MkdirAll(filepath.Join(root, "memory", "a", "other"), 0o755); err != nil {
		t.Fatal(err)
	}
	q := openPool(t, Options{Root: root, Parent: "a/b", LowWater: -1})
	if err := q.Init(1); err != nil {
		t.Fatal(err)
	}
	if err := q.Destroy(false); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(keep); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s: %v, want it removed (the pool made it)", keep, err)
	}
	if _, err := os.Stat(filepath.Join(root, "memory", "a", "other")); err != nil {
		t.Fatalf("a cgroup the pool did not make: %v", err)
	}
	if _, err := os.Stat(filepath.Join(root, "pids", "a")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("pids/a: %v, want it removed (the pool made it there)", err)
	}
}

func TestControllers(t *testing.T) {
	root, state := fakeTree(t, ModeV1), t.TempDir()
	p := openPool(t, Options{Root: root, Parent: "p", StateDir: state, LowWater: -1})
	if got, want := fmt.Sprint(p.Controllers()), "[cpu cpuacct cpuset memory pids]"; got != want {
		t.Fatalf("default: got %v, want %s (no systemd)", got, want)
	}
	if got, want := fmt.Sprint(p.NamedControllers()), "[cpu cpuacct memory pids]"; got != want {
		t.Fatalf("renamed: got %v, want %s (cpuacct goes with cpu, cpuset keeps slot names)", got, want)
	}
	if err := p.Init(1); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "systemd", "p", slotName(0))); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("slot in a hierarchy outside the set: %v", err)
	}
	// Another opener with other controllers is refused; one that names
	// none adopts the pool's set.
	if _, err := Open(Options{Root: root, Parent: "p", StateDir: state, Controllers: []string{AllControllers}}); !errors.Is(err, ErrControllers) {
		t.Fatalf("open with all controllers: got %v, want ErrControllers", err)
	}
	q := openPool(t, Options{Root: root, Parent: "p", StateDir: state, LowWater: -1})
	if fmt.Sprint(q.Controllers()) != fmt.Sprint(p.Controllers()) {
		t.Fatalf("got %v, want the pool's %v", q.Controllers(), p.Controllers())
	}
	// A field whose controller the pool left out is an error, not a
	// silently dropped limit.
	r := openPool(t, Options{Root: root, Parent: "q", StateDir: state, LowWater: -1, Controllers: []string{"pids"}})
	pids := int64(5)
	if _, err := r.Acquire(context.Background(), "c", 0, &specs.LinuxResources{Pids: &specs.LinuxPids{Limit: &pids}}); err != nil {
		t.Fatal(err)
	}
	mem := int64(1 << 20)
	if _, err := r.Acquire(context.Background(), "d", 0, &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &mem}}); err == nil {
		t.Fatal("memory limit on a pool without memory: got no error")
	}
	if err := r.Release("c"); err != nil {
		t.Fatal(err)
	}
	checkNoLeaks(t, r)
	checkNoLeaks(t, q)
}

// TestIdleSlotRemovedBehindRecord: an idle slot whose directories were
// removed by someone else (an empty cgroup looks unused) is made again on
// the next acquire, with every limit applied.
func TestIdleSlotRemovedBehindRecord(t *testing.T) {
	root := fakeTree(t, ModeV1)
	p := openPool(t, Options{Root: root, Parent: "/pool/parent", LowWater: -1})
	pids := int64(64)
	res := &specs.LinuxResources{Pids: &specs.LinuxPids{Limit: &pids}}
	l, err := p.Acquire(context.Background(), "a", 0, res)
	if err != nil {
		t.Fatal(err)
	}
	slot := slotName(l.Slot())
	if err := p.Release("a"); err != nil {
		t.Fatal(err)
	}
	for _, parent := range p.ParentPaths() {
		if err := os.RemoveAll(filepath.Join(parent, slot)); err != nil {
			t.Fatal(err)
		}
	}
	l2, err := p.Acquire(context.Background(), "b", 0, res)
	if err != nil {
		t.Fatalf("acquire after the idle slot vanished: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(l2.Paths()["pids"], "pids.max")); err != nil || string(b) != "64" {
		t.Fatalf("pids.max of the remade slot: got %q %v, want 64", b, err)
	}
	if err := p.Release("b"); err != nil {
		t.Fatal(err)
	}
}

// TestUnnamedHierarchy: in a hierarchy whose slots are not renamed (cpuset
// here) a lease stays in its slot's directory, which holds its limits;
// the renamed ones show the lease's name. A slot directory removed there
// behind the record's back is made again by the next acquire.
func TestUnnamedHierarchy(t *testing.T) {
	root := fakeTree(t, ModeV1)
	p := openPool(t, Options{Root: root, Parent: "/pool/parent", LowWater: -1})
	res := &specs.LinuxResources{CPU: &specs.LinuxCPU{Cpus: "0", Mems: "0"}}
	l, err := p.Acquire(context.Background(), "a", 0, res)
	if err != nil {
		t.Fatal(err)
	}
	slot := slotName(l.Slot())
	cpuset, mem := l.Paths()["cpuset"], l.Paths()["memory"]
	if filepath.Base(cpuset) != slot || filepath.Base(mem) != "a" {
		t.Fatalf("paths %v: want cpuset in %s, memory in a", l.Paths(), slot)
	}
	if b, err := os.ReadFile(filepath.Join(cpuset, "cpuset.cpus")); err != nil || string(b) != "0" {
		t.Fatalf("cpuset.cpus of the lease: got %q %v, want 0", b, err)
	}
	if _, err := os.Stat(filepath.Join(root, "cpuset", "pool", "parent", "a")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("cpuset directory under the lease's name: %v", err)
	}
	if err := p.Release("a"); err != nil {
		t.Fatal(err)
	}
	checkNoLeaks(t, p)
	if err := os.RemoveAll(cpuset); err != nil {
		t.Fatal(err)
	}
	l2, err := p.Acquire(context.Background(), "b", 0, res)
	if err != nil {
		t.Fatalf("acquire after the cpuset slot vanished: %v", err)
	}
	if l2.Slot() != l.Slot() {
		t.Fatalf("got slot %d, want %d", l2.Slot(), l.Slot())
	}
	if b, err := os.ReadFile(filepath.Join(l2.Paths()["cpuset"], "cpuset.cpus")); err != nil || string(b) != "0" {
		t.Fatalf("cpuset.cpus of the remade slot: got %q %v, want 0", b, err)
	}
	if err := p.Release("b"); err != nil {
		t.Fatal(err)
	}
	checkNoLeaks(t, p)
	// A lease that writes nothing to cpuset does not notice; the full
	// release after its failed start remakes the directory.
	pids := int64(10)
	res = &specs.LinuxResources{Pids: &specs.LinuxPids{Limit: &pids}}
	if _, err := p.Acquire(context.Background(), "c", 0, res); err != nil {
		t.Fatal(err)
	}
	if err := p.Release("c"); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(cpuset); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Acquire(context.Background(), "d", 0, res); err != nil {
		t.Fatal(err)
	}
	if err := p.ReleaseReset("d"); err != nil {
		t.Fatal(err)
	}
	checkNoLeaks(t, p)
}

// TestSlotChoice: an acquire takes an idle slot that already holds its
// limits, else a fresh one, so that shaped slots are kept for their shape.
func TestSlotChoice(t *testing.T) {
	p := openPool(t, Options{Root: fakeTree(t, ModeV1), Parent: "/pool/parent", LowWater: -1})
	if err := p.Init(3); err != nil {
		t.Fatal(err)
	}
	withPids := func(n int64) *specs.LinuxResources { return &specs.LinuxResources{Pids: &specs.LinuxPids{Limit: &n}} }
	acquire := func(name string, pids int64) int {
		t.Helper()
		l, err := p.Acquire(context.Background(), name, 0, withPids(pids))
		if err != nil {
			t.Fatal(err)
		}
		return l.Slot()
	}
	a, b := acquire("a", 10), acquire("b", 20)
	for _, n := range []string{"a", "b"} {
		if err := p.Release(n); err != nil {
			t.Fatal(err)
		}
	}
	if c := acquire("c", 20); c != b {
		t.Errorf("lease with b's limits got slot %d, want b's slot %d", c, b)
	}
	if d := acquire("d", 30); d == a || d == b {
		t.Errorf("lease with new limits got shaped slot %d, want the fresh one", d)
	}
	for _, n := range []string{"c", "d"} {
		if err := p.Release(n); err != nil {
			t.Fatal(err)
		}
	}
	checkNoLeaks(t, p)
}

// TestReleaseInProgressNotReclaimed: the lease of a dead holder that
// another process is releasing (it holds the slot's line lock) is neither
// reclaimed nor taken over; once the line is free, it is.
func TestReleaseInProgressNotReclaimed(t *testing.T) {
	state := t.TempDir()
	p := openPool(t, Options{Root: fakeTree(t, ModeV1), Parent: "p", StateDir: state, LowWater: -1})
	owner := startSleeper(t)
	l, err := p.Acquire(context.Background(), "orphan", owner.Process.Pid, nil)
	if err != nil {
		t.Fatal(err)
	}
	_ = owner.Process.Kill()
	_ = owner.Wait()
	// Another open of the record stands for the releasing process: OFD
	// locks of different open files conflict, even in one process.
	other, err := os.OpenFile(p.rec.f.Name(), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	lk := unix.Flock_t{Type: unix.F_WRLCK, Start: int64(headerSize + l.Slot()*lineSize), Len: lineSize}
	if err := unix.FcntlFlock(other.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
		t.Fatal(err)
	}
	if n, err := p.Reclaim(); err != nil || n != 0 {
		t.Fatalf("Reclaim while it is being released: %d %v, want 0", n, err)
	}
	if _, err := p.Acquire(context.Background(), "orphan", 0, nil); !errors.Is(err, ErrExist) {
		t.Fatalf("Acquire of its name while it is being released: %v, want ErrExist", err)
	}
	if err := p.Destroy(false); !errors.Is(err, ErrBusy) {
		t.Fatalf("Destroy while it is being released: %v, want ErrBusy", err)
	}
	lk.Type = unix.F_UNLCK
	if err := unix.FcntlFlock(other.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
		t.Fatal(err)
	}
	if n, err := p.Reclaim(); err != nil || n != 1 {
		t.Fatalf("Reclaim once the line is free: %d %v, want 1", n, err)
	}
	checkNoLeaks(t, p)
}

// TestReleaseHint: Release finds its slot by the hint, by the record when
// the hint is wrong, and does nothing for a name that holds no lease.
func TestReleaseHint(t *testing.T) {
	p := openPool(t, Options{Root: fakeTree(t, ModeV1), Parent: "p", LowWater: -1})
	if err := p.Init(3); err != nil {
		t.Fatal(err)
	}
	a, err := p.Acquire(context.Background(), "a", 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Acquire(context.Background(), "b", 0, nil); err != nil {
		t.Fatal(err)
	}
	// A fresh open, as rund delete is: no hint but the one it is given.
	q := openPool(t, Options{Root: p.opts.Root, Parent: "p", StateDir: p.opts.StateDir, LowWater: -1})
	q.Hint("b", a.Slot()) // wrong
	if err := q.Release("b"); err != nil {
		t.Fatal(err)
	}
	q.Hint("a", a.Slot())
	if err := q.Release("a"); err != nil {
		t.Fatal(err)
	}
	if err := q.Release("nobody"); err != nil {
		t.Fatalf("release of a name without a lease: %v", err)
	}
	checkNoLeaks(t, q)
}
