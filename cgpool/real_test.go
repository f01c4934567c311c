package cgpool

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/cgroups"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// helperEnv makes the test binary a pool client that acquires and releases
// until it is killed: "root|mode|parent|statedir".
const helperEnv = "CGPOOL_TEST_HELPER"

func helperMain() {
	f := strings.Split(os.Getenv(helperEnv), "|")
	p, err := Open(Options{Root: f[0], Mode: Mode(f[1]), Parent: f[2], StateDir: f[3]})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	res := testResources(p.Mode())
	for i := 0; ; i++ {
		name := fmt.Sprintf("h-%d-%d", os.Getpid(), i)
		if _, err := p.Acquire(context.Background(), name, 0, res); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		if i%2 == 0 {
			_ = p.Release(name) // odd leases stay busy until the kill
		}
	}
}

// realTree is a real cgroup tree this host can test on.
type realTree struct {
	name, root string
	mode       Mode
}

func realTrees(t *testing.T) []realTree {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create cgroups")
	}
	var out []realTree
	if mode, _, err := detect(DefaultRoot, ModeAuto); err == nil {
		out = append(out, realTree{string(mode), DefaultRoot, mode})
	}
	var st unix.Statfs_t
	if u := filepath.Join(DefaultRoot, "unified"); unix.Statfs(u, &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC {
		out = append(out, realTree{"v2-hybrid", u, ModeV2})
	}
	if len(out) == 0 {
		t.Skip("no cgroup filesystem at " + DefaultRoot)
	}
	return out
}

// openReal opens a pool under a parent unique to the test, removed at the
// end with everything below it.
func openReal(t *testing.T, rt realTree, opts Options) *Pool {
	t.Helper()
	top := fmt.Sprintf("rund-test-%d", os.Getpid())
	opts.Root, opts.Mode = rt.root, rt.mode
	opts.Parent = top + "/" + strings.NewReplacer("/", "-").Replace(t.Name())
	p := openPool(t, opts)
	t.Cleanup(func() {
		if err := p.Destroy(true); err != nil {
			t.Error(err)
		}
		for _, d := range p.ParentPaths() {
			_ = cgroups.RemovePath(d)
			_ = unix.Rmdir(filepath.Dir(d))
		}
	})
	return p
}

// testResources is a sandbox's limits, as far as the tree's controllers go.
func testResources(mode Mode) *specs.LinuxResources {
	if mode == ModeV2 {
		return nil // the hybrid cgroup2 tree here has no memory/cpu/pids
	}
	l, q, sh, pe, pl := int64(64<<20), int64(25000), uint64(256), uint64(100000), int64(100)
	return &specs.LinuxResources{
		Memory: &specs.LinuxMemory{Limit: &l},
		CPU:    &specs.LinuxCPU{Shares: &sh, Quota: &q, Period: &pe},
		Pids:   &specs.LinuxPids{Limit: &pl},
	}
}

func readTrim(t *testing.T, dir, file string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, file))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func TestRealCycles(t *testing.T) {
	for _, rt := range realTrees(t) {
		t.Run(rt.name, func(t *testing.T) {
			p := openReal(t, rt, Options{})
			const cycles, workers = 500, 20
			res := testResources(rt.mode)
			var wg sync.WaitGroup
			errs := make(chan error, cycles)
			next := make(chan int, cycles)
			for i := range cycles {
				next <- i
			}
			close(next)
			for range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range next {
						name := "cyc-" + strconv.Itoa(i)
						if _, err := p.Acquire(context.Background(), name, 0, res); err != nil {
							errs <- err
							continue
						}
						if err := p.Release(name); err != nil {
							errs <- err
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			p.refillWG.Wait()
			checkNoLeaks(t, p)
		})
	}
}

func TestRealResourcesAndKill(t *testing.T) {
	for _, rt := range realTrees(t) {
		t.Run(rt.name, func(t *testing.T) {
			p := openReal(t, rt, Options{MemoryOverhead: 16 << 20, LowWater: -1})
			l, err := p.Acquire(context.Background(), "ctr", 0, testResources(rt.mode))
			if err != nil {
				t.Fatal(err)
			}
			paths := l.Paths()
			if rt.mode == ModeV1 {
				checks := []struct{ ctrl, file, want string }{
					{"memory", "memory.limit_in_bytes", strconv.Itoa(64<<20 + 16<<20)},
					{"cpu", "cpu.cfs_quota_us", "25000"},
					{"cpu", "cpu.shares", "256"},
					{"pids", "pids.max", "100"},
				}
				for _, c := range checks {
					if got := readTrim(t, paths[c.ctrl], c.file); got != c.want {
						t.Errorf("%s: got %s, want %s", c.file, got, c.want)
					}
				}
				if filepath.Base(paths["memory"]) != "ctr" {
					t.Errorf("got memory path %s, want it named ctr", paths["memory"])
				}
			}
			// The VMM is created first, then joins the cgroup.
			vmm := exec.Command("sleep", "1000")
			if err := vmm.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() { _ = vmm.Process.Kill() }()
			if err := l.AddProcess(vmm.Process.Pid); err != nil {
				t.Fatal(err)
			}
			for _, d := range paths {
				if procs := readProcs(d); len(procs) != 1 || procs[0] != vmm.Process.Pid {
					t.Fatalf("%s: got procs %v, want [%d]", d, procs, vmm.Process.Pid)
				}
			}
			if rt.mode == ModeV1 {
				// The lease's CPU time is counted, and a lease that had
				// some hands the slot on with none.
				burn := exec.Command("sh", "-c", "while :; do :; done")
				if err := burn.Start(); err != nil {
					t.Fatal(err)
				}
				defer func() { _ = burn.Process.Kill(); _ = burn.Wait() }()
				if err := l.AddProcess(burn.Process.Pid); err != nil {
					t.Fatal(err)
				}
				time.Sleep(200 * time.Millisecond)
				if got := readTrim(t, paths["cpuacct"], "cpuacct.usage"); got == "0" {
					t.Errorf("cpuacct.usage of a lease that ran a busy loop: %s", got)
				}
			}
			if err := l.Release(); err != nil {
				t.Fatal(err)
			}
			err = vmm.Wait()
			if ws, ok := vmm.ProcessState.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
				t.Fatalf("process left in the cgroup: got %v, want killed by SIGKILL", err)
			}
			if rt.mode == ModeV1 {
				// The limits stay on the idle slot (lazy reset); the next
				// lease of the slot, which asks for none, must not see them.
				next, err := p.Acquire(context.Background(), "next", 0, nil)
				if err != nil || next.Slot() != l.Slot() {
					t.Fatalf("re-acquire: got %v %v, want slot %d", next, err, l.Slot())
				}
				np := next.Paths()
				checks := []struct{ ctrl, file, want string }{
					{"memory", "memory.limit_in_bytes", "9223372036854771712"},
					{"cpu", "cpu.cfs_quota_us", "-1"},
					{"cpu", "cpu.shares", "1024"},
					{"pids", "pids.max", "max"},
					{"cpuacct", "cpuacct.usage", "0"},
				}
				for _, c := range checks {
					if got := readTrim(t, np[c.ctrl], c.file); got != c.want {
						t.Errorf("next lease's %s: got %s, want %s", c.file, got, c.want)
					}
				}
				if err := next.Release(); err != nil {
					t.Fatal(err)
				}
			}
			checkNoLeaks(t, p)
		})
	}
}

func TestRealKilledHolders(t *testing.T) {
	for _, rt := range realTrees(t) {
		t.Run(rt.name, func(t *testing.T) {
			state := t.TempDir()
			p := openReal(t, rt, Options{StateDir: state})
			if err := p.Init(4); err != nil {
				t.Fatal(err)
			}
			self, err := os.Executable()
			if err != nil {
				t.Fatal(err)
			}
			rng := rand.New(rand.NewPCG(uint64(os.Getpid()), 1))
			for i := range 20 {
				cmd := exec.Command(self)
				cmd.Env = append(os.Environ(), helperEnv+"="+strings.Join([]string{rt.root, string(rt.mode), p.Parent(), state}, "|"))
				var stderr strings.Builder
				cmd.Stderr = &stderr
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				// Kill it at a random point: before it opened the pool, in
				// the middle of a rename, an apply, a refill...
				time.Sleep(time.Duration(rng.IntN(40000)) * time.Microsecond)
				_ = cmd.Process.Signal(syscall.SIGKILL)
				_ = cmd.Wait()
				if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Exited() {
					t.Fatalf("helper %d exited on its own: %v: %s", i, ws.ExitStatus(), stderr.String())
				}
				// Any flock died with the holder: this must not block.
				if _, err := p.Status(); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := p.Reclaim(); err != nil {
				t.Fatal(err)
			}
			checkNoLeaks(t, p)
		})
	}
}

func TestRealCorruptRecord(t *testing.T) {
	for _, rt := range realTrees(t) {
		t.Run(rt.name, func(t *testing.T) {
			state := t.TempDir()
			p := openReal(t, rt, Options{StateDir: state, LowWater: -1})
			if err := p.Init(3); err != nil {
				t.Fatal(err)
			}
			l, err := p.Acquire(context.Background(), "running", 0, testResources(rt.mode))
			if err != nil {
				t.Fatal(err)
			}
			vmm := startSleeper(t)
			if err := l.AddProcess(vmm.Process.Pid); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(recordPath(p.opts), []byte("rund-cgpool 1 v9 x\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			q := openPool(t, Options{Root: rt.root, Mode: rt.mode, Parent: p.Parent(), StateDir: state, LowWater: -1})
			if _, err := q.Acquire(context.Background(), "next", 0, nil); err != nil {
				t.Fatal(err)
			}
			// The running sandbox was found in the tree and kept, owned by
			// the process inside it.
			got, err := q.Lease("running")
			if err != nil || got.Slot() != l.Slot() {
				t.Fatalf("lease after rebuild: got %v %v, want slot %d", got, err, l.Slot())
			}
			if vmm.ProcessState != nil || unix.Kill(vmm.Process.Pid, 0) != nil {
				t.Fatal("rebuild killed a running sandbox")
			}
			for _, n := range []string{"running", "next"} {
				if err := q.Release(n); err != nil {
					t.Fatal(err)
				}
			}
			checkNoLeaks(t, q)
		})
	}
}

// TestRealShapes leases one slot again and again with changing limits and
// checks that each lease sees exactly its own: nothing left over from the
// previous lease (lazy reset), whether that one ended by Release or by its
// holder dying.
func TestRealShapes(t *testing.T) {
	rt := realTrees(t)[0]
	if rt.mode != ModeV1 {
		t.Skip("the limits checked here are v1 files")
	}
	p := openReal(t, rt, Options{LowWater: -1})
	i64 := func(v int64) *int64 { return &v }
	u64 := func(v uint64) *uint64 { return &v }
	shapes := []*specs.LinuxResources{
		{Memory: &specs.LinuxMemory{Limit: i64(64 << 20)}, Pids: &specs.LinuxPids{Limit: i64(50)}},
		{Memory: &specs.LinuxMemory{Limit: i64(64 << 20)}, Pids: &specs.LinuxPids{Limit: i64(50)}},
		{Memory: &specs.LinuxMemory{Limit: i64(96 << 20)}, CPU: &specs.LinuxCPU{Shares: u64(256), Quota: i64(20000), Period: u64(50000)}},
		nil,
		{Memory: &specs.LinuxMemory{Limit: i64(32 << 20), Swap: i64(64 << 20)}, CPU: &specs.LinuxCPU{Quota: i64(30000)}},
		{Memory: &specs.LinuxMemory{Limit: i64(128 << 20)}},
		{Pids: &specs.LinuxPids{Limit: i64(70)}},
	}
	want := func(res *specs.LinuxResources) map[string]string {
		w := map[string]string{
			"memory.limit_in_bytes": "9223372036854771712", "cpu.shares": "1024",
			"cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "100000", "pids.max": "max",
		}
		if res == nil {
			return w
		}
		if m := res.Memory; m != nil && m.Limit != nil {
			w["memory.limit_in_bytes"] = strconv.FormatInt(*m.Limit, 10)
		}
		if c := res.CPU; c != nil {
			if c.Shares != nil {
				w["cpu.shares"] = strconv.FormatUint(*c.Shares, 10)
			}
			if c.Quota != nil {
				w["cpu.cfs_quota_us"] = strconv.FormatInt(*c.Quota, 10)
			}
			if c.Period != nil {
				w["cpu.cfs_period_us"] = strconv.FormatUint(*c.Period, 10)
			}
		}
		if pl := res.Pids; pl != nil && pl.Limit != nil {
			w["pids.max"] = strconv.FormatInt(*pl.Limit, 10)
		}
		return w
	}
	ctrlOf := map[string]string{"memory.limit_in_bytes": "memory", "cpu.shares": "cpu", "cpu.cfs_quota_us": "cpu", "cpu.cfs_period_us": "cpu", "pids.max": "pids"}
	for round := range 2 {
		for i, res := range shapes {
			ownerPid := 0
			var holder *exec.Cmd
			if round == 1 && i%2 == 0 {
				holder = startSleeper(t) // this lease ends with its holder's death
				ownerPid = holder.Process.Pid
			}
			name := fmt.Sprintf("shape-%d-%d", round, i)
			l, err := p.Acquire(context.Background(), name, ownerPid, res)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			if l.Slot() != 0 {
				t.Fatalf("%s: got slot %d, want the one slot 0", name, l.Slot())
			}
			for file, v := range want(res) {
				if got := readTrim(t, l.Paths()[ctrlOf[file]], file); got != v {
					t.Errorf("%s: %s: got %s, want %s", name, file, got, v)
				}
			}
			if holder != nil {
				_ = holder.Process.Kill()
				_ = holder.Wait()
				if n, err := p.Reclaim(); err != nil || n != 1 {
					t.Fatalf("%s: reclaim: got %d %v, want 1", name, n, err)
				}
				continue
			}
			if err := p.Release(name); err != nil {
				t.Fatal(err)
			}
		}
	}
	checkNoLeaks(t, p)
}
