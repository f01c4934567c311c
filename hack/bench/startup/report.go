package main

import (
	"fmt"
	"io"
	"math"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
)

type report struct {
	Started    time.Time     `json:"started"`
	Finished   time.Time     `json:"finished"`
	Host       hostDesc      `json:"host"`
	LoadStart  string        `json:"loadavg_start"`
	LoadEnd    string        `json:"loadavg_end"`
	Rund       string        `json:"rund"`
	Runc       string        `json:"runc"`
	Config     configInfo    `json:"config"`
	Bundle     string        `json:"rootfs"`
	Sequential *seqReport    `json:"sequential,omitempty"`
	Concurrent []*concReport `json:"concurrent,omitempty"`
	Memory     *memReport    `json:"memory,omitempty"`
	Errors     []string      `json:"errors,omitempty"`
	Notes      []string      `json:"notes"`
}

type warmup struct {
	Mode       string  `json:"mode"`
	Ms         float64 `json:"ms"`
	Error      string  `json:"error,omitempty"`
	RetryMs    float64 `json:"retry_ms,omitempty"`
	RetryError string  `json:"retry_error,omitempty"`
}

type seqReport struct {
	N                      int                    `json:"n"`
	Warmup                 []warmup               `json:"warmup"`
	Modes                  map[string]*modeReport `json:"modes"`
	ColdOverTemplateMedian float64                `json:"cold_over_template_median"`
	TemplateOverRuncMedian float64                `json:"template_over_runc_median"`
	ColdOverTemplateP99    float64                `json:"cold_over_template_p99"`
	TemplateOverRuncP99    float64                `json:"template_over_runc_p99"`
}

type modeReport struct {
	OK         int       `json:"ok"`
	MedianMs   float64   `json:"median_ms"`
	P99Ms      float64   `json:"p99_ms"`
	MinMs      float64   `json:"min_ms"`
	MaxMs      float64   `json:"max_ms"`
	CPUMedianS float64   `json:"cpu_seconds_median"` // user+sys of the command's process tree
	SamplesMs  []float64 `json:"samples_ms"`
	CPUSeconds []float64 `json:"cpu_seconds"`
	Errors     []string  `json:"errors,omitempty"`
}

func (m *modeReport) finish() {
	m.OK = len(m.SamplesMs)
	m.MedianMs, m.P99Ms = percentile(m.SamplesMs, 50), percentile(m.SamplesMs, 99)
	m.MinMs, m.MaxMs = percentile(m.SamplesMs, 0), percentile(m.SamplesMs, 100)
	m.CPUMedianS = percentile(m.CPUSeconds, 50)
}

type concReport struct {
	Concurrency        int       `json:"concurrency"`
	OK                 int       `json:"ok"`
	P50Ms              float64   `json:"p50_ms"`
	P99Ms              float64   `json:"p99_ms"`
	MinMs              float64   `json:"min_ms"`
	MaxMs              float64   `json:"max_ms"`
	WallMs             float64   `json:"wall_ms"`
	StartsPerSecond    float64   `json:"starts_per_second"`
	ChildrenCPUSeconds float64   `json:"children_cpu_seconds"` // getrusage(RUSAGE_CHILDREN) delta: ours only
	HostCPU            hostCPU   `json:"host_cpu"`             // /proc/stat delta: everyone's
	DeleteWallMs       float64   `json:"delete_wall_ms"`
	LoadBefore         string    `json:"loadavg_before"`
	LoadAfter          string    `json:"loadavg_after"`
	SamplesMs          []float64 `json:"samples_ms"`
	Errors             []string  `json:"errors,omitempty"`
}

type memReport struct {
	Requested                int        `json:"requested"`
	Started                  int        `json:"started"`
	Measured                 int        `json:"measured"`
	StoppedBecause           string     `json:"stopped_because,omitempty"`
	StartP50Ms               float64    `json:"start_p50_ms"`
	StartP99Ms               float64    `json:"start_p99_ms"`
	Idle                     idleInfo   `json:"idle"`
	AvgPssMiB                float64    `json:"avg_pss_mib"`
	MinPssMiB                float64    `json:"min_pss_mib"`
	MaxPssMiB                float64    `json:"max_pss_mib"`
	Avg                      breakdown  `json:"avg_per_sandbox"`
	AvgQEMU                  breakdown  `json:"avg_qemu"`
	AvgShim                  breakdown  `json:"avg_shim"`
	AvgOther                 *breakdown `json:"avg_other,omitempty"`
	UnclassifiedKiB          float64    `json:"unclassified_kib"` // rollup Pss minus the parts (rounding, races)
	PerSandboxPssMiB         []float64  `json:"per_sandbox_pss_mib"`
	GuestRAMFile             string     `json:"guest_ram_file,omitempty"`
	TemplateMemFileMiB       float64    `json:"template_mem_file_mib"`
	QEMUCmdline              string     `json:"qemu_cmdline,omitempty"`
	MemAvailableBeforeMiB    float64    `json:"mem_available_before_mib"`
	MemAvailableIdleMiB      float64    `json:"mem_available_idle_mib"`
	HostMemDropPerSandboxMiB float64    `json:"host_mem_available_drop_per_sandbox_mib"`
	LoadBefore               string     `json:"loadavg_before"`
	LoadIdle                 string     `json:"loadavg_idle"`
	DeleteWallMs             float64    `json:"delete_wall_ms"`
	DeleteErrors             []string   `json:"delete_errors,omitempty"`
	Leftovers                []string   `json:"leftover_processes"`
	ContainersLeft           []string   `json:"containers_left"`
	TotalProcsBefore         procCount  `json:"host_procs_before"`
	TotalProcsAfter          procCount  `json:"host_procs_after"`
}

// percentile is the nearest-rank percentile of xs (p in 0..100; 0 is the
// minimum). With 20 samples p99 is the maximum.
func percentile(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if p <= 0 {
		return s[0]
	}
	k := int(math.Ceil(p / 100 * float64(len(s))))
	return s[min(max(k, 1), len(s))-1]
}

func mib(kib float64) string { return fmt.Sprintf("%.1f", kib/1024) }

func printReport(w io.Writer, r *report) {
	r.Notes = []string{
		"percentiles are nearest-rank: with 20 samples p99 is the maximum",
		"sequential times are `run` wall times (create, start, wait, delete) of /bin/true; modes interleaved run by run",
		"concurrent times are `rund run --keep` (create to process exit); deletes are timed separately",
		"guest RAM dirty = the Anonymous (copied-on-write) pages of the guest RAM mapping; shared = its Pss minus those: tmpfs pages count as Private_Dirty when one process maps them, so Private_Dirty is not used for the split",
		"host CPU and MemAvailable figures include other users of the machine",
	}
	fmt.Fprintf(w, "\nrund startup and memory benchmark (%s; %d CPUs; load %s -> %s)\n",
		r.Host.RundVersion, r.Host.CPUs, r.LoadStart, r.LoadEnd)
	if s := r.Sequential; s != nil {
		fmt.Fprintf(w, "\nSequential, /bin/true, %d runs per mode (interleaved, after one warm-up each)\n", s.N)
		tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "mode\tok\tmedian ms\tp99 ms\tmin ms\tmax ms\tCPU s/run\t")
		for _, m := range []string{modeTemplate, modeCold, modeRunc} {
			mr := s.Modes[m]
			fmt.Fprintf(tw, "%s\t%d\t%.1f\t%.1f\t%.1f\t%.1f\t%.3f\t\n", m, mr.OK, mr.MedianMs, mr.P99Ms, mr.MinMs, mr.MaxMs, mr.CPUMedianS)
		}
		tw.Flush()
		fmt.Fprintf(w, "cold/template: %.2fx median, %.2fx p99;  template/runc: %.2fx median, %.2fx p99\n",
			s.ColdOverTemplateMedian, s.ColdOverTemplateP99, s.TemplateOverRuncMedian, s.TemplateOverRuncP99)
		for _, wu := range s.Warmup {
			fmt.Fprintf(w, "warm-up %s: %.0f ms", wu.Mode, wu.Ms)
			if wu.Error != "" {
				fmt.Fprintf(w, " FAILED (%s); retry %.0f ms %s", short(wu.Error), wu.RetryMs, short(wu.RetryError))
			}
			fmt.Fprintln(w)
		}
	}
	if len(r.Concurrent) > 0 {
		fmt.Fprintf(w, "\nConcurrent starts from the template (create -> process exit per sandbox)\n")
		tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "C\tok\tp50 ms\tp99 ms\twall ms\tstarts/s\tCPU s (ours)\thost busy s\tCPU s/sandbox\tdelete wall ms\tload after\t")
		for _, c := range r.Concurrent {
			per := 0.0
			if c.OK > 0 {
				per = c.ChildrenCPUSeconds / float64(c.OK)
			}
			fmt.Fprintf(tw, "%d\t%d\t%.0f\t%.0f\t%.0f\t%.2f\t%.1f\t%.1f\t%.2f\t%.0f\t%s\t\n", c.Concurrency, c.OK, c.P50Ms, c.P99Ms, c.WallMs,
				c.StartsPerSecond, c.ChildrenCPUSeconds, c.HostCPU.BusySeconds, per, c.DeleteWallMs, c.LoadAfter)
		}
		tw.Flush()
	}
	if m := r.Memory; m != nil {
		fmt.Fprintf(w, "\nMemory: %d of %d idle sandboxes started (start p50 %.0f ms, p99 %.0f ms), %d measured\n",
			m.Started, m.Requested, m.StartP50Ms, m.StartP99Ms, m.Measured)
		if m.StoppedBecause != "" {
			fmt.Fprintf(w, "  stopped: %s\n", m.StoppedBecause)
		}
		fmt.Fprintf(w, "  idle: reached=%v after %.0f s (CPU %.3f cores/sandbox, PSS change %+.2f%%)\n",
			m.Idle.Reached, m.Idle.WaitedS, m.Idle.CPUPerSandbox, m.Idle.PssChangePercent)
		if m.Measured > 0 {
			fmt.Fprintf(w, "  average PSS per sandbox: %.1f MiB (min %.1f, max %.1f)\n", m.AvgPssMiB, m.MinPssMiB, m.MaxPssMiB)
			tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', tabwriter.AlignRight)
			fmt.Fprintln(tw, "MiB per sandbox\tQEMU\tshim\ttotal\t")
			rows := []struct {
				name string
				f    func(breakdown) float64
			}{
				{"guest RAM dirtied since restore", func(b breakdown) float64 { return b.GuestRAMDirtyKiB }},
				{"guest RAM shared with template", func(b breakdown) float64 { return b.GuestRAMSharedKiB }},
				{"TCG translation cache", func(b breakdown) float64 { return b.TCGKiB }},
				{"heap / other anon", func(b breakdown) float64 { return b.AnonKiB }},
				{"file-backed (binaries)", func(b breakdown) float64 { return b.FileKiB }},
				{"total PSS (smaps_rollup)", func(b breakdown) float64 { return b.TotalKiB }},
			}
			for _, row := range rows {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t\n", row.name, mib(row.f(m.AvgQEMU)), mib(row.f(m.AvgShim)), mib(row.f(m.Avg)))
			}
			tw.Flush()
			fmt.Fprintf(w, "  guest RAM mapping per sandbox: RSS %s MiB, Private_Dirty %s MiB; template memory file %.1f MiB (once per host)\n",
				mib(m.Avg.GuestRAMRssKiB), mib(m.Avg.GuestRAMPrivateDirtyKiB), m.TemplateMemFileMiB)
			fmt.Fprintf(w, "  host MemAvailable drop per sandbox: %.1f MiB (%.0f -> %.0f MiB; includes page tables, page cache, other users)\n",
				m.HostMemDropPerSandboxMiB, m.MemAvailableBeforeMiB, m.MemAvailableIdleMiB)
		}
		fmt.Fprintf(w, "  teardown: delete of all took %.0f ms; %d delete errors; leftover processes: %d; containers left: %d\n",
			m.DeleteWallMs, len(m.DeleteErrors), len(m.Leftovers), len(m.ContainersLeft))
		fmt.Fprintf(w, "  host-wide qemu/rund-shim processes (everyone's): before %d/%d, after %d/%d\n",
			m.TotalProcsBefore.QEMU, m.TotalProcsBefore.Shim, m.TotalProcsAfter.QEMU, m.TotalProcsAfter.Shim)
	}
	if len(r.Errors) > 0 {
		fmt.Fprintf(w, "\nErrors:\n")
		for _, e := range r.Errors {
			fmt.Fprintf(w, "  %s\n", short(e))
		}
	}
}

func short(s string) string {
	s = strings.ReplaceAll(s, "\n", " ")
	if len(s) > 300 {
		return s[:300] + "..."
	}
	return s
}
