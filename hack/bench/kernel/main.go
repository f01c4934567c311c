// Command kernel compares rund's guest kernel flavours in one run: Debian's
// cloud kernel and rund's streamlined kernel. For each it measures the cold
// boot of `rund run /bin/true` (templates off), the template build, the
// guest's MemTotal and MemAvailable, and then with N idle sandboxes cloned
// from the template (N = 20, 50): the PSS of each sandbox's processes (VMM
// and shim) and the pages each VMM holds as private copies of the template,
// by guest region (`rund kernelpatch report`).
//
//	go run ./hack/bench/kernel -rund bin/rund -out bin/bench-kernel.json
//
// Each flavour gets a private config (data_dir, mem_dir, root, cgroup
// parent under a temp dir); everything is deleted at the end.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rund-dev/rund/hack/bench/benchutil"
)

type options struct {
	rund, busybox, out string
	kernels            []string
	idle               []int
	cold               int
}

// region is one row of `rund kernelpatch report --format json`.
type region struct {
	Region      string `json:"region"`
	Pages       int    `json:"pages"`
	DirtyPages  int    `json:"dirty_pages"`
	SharedPages int    `json:"shared_pages"`
}

type idleResult struct {
	Sandboxes  int                `json:"sandboxes"`
	AvgPssMiB  float64            `json:"avg_pss_mib"` // VMM + shim, per sandbox
	AvgVMMPss  float64            `json:"avg_vmm_pss_mib"`
	MinPssMiB  float64            `json:"min_pss_mib"`
	MaxPssMiB  float64            `json:"max_pss_mib"`
	IdleAfterS float64            `json:"settled_after_s"`
	AvgDirty   map[string]float64 `json:"avg_dirty_pages_by_region"`
	MaxDirty   map[string]int     `json:"max_dirty_pages_by_region"`
	StartP50Ms float64            `json:"start_p50_ms"`
}

type flavourResult struct {
	Kernel           string       `json:"guest_kernel"`
	KernelFile       string       `json:"kernel_file"`
	KernelBytes      int64        `json:"kernel_bytes"`
	InitrdBytes      int64        `json:"initrd_bytes"`
	ColdBootMs       []float64    `json:"cold_boot_ms"`
	ColdBootMedianMs float64      `json:"cold_boot_median_ms"`
	TemplateBuildS   float64      `json:"template_build_s"`
	GuestMemTotalMiB float64      `json:"guest_memtotal_mib"`
	GuestMemAvailMiB float64      `json:"guest_memavailable_mib"`
	AfterExec        []region     `json:"dirty_after_exec"`
	Idle             []idleResult `json:"idle"`
}

type report struct {
	Date    string          `json:"date"`
	Host    string          `json:"host"`
	Load    string          `json:"load_before"`
	Command string          `json:"command"`
	Results []flavourResult `json:"results"`
	// PssReductionPercent compares the streamlined kernel's average PSS
	// per idle sandbox with the cloud kernel's, at each N.
	PssReductionPercent map[string]float64 `json:"pss_reduction_percent,omitempty"`
}

func main() {
	var o options
	var kernels, idle string
	flag.StringVar(&o.rund, "rund", "bin/rund", "rund binary")
	flag.StringVar(&o.busybox, "busybox", "/bin/busybox", "static busybox for the test rootfs")
	flag.StringVar(&o.out, "out", "bin/bench-kernel.json", "JSON result file")
	flag.StringVar(&kernels, "kernels", "cloud,rund", "guest kernel flavours to compare")
	flag.StringVar(&idle, "idle", "20,50", "idle sandbox counts")
	flag.IntVar(&o.cold, "cold", 5, "cold boots per flavour")
	flag.Parse()
	o.kernels = strings.Split(kernels, ",")
	for _, s := range strings.Split(idle, ",") {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			fmt.Fprintf(os.Stderr, "bench-kernel: -idle %q: want counts\n", idle)
			os.Exit(2)
		}
		o.idle = append(o.idle, n)
	}
	var err error
	if o.rund, err = filepath.Abs(o.rund); err != nil {
		fmt.Fprintln(os.Stderr, "bench-kernel:", err)
		os.Exit(2)
	}
	// Interrupted, it still deletes what it started.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "bench-kernel:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, o options) error {
	host, _ := os.Hostname()
	rep := report{Date: time.Now().UTC().Format(time.RFC3339), Host: host, Load: benchutil.LoadAvg(),
		Command: strings.Join(os.Args, " ")}
	top, err := os.MkdirTemp("/var/tmp", "rund-bench-kernel.")
	if err != nil {
		return err
	}
	defer os.RemoveAll(top)
	rootfs := filepath.Join(top, "rootfs")
	if err := benchutil.BusyboxRootfs(rootfs, o.busybox); err != nil {
		return err
	}
	bundles := map[string]string{"true": filepath.Join(top, "b-true"), "sleep": filepath.Join(top, "b-sleep")}
	if err := benchutil.Bundle(o.rund, bundles["true"], rootfs, nil, "/bin/true"); err != nil {
		return err
	}
	if err := benchutil.Bundle(o.rund, bundles["sleep"], rootfs, nil, "/bin/sleep", "1000000"); err != nil {
		return err
	}
	var errs []error
	for _, k := range o.kernels {
		f := &flavour{o: o, kernel: k, dir: filepath.Join(top, k), bundles: bundles}
		res, err := f.measure(ctx)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", k, err))
		}
		rep.Results = append(rep.Results, res)
	}
	rep.PssReductionPercent = reduction(rep.Results)
	printReport(rep)
	if err := benchutil.WriteJSON(o.out, rep); err != nil {
		errs = append(errs, err)
	} else {
		fmt.Println("wrote", o.out)
	}
	return errors.Join(errs...)
}

// flavour runs one kernel flavour's measurements.
type flavour struct {
	o       options
	kernel  string
	dir     string
	bundles map[string]string
	seq     int
}

func (f *flavour) config(templates string) string {
	p := filepath.Join(f.dir, "config-"+templates+".toml")
	cfg := fmt.Sprintf("guest_kernel = %q\ndata_dir = %q\nmem_dir = %q\ncgroup_parent = %q\ntemplates = %q\n",
		f.kernel, filepath.Join(f.dir, "data"), "/dev/shm/rund-bench-kernel-"+f.kernel, "/rund-bench-kernel", templates)
	_ = os.WriteFile(p, []byte(cfg), 0o644)
	return p
}

// rund runs rund with the flavour's config (templates on or off).
func (f *flavour) rund(ctx context.Context, templates string, args ...string) ([]byte, time.Duration, error) {
	all := append([]string{"--root", filepath.Join(f.dir, "state"), "--config", f.config(templates)}, args...)
	cmd := exec.CommandContext(ctx, f.o.rund, all...)
	// A file, not a pipe: a detached sandbox's shim keeps its stdio open,
	// and Run would wait for a pipe's EOF.
	var files [2]*os.File
	for i := range files {
		of, err := os.CreateTemp(f.dir, "out.")
		if err != nil {
			return nil, 0, err
		}
		defer os.Remove(of.Name())
		defer of.Close()
		files[i] = of
	}
	cmd.Stdout, cmd.Stderr = files[0], files[1]
	t := time.Now()
	err := cmd.Run()
	d := time.Since(t)
	out, _ := os.ReadFile(files[0].Name())
	if err != nil {
		stderr, _ := os.ReadFile(files[1].Name())
		return out, d, fmt.Errorf("rund %s: %w: %s%s", strings.Join(args, " "), err, out, stderr)
	}
	return out, d, nil
}

func (f *flavour) id() string {
	f.seq++
	return fmt.Sprintf("bk-%s-%d", f.kernel, f.seq)
}

func (f *flavour) measure(ctx context.Context) (res flavourResult, err error) {
	res.Kernel = f.kernel
	if err := os.MkdirAll(f.dir, 0o755); err != nil {
		return res, err
	}
	defer f.cleanup()
	out, _, err := f.rund(ctx, "on", "check")
	if err != nil {
		return res, err
	}
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, "guest kernel") && !strings.Contains(l, "flavour") {
			if i := strings.Index(l, "/"); i >= 0 {
				res.KernelFile = strings.Fields(l[i:])[0]
			}
		}
	}
	if st, err := os.Stat(res.KernelFile); err == nil {
		res.KernelBytes = st.Size()
		if st, err := os.Stat(filepath.Join(filepath.Dir(res.KernelFile), "initrd.img")); err == nil {
			res.InitrdBytes = st.Size()
		}
	}
	if !strings.Contains(string(out), "guest flavour") || res.KernelFile == "" || !strings.Contains(res.KernelFile, "/"+f.kernel+"/") {
		return res, fmt.Errorf("the %s guest is not built (rund check:\n%s)", f.kernel, out)
	}

	fmt.Printf("%s: %d cold boots\n", f.kernel, f.o.cold)
	for i := 0; i < f.o.cold; i++ {
		_, d, err := f.rund(ctx, "off", "run", "-b", f.bundles["true"], f.id())
		if err != nil {
			return res, err
		}
		res.ColdBootMs = append(res.ColdBootMs, ms(d))
	}
	res.ColdBootMedianMs = median(res.ColdBootMs)

	_, d, err := f.rund(ctx, "on", "template", "build")
	if err != nil {
		return res, err
	}
	res.TemplateBuildS = d.Seconds()

	// One sandbox: the guest's memory as it sees it, and its private
	// copies after it ran a second process.
	id := f.id()
	if _, _, err := f.rund(ctx, "on", "run", "-d", "-b", f.bundles["sleep"], id); err != nil {
		return res, err
	}
	mi, _, err := f.rund(ctx, "on", "exec", id, "cat", "/proc/meminfo")
	if err != nil {
		return res, err
	}
	guest := benchutil.ParseMeminfo(string(mi))
	res.GuestMemTotalMiB, res.GuestMemAvailMiB = guest["MemTotal"], guest["MemAvailable"]
	if res.AfterExec, err = f.kernelpatch(ctx, id); err != nil {
		return res, err
	}
	if _, _, err := f.rund(ctx, "on", "delete", "--force", id); err != nil {
		return res, err
	}

	for _, n := range f.o.idle {
		r, err := f.idle(ctx, n)
		res.Idle = append(res.Idle, r)
		if err != nil {
			return res, err
		}
	}
	return res, nil
}

func (f *flavour) kernelpatch(ctx context.Context, id string) ([]region, error) {
	out, _, err := f.rund(ctx, "on", "kernelpatch", "report", "--format", "json", id)
	if err != nil {
		return nil, err
	}
	var rows []region
	if err := json.Unmarshal(out, &rows); err != nil {
		return nil, fmt.Errorf("kernelpatch report of %s: %w: %s", id, err, out)
	}
	return rows, nil
}

// idle starts n sandboxes, waits until their PSS settles, measures, and
// deletes them.
func (f *flavour) idle(ctx context.Context, n int) (idleResult, error) {
	r := idleResult{Sandboxes: n, AvgDirty: map[string]float64{}, MaxDirty: map[string]int{}}
	var ids []string
	defer func() {
		for _, id := range ids {
			f.rund(context.Background(), "on", "delete", "--force", id)
		}
	}()
	var starts []float64
	for i := 0; i < n; i++ {
		id := f.id()
		ids = append(ids, id)
		if _, d, err := f.rund(ctx, "on", "run", "-d", "-b", f.bundles["sleep"], id); err != nil {
			return r, err
		} else {
			starts = append(starts, ms(d))
		}
	}
	r.StartP50Ms = median(starts)
	fmt.Printf("%s: %d idle sandboxes started\n", f.kernel, n)
	pids := map[string][2]int{}
	for _, id := range ids {
		shim, vmm, err := f.pids(id)
		if err != nil {
			return r, err
		}
		pids[id] = [2]int{shim, vmm}
	}
	// Settled: total PSS changes less than 0.5% over 3 s, twice running.
	total := func() float64 {
		var s float64
		for _, p := range pids {
			s += pss(p[0]) + pss(p[1])
		}
		return s
	}
	t0 := time.Now()
	last, calm := total(), 0
	for calm < 2 && time.Since(t0) < 90*time.Second {
		time.Sleep(3 * time.Second)
		now := total()
		if last > 0 && (now-last)/last < 0.005 && (last-now)/last < 0.005 {
			calm++
		} else {
			calm = 0
		}
		last = now
	}
	r.IdleAfterS = time.Since(t0).Seconds()
	var per []float64
	for _, id := range ids {
		p := pids[id]
		vmm := pss(p[1])
		per = append(per, pss(p[0])+vmm)
		r.AvgVMMPss += vmm / float64(n)
		rows, err := f.kernelpatch(ctx, id)
		if err != nil {
			return r, err
		}
		for _, row := range rows {
			r.AvgDirty[row.Region] += float64(row.DirtyPages) / float64(n)
			r.MaxDirty[row.Region] = max(r.MaxDirty[row.Region], row.DirtyPages)
		}
	}
	for _, v := range per {
		r.AvgPssMiB += v / float64(n)
	}
	r.MinPssMiB, r.MaxPssMiB = slices.Min(per), slices.Max(per)
	return r, nil
}

// pids reads the shim's and the VMM's pids from the container's state.
func (f *flavour) pids(id string) (shim, vmm int, err error) {
	return benchutil.SandboxPids(filepath.Join(f.dir, "state"), id)
}

// cleanup deletes whatever is left and checks that nothing is.
func (f *flavour) cleanup() {
	ctx := context.Background()
	out, _, _ := f.rund(ctx, "on", "list", "-q")
	for _, id := range strings.Fields(string(out)) {
		f.rund(ctx, "on", "delete", "--force", id)
	}
	if out, _, _ := f.rund(ctx, "on", "list", "-q"); strings.TrimSpace(string(out)) != "" {
		fmt.Fprintf(os.Stderr, "bench-kernel: %s: left behind: %s\n", f.kernel, out)
	}
	f.rund(ctx, "on", "template", "rm", "--all")
	os.RemoveAll("/dev/shm/rund-bench-kernel-" + f.kernel)
	benchutil.RemoveCgroupParent("/rund-bench-kernel")
}

// pss is a process's proportional set size in MiB (0 if it is gone).
func pss(pid int) float64 {
	v, _ := benchutil.PssMiB(pid)
	return v
}

func reduction(rs []flavourResult) map[string]float64 {
	var cloud, rund *flavourResult
	for i := range rs {
		switch rs[i].Kernel {
		case "cloud":
			cloud = &rs[i]
		case "rund":
			rund = &rs[i]
		}
	}
	if cloud == nil || rund == nil {
		return nil
	}
	out := map[string]float64{}
	for _, c := range cloud.Idle {
		for _, r := range rund.Idle {
			if c.Sandboxes == r.Sandboxes && c.AvgPssMiB > 0 && r.AvgPssMiB > 0 {
				out[strconv.Itoa(c.Sandboxes)] = 100 * (1 - r.AvgPssMiB/c.AvgPssMiB)
			}
		}
	}
	return out
}

func printReport(rep report) {
	fmt.Printf("\n%-7s %10s %9s %9s %10s %10s\n", "kernel", "cold boot", "template", "kernel", "MemTotal", "MemAvail")
	for _, r := range rep.Results {
		fmt.Printf("%-7s %8.0fms %8.1fs %8.1fM %9.1fM %9.1fM\n", r.Kernel, r.ColdBootMedianMs, r.TemplateBuildS,
			float64(r.KernelBytes)/(1<<20), r.GuestMemTotalMiB, r.GuestMemAvailMiB)
	}
	fmt.Printf("\n%-7s %5s %10s %10s %10s   %s\n", "kernel", "idle", "PSS avg", "VMM avg", "start p50", "avg dirty pages: text rodata data other")
	for _, r := range rep.Results {
		for _, i := range r.Idle {
			fmt.Printf("%-7s %5d %9.1fM %9.1fM %8.0fms   %.1f %.1f %.1f %.1f\n", r.Kernel, i.Sandboxes, i.AvgPssMiB, i.AvgVMMPss, i.StartP50Ms,
				i.AvgDirty["kernel-text"], i.AvgDirty["kernel-rodata"], i.AvgDirty["kernel-data"], i.AvgDirty["other"])
		}
	}
	for n, p := range rep.PssReductionPercent {
		fmt.Printf("streamlined vs cloud at %s idle: PSS per sandbox %.1f%% lower\n", n, p)
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}
