// Command cgpool measures cgroup setup for sandboxes: a lease from the
// cgroup pool (acquire by rename + write of the limits that differ from the
// slot's, release = emptiness check + rename back, limits left for the next
// acquire to overwrite) against creating and destroying a cgroup per
// sandbox (mkdir + apply + rmdir through github.com/opencontainers/cgroups'
// fs manager, as runc does: a cgroup in every mounted hierarchy), at
// several concurrency levels, in one process. Both sides apply the same
// limits; sandbox i gets one of -shapes memory sizes (the pool takes an
// idle slot of the same shape when it has one, else it rewrites the
// memory limit). Each side runs after the host has
// settled from the previous one (cgroup removal leaves kernel work behind);
// the two alternate -repeat times per level and the median run counts.
// It prints a table and writes the figures as JSON, with the hierarchies
// each side touched. It needs root and leaves nothing behind.
//
//	go run ./hack/bench/cgpool -workers 1,10,50,200 -n 2000 -out cgpool.json
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/cgroups"
	"github.com/opencontainers/cgroups/fs"
	"github.com/opencontainers/cgroups/fs2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/rund-dev/rund/cgpool"
	"github.com/rund-dev/rund/hack/bench/benchutil"
)

// sandbox shape: what a 256 MiB, half-CPU container asks for.
const (
	memLimit = 256 << 20
	overhead = 32 << 20
	shares   = 512
	quota    = 50000
	period   = 100000
	pids     = 1024
)

type dist struct {
	P50us float64 `json:"p50_us"`
	P99us float64 `json:"p99_us"`
}

type result struct {
	Method string `json:"method"`
	// Hierarchies are the cgroup hierarchies (controllers) the method
	// touches per sandbox.
	Hierarchies []string `json:"hierarchies"`
	// Renamed are the controllers whose hierarchies the pool renames a
	// slot in; in its other hierarchies a lease keeps the slot's name.
	Renamed []string `json:"renamed,omitempty"`
	Workers int      `json:"workers"`
	N       int      `json:"n"`
	WallMs  float64  `json:"wall_ms"`
	Setup   dist     `json:"setup"`
	Teardn  dist     `json:"teardown"`
	Op      dist     `json:"op"`
	ProcCPU float64  `json:"process_cpu_ms"`
	HostCPU float64  `json:"host_cpu_ms"`
	// TailCPU is host CPU time in the settle period after the run: kernel
	// work the method left behind (cgroup freeing in kworkers, RCU).
	TailCPU float64 `json:"host_cpu_tail_ms"`
	Errors  int     `json:"errors"`
	// Runs is how many times the method ran at this level; the figures
	// above are those of the run of median wall time, RunsWallMs all the
	// runs' wall times, sorted.
	Runs       int       `json:"runs"`
	RunsWallMs []float64 `json:"runs_wall_ms"`
}

type run struct {
	Mode        string   `json:"mode"`
	Root        string   `json:"root"`
	Hierarchies int      `json:"hierarchies"`
	Resources   string   `json:"resources"`
	Shapes      int      `json:"shapes"`
	Note        string   `json:"note,omitempty"`
	Results     []result `json:"results"`
	Speedup     []string `json:"speedup"`
}

func main() {
	workers := flag.String("workers", "1,10,50,200", "comma-separated concurrency levels")
	n := flag.Int("n", 2000, "cgroup setups per method and level")
	out := flag.String("out", "", "write the figures as JSON to this file")
	root := flag.String("root", cgpool.DefaultRoot, "cgroup filesystem root")
	parent := flag.String("parent", "rund-bench", "parent cgroup for the benchmark (removed afterwards)")
	v2root := flag.String("v2root", "auto", `cgroup2 tree for a v2 pass ("auto": <root>/unified on a hybrid host, "" to skip)`)
	ctrls := flag.String("controllers", "", `v1 controllers of the pool's slots ("": cgpool.DefaultControllers; "all": every hierarchy)`)
	flag.StringVar(&stateRoot, "state", "/dev/shm", "where the pool records go: a tmpfs, as /run is on a standard host (here /run is on the root disk)")
	flag.BoolVar(&perWorker, "pool-per-worker", false, "each worker opens the pool itself, as separate rund processes would, instead of sharing one open")
	flag.IntVar(&repeat, "repeat", 3, "runs of each method per level, alternating; the median run is reported")
	flag.IntVar(&shapes, "shapes", 4, "number of distinct sandbox memory sizes (1: every sandbox alike)")
	flag.DurationVar(&settle, "settle", 10*time.Second, "longest wait for the host to go idle between runs")
	flag.Parse()
	if repeat < 1 {
		fatal(fmt.Errorf("bad -repeat %d", repeat))
	}
	if *ctrls != "" {
		controllers = strings.Split(*ctrls, ",")
	}
	var levels []int
	for _, f := range strings.Split(*workers, ",") {
		w, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || w <= 0 {
			fatal(fmt.Errorf("bad -workers %q", *workers))
		}
		levels = append(levels, w)
	}
	var runs []run
	r, err := bench(*root, cgpool.ModeAuto, *parent, levels, *n)
	if err != nil {
		fatal(err)
	}
	runs = append(runs, r)
	if r.Mode == string(cgpool.ModeV1) {
		v2 := *v2root
		if v2 == "auto" {
			v2 = filepath.Join(*root, "unified")
		}
		var st unix.Statfs_t
		if v2 == "" || unix.Statfs(v2, &st) != nil || st.Type != unix.CGROUP2_SUPER_MAGIC {
			runs = append(runs, run{Mode: "v2", Root: v2, Note: "not run: no cgroup2 tree on this host"})
		} else if r2, err := bench(v2, cgpool.ModeV2, *parent, levels, *n); err != nil {
			runs = append(runs, run{Mode: "v2", Root: v2, Note: "not run: " + err.Error()})
		} else {
			runs = append(runs, r2)
		}
	}
	for _, r := range runs {
		print(r)
	}
	if *out != "" {
		b, _ := json.MarshalIndent(runs, "", "  ")
		if err := os.WriteFile(*out, append(b, '\n'), 0o644); err != nil {
			fatal(err)
		}
	}
}

var (
	perWorker   bool
	repeat      int
	stateRoot   string
	shapes      int
	settle      time.Duration
	controllers []string
)

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "cgpool bench:", err)
	os.Exit(1)
}

// memFor is sandbox i's memory limit: one of shapes sizes.
func memFor(i int) int64 { return memLimit + int64(i%shapes)*64<<20 }

// withShape returns res with sandbox i's memory limit.
func withShape(res *specs.LinuxResources, i int) *specs.LinuxResources {
	if res.Memory == nil {
		return res
	}
	r := *res
	l := memFor(i)
	r.Memory = &specs.LinuxMemory{Limit: &l}
	return &r
}

// spec returns the sandbox's resources, as much of them as the tree's
// controllers can take.
func spec(mode cgpool.Mode, root string) (*specs.LinuxResources, string) {
	l, q, sh, pe, pl := int64(memLimit), int64(quota), uint64(shares), uint64(period), int64(pids)
	if mode == cgpool.ModeV1 {
		return &specs.LinuxResources{
			Memory: &specs.LinuxMemory{Limit: &l},
			CPU:    &specs.LinuxCPU{Shares: &sh, Quota: &q, Period: &pe},
			Pids:   &specs.LinuxPids{Limit: &pl},
		}, fmt.Sprintf("memory 256MiB+k*64MiB (k=i%%%d; +32MiB overhead), cpu shares 512, quota 50000/100000, pids 1024", shapes)
	}
	ctrls, _ := os.ReadFile(filepath.Join(root, "cgroup.controllers"))
	have := strings.Fields(string(ctrls))
	res := &specs.LinuxResources{}
	var got []string
	for _, c := range have {
		switch c {
		case "memory":
			res.Memory = &specs.LinuxMemory{Limit: &l}
			got = append(got, "memory")
		case "cpu":
			res.CPU = &specs.LinuxCPU{Shares: &sh, Quota: &q, Period: &pe}
			got = append(got, "cpu")
		case "pids":
			res.Pids = &specs.LinuxPids{Limit: &pl}
			got = append(got, "pids")
		}
	}
	if len(got) == 0 {
		return res, "none: the cgroup2 tree has no memory/cpu/pids controller here (all are bound to v1)"
	}
	return res, strings.Join(got, ",")
}

func bench(root string, mode cgpool.Mode, parent string, levels []int, n int) (run, error) {
	state, err := os.MkdirTemp(stateRoot, "cgpool-bench-")
	if err != nil {
		return run{}, err
	}
	defer os.RemoveAll(state)
	// The parent in every hierarchy, for the baseline.
	top, err := cgpool.Open(cgpool.Options{Root: root, Parent: parent, StateDir: state, Mode: mode,
		Controllers: []string{cgpool.AllControllers}})
	if err != nil {
		return run{}, err
	}
	mode = top.Mode()
	res, resDesc := spec(mode, root)
	topPaths := top.ParentPaths()
	_ = top.Destroy(true) // its record only: the pool runs make their own
	_ = top.Close()
	defer removeTree(topPaths)
	rr := run{Mode: string(mode), Root: root, Hierarchies: len(uniq(topPaths)), Resources: resDesc, Shapes: shapes}
	if mode == cgpool.ModeV2 {
		rr.Note = "cgroup v2 cannot rename a cgroup: the pool leases slots in place (name kept in an xattr)"
	}
	for _, w := range levels {
		// Alternate the methods, repeat times, and keep each one's run of
		// median wall time: a 100ms run on this shared VM varies by tens
		// of percent from one to the next.
		var bases, pools []result
		for range repeat {
			base, err := runBaseline(mode, res, parent, topPaths, w, n)
			if err != nil {
				return rr, err
			}
			pool, err := runPool(root, mode, parent, state, res, w, n)
			if err != nil {
				return rr, err
			}
			bases, pools = append(bases, base), append(pools, pool)
		}
		base, pool := median(bases), median(pools)
		rr.Results = append(rr.Results, base, pool)
		rr.Speedup = append(rr.Speedup, fmt.Sprintf("%d workers: %.1fx wall, %.1fx host CPU (medians of %d; wall ms mkdir %s, pool %s)",
			w, base.WallMs/pool.WallMs, base.HostCPU/max(pool.HostCPU, 0.001), repeat, walls(base), walls(pool)))
	}
	return rr, nil
}

func walls(r result) string {
	var f []string
	for _, w := range r.RunsWallMs {
		f = append(f, fmt.Sprintf("%.0f", w))
	}
	return strings.Join(f, "/")
}

// median returns the run of median wall time, with every run's wall time.
func median(rs []result) result {
	sort.Slice(rs, func(i, j int) bool { return rs[i].WallMs < rs[j].WallMs })
	m := rs[len(rs)/2]
	m.Runs = len(rs)
	for _, r := range rs {
		m.RunsWallMs = append(m.RunsWallMs, r.WallMs)
	}
	return m
}

func uniq(m map[string]string) []string {
	set := map[string]bool{}
	for _, v := range m {
		set[v] = true
	}
	var out []string
	for v := range set {
		out = append(out, v)
	}
	sort.Strings(out)
	return out
}

func removeTree(paths map[string]string) {
	for _, d := range uniq(paths) {
		_ = cgroups.RemovePath(d)
	}
}

// op is one setup (create/acquire + apply) and one teardown.
type op func(i int) (setup, teardown time.Duration, err error)

func measure(method string, w, n int, fn op) result {
	setup := make([]time.Duration, n)
	tear := make([]time.Duration, n)
	total := make([]time.Duration, n)
	var errs int
	var mu sync.Mutex
	next := make(chan int, n)
	for i := range n {
		next <- i
	}
	close(next)
	waitIdle()
	warmUp()
	cpu0, host0 := procCPU(), hostCPU()
	start := time.Now()
	var wg sync.WaitGroup
	for range w {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				s, t, err := fn(i)
				setup[i], tear[i], total[i] = s, t, s+t
				if err != nil {
					mu.Lock()
					if errs == 0 {
						fmt.Fprintf(os.Stderr, "%s: %v\n", method, err)
					}
					errs++
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	wall := time.Since(start)
	cpu1, host1 := procCPU(), hostCPU()
	waitIdle()
	return result{
		Method: method, Workers: w, N: n, Errors: errs,
		WallMs:  ms(wall),
		Setup:   percentiles(setup),
		Teardn:  percentiles(tear),
		Op:      percentiles(total),
		ProcCPU: ms(cpu1 - cpu0),
		HostCPU: ms(host1 - host0),
		TailCPU: ms(hostCPU() - host1),
	}
}

// waitIdle waits, up to settle, until the kernel has freed the cgroups the
// previous run removed (the count of cgroups in /proc/cgroups, dying ones
// included, has stopped falling: freeing them takes cgroup_mutex, which the
// next run's renames and mkdirs need too) and the host's CPUs were under
// 20% busy for 100ms: other engineers share the machine, and cgroup removal
// goes on in kworkers after rmdir has returned.
func waitIdle() {
	deadline := time.Now().Add(settle)
	for last, same := liveCgroups(), 0; same < 5 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
		n := liveCgroups()
		if n < last {
			same = 0
		} else {
			same++
		}
		last = n
	}
	for time.Now().Before(deadline) {
		h0, t0 := hostCPU(), time.Now()
		time.Sleep(100 * time.Millisecond)
		if float64(hostCPU()-h0) < 0.2*float64(time.Since(t0))*float64(runtime.NumCPU()) {
			return
		}
	}
}

// liveCgroups sums the cgroup counts of /proc/cgroups, dying ones
// included, over the controllers whose dying cgroups go away: memory is
// left out, as a memory cgroup that still has pages charged to it can
// linger for long after its removal.
func liveCgroups() int {
	b, err := os.ReadFile("/proc/cgroups")
	if err != nil {
		return 0
	}
	n := 0
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 || strings.HasPrefix(f[0], "#") || f[0] == "memory" {
			continue
		}
		c, _ := strconv.Atoi(f[2])
		n += c
	}
	return n
}

// warmUp keeps every CPU busy for 50ms: this machine is a VM whose vCPUs
// start slow after the idle wait (a run of 100ms, as the pool's are, came
// out 10-40% slower right after it), and both methods should start alike.
func warmUp() {
	var wg sync.WaitGroup
	end := time.Now().Add(50 * time.Millisecond)
	for range runtime.NumCPU() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(end) {
			}
		}()
	}
	wg.Wait()
}

func runBaseline(mode cgpool.Mode, res *specs.LinuxResources, parent string, parents map[string]string, w, n int) (result, error) {
	var touched []string
	if mode == cgpool.ModeV1 {
		// runc's fs manager picks the hierarchies itself: all of them.
		m, err := fs.NewManager(&cgroups.Cgroup{Path: "/" + parent + "/probe", Resources: &cgroups.Resources{}}, nil)
		if err != nil {
			return result{}, err
		}
		for k := range m.GetPaths() {
			if k == "" {
				k = "unified" // hybrid hosts: runc joins the cgroup2 tree too
			}
			touched = append(touched, k)
		}
		sort.Strings(touched)
	} else {
		touched = []string{"unified"}
	}
	res0 := measure("mkdir+apply+rmdir", w, n, func(i int) (time.Duration, time.Duration, error) {
		r := libResources(withShape(res, i))
		name := fmt.Sprintf("mk-%d", i)
		var m cgroups.Manager
		var err error
		cg := &cgroups.Cgroup{Resources: r, Path: "/" + parent + "/" + name}
		t0 := time.Now()
		if mode == cgpool.ModeV2 {
			// fs2's Apply assumes the cgroup2 mount is /sys/fs/cgroup, so
			// create the directory by hand, as it would.
			dir := filepath.Join(parents[""], name)
			if err = os.Mkdir(dir, 0o755); err == nil {
				m, err = fs2.NewManager(cg, dir)
			}
		} else {
			m, err = fs.NewManager(cg, nil)
		}
		if err == nil {
			if mode == cgpool.ModeV1 {
				err = m.Apply(-1)
			}
			if err == nil {
				err = m.Set(r)
			}
		}
		t1 := time.Now()
		if m != nil {
			err = errors.Join(err, m.Destroy())
		}
		return t1.Sub(t0), time.Since(t1), err
	})
	res0.Hierarchies = touched
	return res0, nil
}

// libResources is the spec as runc's libcontainer would hand it to the
// cgroup manager, with the same memory overhead the pool adds.
func libResources(res *specs.LinuxResources) *cgroups.Resources {
	r := &cgroups.Resources{}
	if res.Memory != nil {
		r.Memory = *res.Memory.Limit + overhead
	}
	if res.CPU != nil {
		r.CpuShares, r.CpuQuota, r.CpuPeriod = *res.CPU.Shares, *res.CPU.Quota, *res.CPU.Period
	}
	if res.Pids != nil {
		l := *res.Pids.Limit
		r.PidsLimit = &l
	}
	return r
}

func runPool(root string, mode cgpool.Mode, parent, state string, res *specs.LinuxResources, w, n int) (result, error) {
	p, err := cgpool.Open(cgpool.Options{
		Root: root, Parent: parent, StateDir: state, Mode: mode, MemoryOverhead: overhead,
		Controllers: controllers,
	})
	if err != nil {
		return result{}, err
	}
	defer p.Close()
	// Pre-created, as `rund pool init` would: one slot per worker plus the
	// low-water margin, so the background refill stays idle.
	if err := p.Init(w + 2*cgpool.DefaultLowWater); err != nil {
		return result{}, err
	}
	// Each op takes a pool from opened and puts it back: with
	// -pool-per-worker there are as many as workers, each its own open of
	// the pool (own record file, own cache), as separate rund processes
	// would have.
	opened := make(chan *cgpool.Pool, w)
	opened <- p
	for range w - 1 {
		if !perWorker {
			opened <- p
			continue
		}
		q, err := cgpool.Open(cgpool.Options{Root: root, Parent: parent, StateDir: state, Mode: mode, MemoryOverhead: overhead})
		if err != nil {
			return result{}, err
		}
		defer q.Close()
		opened <- q
	}
	method := "pool acquire+apply+release"
	if perWorker {
		method = "pool (open per worker)"
	}
	ctx := context.Background()
	r := measure(method, w, n, func(i int) (time.Duration, time.Duration, error) {
		q := <-opened
		defer func() { opened <- q }()
		name := fmt.Sprintf("c-%d", i)
		rs := withShape(res, i)
		t0 := time.Now()
		_, err := q.Acquire(ctx, name, 0, rs)
		t1 := time.Now()
		if err != nil {
			return t1.Sub(t0), 0, err
		}
		err = q.Release(name)
		return t1.Sub(t0), time.Since(t1), err
	})
	r.Hierarchies, r.Renamed = p.Controllers(), p.NamedControllers()
	if mode == cgpool.ModeV2 {
		r.Hierarchies = []string{"unified"}
	}
	if st, err := p.Status(); err == nil && (st.Busy != 0 || st.Leaked != 0) {
		return r, fmt.Errorf("pool left %d busy, %d leaked", st.Busy, st.Leaked)
	}
	if err := p.Destroy(false); err != nil {
		return r, err
	}
	return r, nil
}

func percentiles(d []time.Duration) dist {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	at := func(q float64) float64 {
		return float64(s[min(len(s)-1, int(q*float64(len(s))))]) / float64(time.Microsecond)
	}
	return dist{P50us: at(0.50), P99us: at(0.99)}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// procCPU is this process's user+system time, children included.
func procCPU() time.Duration {
	var t time.Duration
	for _, who := range []int{unix.RUSAGE_SELF, unix.RUSAGE_CHILDREN} {
		var ru unix.Rusage
		if unix.Getrusage(who, &ru) == nil {
			t += time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
		}
	}
	return t
}

// hostCPU is the busy time of all CPUs from /proc/stat: it includes the
// kernel work that cgroup removal defers to kworkers, which the process's
// own rusage does not see.
func hostCPU() time.Duration {
	busy, _ := benchutil.CPUTicks()
	return time.Duration(busy) * (time.Second / 100) // USER_HZ
}

func print(r run) {
	fmt.Printf("\ncgroup %s at %s (%d hierarchies); resources: %s\n", r.Mode, r.Root, r.Hierarchies, r.Resources)
	if r.Note != "" {
		fmt.Printf("note: %s\n", r.Note)
	}
	if len(r.Results) == 0 {
		return
	}
	fmt.Printf("%-28s %7s %6s %10s %11s %11s %11s %11s %11s %11s %9s %9s %9s %4s\n",
		"method", "workers", "n", "wall ms", "setup p50", "setup p99", "tear p50", "tear p99", "op p50 us", "op p99 us", "proc cpu", "host cpu", "tail cpu", "err")
	for _, x := range r.Results {
		fmt.Printf("%-28s %7d %6d %10.1f %11.1f %11.1f %11.1f %11.1f %11.1f %11.1f %9.0f %9.0f %9.0f %4d\n",
			x.Method, x.Workers, x.N, x.WallMs, x.Setup.P50us, x.Setup.P99us, x.Teardn.P50us, x.Teardn.P99us,
			x.Op.P50us, x.Op.P99us, x.ProcCPU, x.HostCPU, x.TailCPU, x.Errors)
	}
	seen := map[string]bool{}
	for _, x := range r.Results {
		if !seen[x.Method] {
			seen[x.Method] = true
			fmt.Printf("%s touches %d hierarchies: %s\n", x.Method, len(x.Hierarchies), strings.Join(x.Hierarchies, " "))
			if len(x.Renamed) > 0 {
				fmt.Printf("  renames a slot where it holds %s; leases keep the slot's name in the others\n", strings.Join(x.Renamed, " "))
			}
		}
	}
	for _, s := range r.Speedup {
		fmt.Println("speedup", s)
	}
}
