// Command startup measures how fast rund starts a sandbox and how much host
// memory an idle one costs, against runc, on one busybox bundle in one run.
//
// It execs the rund and runc binaries the way a user would and imports no
// rund package. Three phases, each optional:
//
//  1. sequential: N runs each of `rund run` of /bin/true from a snapshot
//     template, `rund run` with a cold boot (annotation rund.template=off)
//     and `runc run`, interleaved so that noise from other users of the host
//     falls on every mode alike, after one uncounted warm-up run of each
//     (which builds the template and the image cache);
//  2. concurrent: waves of C simultaneous `rund run --keep` from the template
//     (create → process exit per sandbox), with the wall time of the wave and
//     the host CPU it cost; the sandboxes are deleted after each wave;
//  3. memory: K idle sandboxes (`rund run -d` of `sleep 100000`); once they
//     are idle, the PSS of every host process rund runs for each (the shim
//     and its VMM), split into guest RAM dirtied since the restore, guest RAM
//     still shared with the template, the TCG translation cache, other
//     anonymous memory (heap) and file-backed mappings; then every sandbox is
//     deleted and the host is checked for leftover processes.
//
// By default it writes its own rund config.toml with a private data_dir,
// mem_dir and cgroup_parent, uses private --root directories for rund and
// runc, and removes all of it at the end, on error or on SIGINT/SIGTERM
// included. It prints a table and writes every figure (raw samples too) as
// JSON. It needs root, QEMU and runc.
//
//	go run ./hack/bench/startup -rund bin/rund -out bin/bench-startup.json
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rund-dev/rund/hack/bench/benchutil"
)

type options struct {
	rund, runc    string
	config        string
	out           string
	n             int
	levels        []int
	idle          int
	idleTimeout   time.Duration
	skipSeq       bool
	skipConc      bool
	skipMem       bool
	keepTemp      bool
	minAvailMiB   int
	cmdTimeout    time.Duration
	busybox       string
	deleteWorkers int
}

func parseFlags() (options, error) {
	var o options
	var levels string
	flag.StringVar(&o.rund, "rund", "bin/rund", "rund binary (the guest kernel and initramfs are found next to it)")
	flag.StringVar(&o.runc, "runc", "runc", "runc binary")
	flag.StringVar(&o.config, "config", "", "rund config.toml to use (default: a private one written under a temp dir)")
	flag.StringVar(&o.out, "out", "bin/bench-startup.json", "write the figures as JSON to this file")
	flag.IntVar(&o.n, "n", 20, "sequential runs per mode")
	flag.StringVar(&levels, "concurrency", "10,50", "comma-separated concurrent-start levels")
	flag.IntVar(&o.idle, "idle", 50, "idle sandboxes for the memory measurement")
	flag.DurationVar(&o.idleTimeout, "idle-timeout", 3*time.Minute, "how long to wait for the idle sandboxes to settle")
	flag.BoolVar(&o.skipSeq, "skip-sequential", false, "skip the sequential latency phase")
	flag.BoolVar(&o.skipConc, "skip-concurrent", false, "skip the concurrent start phase")
	flag.BoolVar(&o.skipMem, "skip-memory", false, "skip the idle memory phase")
	flag.BoolVar(&o.keepTemp, "keep-temp", false, "keep the temp dir (bundles, logs) for inspection")
	flag.IntVar(&o.minAvailMiB, "min-available-mib", 2048, "stop starting idle sandboxes when the host's MemAvailable falls below this")
	flag.DurationVar(&o.cmdTimeout, "timeout", 5*time.Minute, "timeout of one rund/runc command")
	flag.StringVar(&o.busybox, "busybox", "/bin/busybox", "static busybox binary for the rootfs")
	flag.IntVar(&o.deleteWorkers, "delete-workers", 4, "parallel deletes when tearing sandboxes down")
	flag.Parse()
	if flag.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", flag.Args())
	}
	for _, f := range strings.Split(levels, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		v, err := strconv.Atoi(f)
		if err != nil || v < 1 {
			return o, fmt.Errorf("-concurrency: bad level %q", f)
		}
		o.levels = append(o.levels, v)
	}
	if o.n < 1 || o.idle < 0 {
		return o, errors.New("-n must be >= 1 and -idle >= 0")
	}
	return o, nil
}

func main() {
	o, err := parseFlags()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench-startup:", err)
		os.Exit(2)
	}
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "bench-startup:", err)
		os.Exit(1)
	}
}

func run(o options) (retErr error) {
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()

	env, err := setup(o)
	if env != nil {
		// Tear down with a fresh context: ctx may be cancelled by a signal.
		defer func() {
			cctx, ccancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer ccancel()
			if cerr := env.cleanup(cctx); cerr != nil {
				fmt.Fprintln(os.Stderr, "bench-startup: cleanup:", cerr)
				if retErr == nil {
					retErr = cerr
				}
			}
		}()
	}
	if err != nil {
		return err
	}

	rep := &report{
		Started:   time.Now().UTC(),
		Host:      hostInfo(o),
		Config:    env.configDesc,
		Bundle:    env.rootfs,
		Rund:      env.rund,
		Runc:      env.runc,
		LoadStart: benchutil.LoadAvg(),
	}
	fmt.Printf("bench-startup: rund %s, runc %s, %d CPUs, load %s\n", rep.Host.RundVersion, rep.Host.RuncVersion, runtime.NumCPU(), rep.LoadStart)

	var errs []error
	if !o.skipSeq && ctx.Err() == nil {
		s, err := env.sequential(ctx, o.n)
		rep.Sequential = s
		if err != nil {
			errs = append(errs, fmt.Errorf("sequential: %w", err))
		}
	}
	if !o.skipConc && ctx.Err() == nil {
		if err := env.warmTemplate(ctx); err != nil {
			errs = append(errs, fmt.Errorf("concurrent warm-up: %w", err))
		}
		for _, c := range o.levels {
			if ctx.Err() != nil {
				break
			}
			w, err := env.concurrent(ctx, c)
			rep.Concurrent = append(rep.Concurrent, w)
			if err != nil {
				errs = append(errs, fmt.Errorf("concurrent %d: %w", c, err))
			}
		}
	}
	if !o.skipMem && o.idle > 0 && ctx.Err() == nil {
		if err := env.warmTemplate(ctx); err != nil {
			errs = append(errs, fmt.Errorf("memory warm-up: %w", err))
		}
		m, err := env.memory(ctx, o.idle)
		rep.Memory = m
		if err != nil {
			errs = append(errs, fmt.Errorf("memory: %w", err))
		}
	}
	if ctx.Err() != nil {
		errs = append(errs, fmt.Errorf("interrupted: %w", ctx.Err()))
	}
	rep.LoadEnd = benchutil.LoadAvg()
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
