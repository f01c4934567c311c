// Command rootfs measures how long it takes to create a sandbox's writable
// layer, at several levels of concurrency: a reflink clone of a pre-formatted
// ext4 image (what rund does), a sparse copy of it (rund's fallback without
// reflink), a dense copy (every byte, holes included, as a block-level copy
// would), and mkfs.ext4 per sandbox. With -keytree it also measures the
// image cache on a root filesystem tree: the content key walk, a miss (walk
// and mkfs.erofs) and a hit.
//
// Each creation is timed from the call to an open disk descriptor; the disks
// of one round stay open until every creation of the round is done, as the
// sandboxes would, then they are closed untimed. The reflink figures need a
// -dir on a reflink filesystem (see setup-xfs.sh).
//
//	hack/bench/rootfs/setup-xfs.sh /mnt/rund-bench 40G
//	go run ./hack/bench/rootfs -dir /mnt/rund-bench -keytree /some/rootfs -out rootfs.json
//	hack/bench/rootfs/teardown-xfs.sh /mnt/rund-bench
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
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rund-dev/rund/rootfs"
)

// cell is the result of one method at one concurrency.
type cell struct {
	Method      string  `json:"method"`
	Concurrency int     `json:"concurrency"`
	Samples     int     `json:"samples"`
	P50Ms       float64 `json:"p50_ms"`
	P99Ms       float64 `json:"p99_ms"`
	MeanMs      float64 `json:"mean_ms"`
	MaxMs       float64 `json:"max_ms"`
	WallMs      float64 `json:"wall_ms"` // all rounds, creations only
	// Burst figures time each creation from the start of its round: they
	// include the wait for a CPU when c exceeds the number of cores.
	BurstP50Ms float64 `json:"burst_p50_ms"`
	BurstP99Ms float64 `json:"burst_p99_ms"`
	PerSecond  float64 `json:"creations_per_second"`
	Skipped    string  `json:"skipped,omitempty"`
}

type report struct {
	Time        time.Time       `json:"time"`
	Kernel      string          `json:"kernel"`
	CPUs        int             `json:"cpus"`
	Dir         string          `json:"dir"`
	DirFS       string          `json:"dir_fs"`
	Reflink     bool            `json:"reflink"`
	SizeBytes   int64           `json:"size_bytes"`
	BaseAlloc   int64           `json:"base_allocated_bytes"`
	LoadBefore  string          `json:"loadavg_before"`
	LoadAfter   string          `json:"loadavg_after"`
	Results     []cell          `json:"results"`
	Ratios      []ratio         `json:"ratios"`
	ImageCache  *imageCacheCost `json:"image_cache,omitempty"`
	Description string          `json:"description"`
}

type ratio struct {
	Method      string  `json:"method"`
	Concurrency int     `json:"concurrency"`
	P50         float64 `json:"p50_vs_reflink"`
	P99         float64 `json:"p99_vs_reflink"`
}

func main() {
	dir := flag.String("dir", "", "data directory (on XFS with reflink=1 for the reflink figures)")
	sizeFlag := flag.String("size", "256M", "writable disk size")
	concFlag := flag.String("concurrency", "1,50,200", "comma-separated concurrency levels")
	methodsFlag := flag.String("methods", "reflink,copy,dense,mkfs", "methods to measure")
	samples := flag.Int("samples", 200, "minimum creations per method and concurrency")
	denseSamples := flag.Int("dense-samples", 50, "minimum creations per concurrency for dense copies (each writes the whole disk)")
	keytree := flag.String("keytree", "", "root filesystem tree to measure the image cache on")
	out := flag.String("out", "", "write the results as JSON to this file")
	flag.Parse()
	if err := run(*dir, *sizeFlag, *concFlag, *methodsFlag, *samples, *denseSamples, *keytree, *out); err != nil {
		fmt.Fprintln(os.Stderr, "rootfs bench:", err)
		os.Exit(1)
	}
}

func run(dir, sizeFlag, concFlag, methodsFlag string, samples, denseSamples int, keytree, out string) error {
	if dir == "" {
		return errors.New("-dir is required")
	}
	size, err := parseSize(sizeFlag)
	if err != nil {
		return err
	}
	var levels []int
	for _, s := range strings.Split(concFlag, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 {
			return fmt.Errorf("bad concurrency %q", s)
		}
		levels = append(levels, n)
	}
	ctx := context.Background()
	work, err := os.MkdirTemp(dir, "bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)

	r := &report{
		Time: time.Now().UTC(), CPUs: runtime.NumCPU(), Dir: dir, SizeBytes: size,
		Kernel: kernel(), DirFS: fsName(dir), LoadBefore: loadavg(),
		Description: "per-creation latency of a writable disk (open descriptor ready), c creations started together per round",
	}
	stores := map[string]*rootfs.WritableStore{}
	for _, m := range []struct {
		name string
		opts rootfs.WritableOptions
	}{
		{"reflink", rootfs.WritableOptions{}},
		{"copy", rootfs.WritableOptions{NoReflink: true}},
	} {
		s, err := rootfs.OpenWritableStore(ctx, work, size, m.opts)
		if err != nil {
			return err
		}
		defer s.Close()
		stores[m.name] = s
	}
	r.Reflink = stores["reflink"].Reflink()
	base, err := os.Open(stores["reflink"].BasePath())
	if err != nil {
		return err
	}
	defer base.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(base.Fd()), &st); err != nil {
		return err
	}
	r.BaseAlloc = st.Blocks * 512
	fmt.Printf("dir %s (%s, reflink %v), disk %s, base image %s allocated, %d CPUs, kernel %s, load %s\n",
		dir, r.DirFS, r.Reflink, human(size), human(r.BaseAlloc), r.CPUs, r.Kernel, r.LoadBefore)

	methods := map[string]func() (*os.File, error){
		"reflink": stores["reflink"].New,
		"copy":    stores["copy"].New,
		"dense":   func() (*os.File, error) { return denseCopy(work, base, size) },
		"mkfs":    func() (*os.File, error) { return mkfsDisk(ctx, work, size) },
	}
	for _, name := range strings.Split(methodsFlag, ",") {
		create, ok := methods[name]
		if !ok {
			return fmt.Errorf("unknown method %q", name)
		}
		for _, c := range levels {
			var res cell
			switch {
			case name == "reflink" && !r.Reflink:
				res = cell{Method: name, Concurrency: c, Skipped: "no reflink on " + dir}
			case name == "dense" && int64(c)*size > freeBytes(work)*9/10:
				res = cell{Method: name, Concurrency: c, Skipped: fmt.Sprintf("needs %s free, have %s", human(int64(c)*size), human(freeBytes(work)))}
			default:
				n := samples
				if name == "dense" {
					n = denseSamples
				}
				res, err = measure(name, c, n, create, work)
				if err != nil {
					return err
				}
			}
			r.Results = append(r.Results, res)
			fmt.Fprintf(os.Stderr, "  %-8s c=%-4d done\n", name, c)
		}
	}
	r.LoadAfter = loadavg()
	r.Ratios = ratios(r.Results)
	if keytree != "" {
		r.ImageCache, err = measureImageCache(ctx, work, keytree)
		if err != nil {
			return err
		}
	}
	fmt.Printf("load after: %s\n", r.LoadAfter)
	printReport(r)
	if out != "" {
		b, err := json.MarshalIndent(r, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(out, append(b, '\n'), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// measure runs rounds of c creations started together until it has at least
// samples latencies.
func measure(name string, c, samples int, create func() (*os.File, error), dir string) (cell, error) {
	var lat, burst []time.Duration
	var wall time.Duration
	for len(lat) < samples {
		files := make([]*os.File, c)
		errs := make([]error, c)
		times := make([]time.Duration, c)
		doneAt := make([]time.Duration, c)
		start := make(chan struct{})
		var t0 time.Time
		var ready, done sync.WaitGroup
		for i := range c {
			ready.Add(1)
			done.Go(func() {
				ready.Done()
				<-start
				t1 := time.Now()
				files[i], errs[i] = create()
				times[i] = time.Since(t1)
				doneAt[i] = time.Since(t0)
			})
		}
		ready.Wait()
		t0 = time.Now()
		close(start)
		done.Wait()
		wall += time.Since(t0)
		for _, f := range files {
			if f != nil {
				f.Close()
			}
		}
		if err := errors.Join(errs...); err != nil {
			return cell{}, fmt.Errorf("%s at concurrency %d: %w", name, c, err)
		}
		lat = append(lat, times...)
		burst = append(burst, doneAt...)
		settle(dir)
	}
	slices.Sort(lat)
	slices.Sort(burst)
	var sum time.Duration
	for _, d := range lat {
		sum += d
	}
	return cell{
		Method: name, Concurrency: c, Samples: len(lat),
		P50Ms:      ms(pct(lat, 0.50)),
		P99Ms:      ms(pct(lat, 0.99)),
		MeanMs:     ms(sum / time.Duration(len(lat))),
		MaxMs:      ms(lat[len(lat)-1]),
		WallMs:     ms(wall),
		BurstP50Ms: ms(pct(burst, 0.50)),
		BurstP99Ms: ms(pct(burst, 0.99)),
		PerSecond:  float64(len(lat)) / wall.Seconds(),
	}, nil
}

// settle flushes the filesystem so that one round's writeback and freed
// blocks do not land in the next round's timings.
func settle(dir string) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	unix.Syncfs(fd)
	var st unix.Statfs_t
	unix.Fstatfs(fd, &st) // XFS: hastens freeing closed, unlinked files
}

// pct returns the q quantile of sorted latencies (nearest rank).
func pct(sorted []time.Duration, q float64) time.Duration {
	i := int(float64(len(sorted))*q+0.999999) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// denseCopy copies every byte of base, holes as zeros, into a new unlinked
// file in dir: what copying a disk without regard to sparseness costs.
func denseCopy(dir string, base *os.File, size int64) (*os.File, error) {
	fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("creating dense copy: %w", err)
	}
	f := os.NewFile(uintptr(fd), "dense")
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		n, err := base.ReadAt(buf, off)
		if n == 0 && err != nil {
			f.Close()
			return nil, fmt.Errorf("reading base: %w", err)
		}
		if _, err := f.WriteAt(buf[:n], off); err != nil {
			f.Close()
			return nil, fmt.Errorf("writing dense copy: %w", err)
		}
	}
	return f, nil
}

// mkfsDisk formats a new disk with mkfs.ext4, then opens and unlinks it.
func mkfsDisk(ctx context.Context, dir string, size int64) (*os.File, error) {
	f, err := os.CreateTemp(dir, "mkfs-*")
	if err != nil {
		return nil, err
	}
	f.Close()
	defer os.Remove(f.Name())
	if err := rootfs.FormatExt4(ctx, f.Name(), size); err != nil {
		return nil, err
	}
	return os.OpenFile(f.Name(), os.O_RDWR, 0)
}

func ratios(results []cell) []ratio {
	ref := map[int]cell{}
	for _, c := range results {
		if c.Method == "reflink" && c.Skipped == "" {
			ref[c.Concurrency] = c
		}
	}
	var out []ratio
	for _, c := range results {
		r, ok := ref[c.Concurrency]
		if !ok || c.Method == "reflink" || c.Skipped != "" || r.P50Ms == 0 || r.P99Ms == 0 {
			continue
		}
		out = append(out, ratio{c.Method, c.Concurrency, c.P50Ms / r.P50Ms, c.P99Ms / r.P99Ms})
	}
	return out
}

func printReport(r *report) {
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "method\tconcurrency\tsamples\tp50 ms\tp99 ms\tmean ms\tmax ms\tburst p50\tburst p99\tper s\t")
	for _, c := range r.Results {
		if c.Skipped != "" {
			fmt.Fprintf(w, "%s\t%d\t-\t-\t-\t-\t-\t-\t-\t-\t(skipped: %s)\n", c.Method, c.Concurrency, c.Skipped)
			continue
		}
		fmt.Fprintf(w, "%s\t%d\t%d\t%.3f\t%.3f\t%.3f\t%.3f\t%.3f\t%.3f\t%.0f\t\n",
			c.Method, c.Concurrency, c.Samples, c.P50Ms, c.P99Ms, c.MeanMs, c.MaxMs, c.BurstP50Ms, c.BurstP99Ms, c.PerSecond)
	}
	w.Flush()
	if len(r.Ratios) > 0 {
		fmt.Println()
		w = tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(w, "vs reflink\tconcurrency\tp50 ×\tp99 ×\t")
		for _, x := range r.Ratios {
			fmt.Fprintf(w, "%s\t%d\t%.0f\t%.0f\t\n", x.Method, x.Concurrency, x.P50, x.P99)
		}
		w.Flush()
	}
	if ic := r.ImageCache; ic != nil {
		fmt.Printf("\nimage cache on %s (%s in %d entries):\n", ic.Tree, human(ic.TreeBytes), ic.Entries)
		fmt.Printf("  content key walk: first run %.1f ms; median %.1f ms of %d warm runs (%.2f µs/entry)\n", ic.KeyFirstMs, ic.KeyMedianMs, ic.KeyRuns, ic.KeyPerEntryUs)
		fmt.Printf("  miss (key + mkfs.erofs + fsync + rename): %.0f ms, image %s\n", ic.MissMs, human(ic.ImageBytes))
		fmt.Printf("  hit (key + open + flock): %.1f ms\n", ic.HitMs)
	}
}

func parseSize(s string) (int64, error) {
	mult := int64(1)
	switch {
	case strings.HasSuffix(s, "K"):
		mult = 1 << 10
	case strings.HasSuffix(s, "M"):
		mult = 1 << 20
	case strings.HasSuffix(s, "G"):
		mult = 1 << 30
	}
	n, err := strconv.ParseInt(strings.TrimRight(s, "KMG"), 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("bad size %q", s)
	}
	return n * mult, nil
}

func human(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	default:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
}

func freeBytes(dir string) int64 {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0
	}
	return int64(st.Bavail) * st.Bsize
}

func fsName(dir string) string {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return "unknown"
	}
	switch st.Type {
	case unix.XFS_SUPER_MAGIC:
		return "xfs"
	case unix.BTRFS_SUPER_MAGIC:
		return "btrfs"
	case unix.EXT4_SUPER_MAGIC:
		return "ext4"
	case unix.TMPFS_MAGIC:
		return "tmpfs"
	}
	return fmt.Sprintf("0x%x", st.Type)
}

// loadavg returns the 1, 5 and 15 minute load averages: figures taken on a
// busy machine include waits for a CPU.
func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	return strings.Join(f[:min(3, len(f))], " ")
}

func kernel() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}

// imageCacheCost is what the image cache costs on one tree.
type imageCacheCost struct {
	Tree          string  `json:"tree"`
	TreeBytes     int64   `json:"tree_bytes"`
	Entries       int     `json:"entries"`
	KeyRuns       int     `json:"key_runs"`
	KeyFirstMs    float64 `json:"key_first_ms"` // cold if the tree's inodes were not cached
	KeyMedianMs   float64 `json:"key_median_ms"`
	KeyPerEntryUs float64 `json:"key_per_entry_us"`
	MissMs        float64 `json:"miss_ms"`
	HitMs         float64 `json:"hit_ms"`
	ImageBytes    int64   `json:"image_bytes"`
}

func measureImageCache(ctx context.Context, work, tree string) (*imageCacheCost, error) {
	ic := &imageCacheCost{Tree: tree, KeyRuns: 7}
	t0 := time.Now()
	if _, err := rootfs.ContentKey(tree); err != nil {
		return nil, err
	}
	ic.KeyFirstMs = ms(time.Since(t0))
	err := filepath.WalkDir(tree, func(_ string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		ic.Entries++
		if d.Type().IsRegular() {
			fi, err := d.Info()
			if err != nil {
				return err
			}
			ic.TreeBytes += fi.Size()
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	var runs []time.Duration
	for range ic.KeyRuns {
		t0 := time.Now()
		if _, err := rootfs.ContentKey(tree); err != nil {
			return nil, err
		}
		runs = append(runs, time.Since(t0))
	}
	slices.Sort(runs)
	ic.KeyMedianMs = ms(runs[len(runs)/2])
	ic.KeyPerEntryUs = float64(runs[len(runs)/2].Nanoseconds()) / 1000 / float64(ic.Entries)

	cache, err := rootfs.OpenImageCache(filepath.Join(work, "images"), 0)
	if err != nil {
		return nil, err
	}
	t0 = time.Now()
	im, err := cache.Get(ctx, tree)
	if err != nil {
		return nil, err
	}
	ic.MissMs = ms(time.Since(t0))
	ic.ImageBytes = im.Size
	im.Release()
	t0 = time.Now()
	im, err = cache.Get(ctx, tree)
	if err != nil {
		return nil, err
	}
	ic.HitMs = ms(time.Since(t0))
	im.Release()
	return ic, nil
}
