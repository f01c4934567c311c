package main

import (
	"fmt"
	"io"
	"text/tabwriter"
)

func printReport(w io.Writer, rep *report) {
	fmt.Fprintf(w, "\nrootfs memory: %d sandboxes each reading a %d MiB random file once from the read-only image\n", rep.N, rep.BlobMiB)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "mode\tpmem_mib\treaders\timage MiB (allocated)\thost cache of image MiB (before→after)\tguest cache +MiB/sandbox vs baseline\tguest cache +MiB during read\tVMM PSS MiB/sandbox (baseline)\tMemAvailable drop MiB/sandbox\t")
	for _, m := range rep.Modes {
		fmt.Fprintf(tw, "%s\t%d\t%d/%d\t%.0f (%.1f)\t%.1f → %.1f\t%.1f\t%.1f\t%.1f (%.1f)\t%.1f\t\n",
			m.Mode, m.PmemMiB, m.Read, m.Started, m.ImageMiB, m.ImageAllocMiB,
			m.HostCacheBeforeMiB, m.HostCacheAfterMiB,
			m.GuestIncVsBaseline.Avg, m.GuestIncSelf.Avg,
			m.PSS.Avg, m.BaselinePSS, m.MemAvailDropPerSandbox)
	}
	tw.Flush()
	fmt.Fprintln(w, "\nhost cache of image: resident pages of data_dir/images/*.erofs (mincore), after evicting it once the baseline sandbox ran, and once all readers read")
	fmt.Fprintln(w, "guest cache: Cached+Buffers of the guest's /proc/meminfo, against an idle baseline sandbox and against the sandbox's own figure just before its read")
	for _, m := range rep.Modes {
		fmt.Fprintf(w, "%s: guest +MiB vs baseline min %.1f max %.1f; VMM PSS min %.1f max %.1f; MemAvailable %.0f → %.0f MiB\n",
			m.Mode, m.GuestIncVsBaseline.Min, m.GuestIncVsBaseline.Max, m.PSS.Min, m.PSS.Max, m.MemAvailBeforeMiB, m.MemAvailAfterMiB)
		if m.ExecRetries > 0 {
			fmt.Fprintf(w, "%s: %d transient rund exec failures retried while measuring (see exec_errors in the JSON)\n", m.Mode, m.ExecRetries)
		}
		if len(m.Leftovers) > 0 {
			fmt.Fprintf(w, "%s: LEFTOVER PROCESSES: %v\n", m.Mode, m.Leftovers)
		}
		for _, e := range m.Errors {
			fmt.Fprintf(w, "%s: error: %s\n", m.Mode, e)
		}
	}
	fmt.Fprintf(w, "load %s → %s\n", rep.LoadAvg[0], rep.LoadAvg[1])
}
