// Command dax measures the memory half of rund's rootfs design: what one
// read-only EROFS image costs in host and guest memory when N sandboxes read
// it, with the image on virtio-pmem mounted with DAX (pmem_mib = 512) and as
// a plain virtio-blk disk (pmem_mib = 0).
//
// It drives the rund binary the way a user would and imports no rund
// package (only the benchmarks' shared helpers). For each of the two configurations, with a private --root,
// data_dir, mem_dir and cgroup_parent (and a config.toml it writes), on one
// busybox bundle whose rootfs also holds a file of random bytes (/data/blob,
// 32 MiB by default):
//
//  1. it starts one baseline sandbox that reads nothing (this builds the
//     template and the image), evicts the image file from the host page
//     cache (fdatasync + POSIX_FADV_DONTNEED; pages mapped by the baseline's
//     VMM stay), then starts N sandboxes (`rund run -d`) whose process reads
//     /data/blob once, saving the guest's /proc/meminfo before and after the
//     read, and waits until each has written /tmp/done (polled with
//     `rund exec ID cat /tmp/done`);
//  2. it measures the host page cache pages of the image file (mincore over
//     a shared mapping of data_dir/images/*.erofs), the guest's Cached and
//     Buffers of every sandbox (`rund exec ID cat /proc/meminfo`) against the
//     baseline and against the sandbox's own figures before its read, the
//     PSS of every sandbox's VMM (/proc/PID/smaps_rollup, the pid from
//     <root>/<id>/state.json field vmm.pid), and the host's MemAvailable
//     before the N sandboxes started and once they had all read;
//  3. it deletes every sandbox (`rund delete -f`), checks that no process of
//     its own (a VMM or shim naming its root or mem_dir) is left, removes its
//     templates, cgroup pool and temp dirs.
//
// It prints a table and writes every figure as JSON. It needs root, KVM or
// TCG, QEMU, erofs-utils and a static busybox.
//
//	go run ./hack/bench/dax -rund bin/rund -n 20 -out bin/bench-dax.json
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	"github.com/rund-dev/rund/hack/bench/benchutil"
)

type options struct {
	rund       string
	n          int
	out        string
	blobMiB    int
	busybox    string
	tmpDir     string
	cmdTimeout time.Duration
	readWait   time.Duration
	keepTemp   bool
}

func parseFlags() (options, error) {
	var o options
	flag.StringVar(&o.rund, "rund", "bin/rund", "rund binary (the guest kernel and initramfs are found next to it)")
	flag.IntVar(&o.n, "n", 20, "reading sandboxes per configuration")
	flag.StringVar(&o.out, "out", "bin/bench-dax.json", "write the figures as JSON to this file")
	flag.IntVar(&o.blobMiB, "blob-mib", 32, "size of the random data file in the rootfs, MiB")
	flag.StringVar(&o.busybox, "busybox", "/bin/busybox", "static busybox binary for the rootfs")
	flag.StringVar(&o.tmpDir, "tmp", "", "parent of the temp dirs (default $TMPDIR or /tmp; must not be tmpfs, or the host page cache figure means nothing)")
	flag.DurationVar(&o.cmdTimeout, "timeout", 3*time.Minute, "timeout of one rund command")
	flag.DurationVar(&o.readWait, "read-timeout", 5*time.Minute, "how long to wait for the sandboxes to finish reading")
	flag.BoolVar(&o.keepTemp, "keep-temp", false, "keep the temp dirs (bundle, logs) for inspection")
	flag.Parse()
	if flag.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", flag.Args())
	}
	if o.n < 1 || o.blobMiB < 1 {
		return o, errors.New("-n and -blob-mib must be >= 1")
	}
	return o, nil
}

func main() {
	o, err := parseFlags()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench-dax:", err)
		os.Exit(2)
	}
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "bench-dax:", err)
		os.Exit(1)
	}
}

// report is everything the benchmark writes as JSON.
type report struct {
	Started  time.Time     `json:"started"`
	Finished time.Time     `json:"finished"`
	Rund     string        `json:"rund"`
	Version  string        `json:"rund_version"`
	CPUs     int           `json:"cpus"`
	N        int           `json:"n"`
	BlobMiB  int           `json:"blob_mib"`
	LoadAvg  [2]string     `json:"loadavg_start_end"`
	Modes    []*modeResult `json:"modes"`
	Errors   []string      `json:"errors,omitempty"`
}

func run(o options) error {
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()

	rund, err := filepath.Abs(o.rund)
	if err != nil {
		return err
	}
	if _, err := os.Stat(rund); err != nil {
		return fmt.Errorf("-rund: %w", err)
	}
	if os.Geteuid() != 0 {
		return errors.New("needs root")
	}
	top, err := os.MkdirTemp(o.tmpDir, "rund-bench-dax-")
	if err != nil {
		return err
	}
	defer func() {
		if o.keepTemp {
			fmt.Fprintln(os.Stderr, "bench-dax: kept", top)
		} else {
			os.RemoveAll(top)
		}
	}()
	if onTmpfs(top) {
		fmt.Fprintln(os.Stderr, "bench-dax: warning: the temp dir is on tmpfs; the image's host page cache figure will read 100% (use -tmp)")
	}
	b, err := makeBundles(top, rund, o.busybox, o.blobMiB)
	if err != nil {
		return fmt.Errorf("making the bundle: %w", err)
	}

	rep := &report{
		Started: time.Now().UTC(), Rund: rund, Version: rundVersion(rund),
		CPUs: runtime.NumCPU(), N: o.n, BlobMiB: o.blobMiB,
	}
	rep.LoadAvg[0] = benchutil.LoadAvg()
	fmt.Printf("bench-dax: %s, %d CPUs, load %s, N=%d, blob %d MiB\n", rep.Version, rep.CPUs, rep.LoadAvg[0], o.n, o.blobMiB)

	var errs []error
	for _, m := range []struct {
		name string
		pmem int
	}{{"dax", 512}, {"virtio-blk", 0}} {
		if ctx.Err() != nil {
			break
		}
		r, err := runMode(ctx, o, rund, top, b, m.name, m.pmem)
		rep.Modes = append(rep.Modes, r)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", m.name, err))
		}
	}
	if ctx.Err() != nil {
		errs = append(errs, fmt.Errorf("interrupted: %w", ctx.Err()))
	}
	rep.LoadAvg[1] = benchutil.LoadAvg()
	rep.Finished = time.Now().UTC()
	for _, e := range errs {
		rep.Errors = append(rep.Errors, e.Error())
	}
	printReport(os.Stdout, rep)
	if o.out != "" {
		if err := benchutil.WriteJSON(o.out, rep); err != nil {
			errs = append(errs, err)
		} else {
			fmt.Printf("\nwrote %s\n", o.out)
		}
	}
	return errors.Join(errs...)
}
