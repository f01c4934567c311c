package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/rund-dev/rund/hack/bench/benchutil"
)

// Modes of the sequential phase.
const (
	modeTemplate = "rund-template"
	modeCold     = "rund-cold"
	modeRunc     = "runc"
)

// runOnce runs /bin/true once in the given mode with `run` (create, start,
// wait, delete) and returns its wall time and the CPU its process tree used.
func (e *env) runOnce(ctx context.Context, mode string) (result, float64) {
	before := childrenCPU()
	var r result
	switch mode {
	case modeTemplate:
		r = e.rundCmd(ctx, "run", "-b", e.bundles["true"], e.newID("tpl"))
	case modeCold:
		r = e.rundCmd(ctx, "run", "-b", e.bundles["cold"], e.newID("cold"))
	case modeRunc:
		r = e.execCmd(ctx, nil, e.runc, "--root", e.runcRoot, "run", "-b", e.bundles["true"], e.newID("runc"))
	}
	return r, childrenCPU() - before
}

// warmTemplate makes sure the template and image cache exist (a no-op
// apart from one sandbox start when they do), retrying once: the run that
// builds the template is the one most likely to hit a first-use problem.
func (e *env) warmTemplate(ctx context.Context) error {
	r, _ := e.runOnce(ctx, modeTemplate)
	if r.err == nil {
		return nil
	}
	fmt.Fprintln(os.Stderr, "bench-startup: warm-up failed, retrying:", r.err)
	r2, _ := e.runOnce(ctx, modeTemplate)
	if r2.err != nil {
		return errors.Join(r.err, r2.err)
	}
	return nil
}

// sequential runs the three modes interleaved, n counted runs each, after
// one uncounted warm-up run per mode.
func (e *env) sequential(ctx context.Context, n int) (*seqReport, error) {
	modes := []string{modeTemplate, modeCold, modeRunc}
	rep := &seqReport{N: n, Modes: map[string]*modeReport{}}
	for _, m := range modes {
		rep.Modes[m] = &modeReport{}
	}
	fmt.Printf("sequential: warm-up (builds the template and image cache)\n")
	for _, m := range modes {
		r, _ := e.runOnce(ctx, m)
		w := warmup{Mode: m, Ms: ms(r.elapsed)}
		if r.err != nil {
			w.Error = r.err.Error()
			fmt.Fprintf(os.Stderr, "bench-startup: warm-up %s failed: %v\n", m, r.err)
			// One more try so a first-use failure doesn't poison the runs.
			r, _ = e.runOnce(ctx, m)
			w.RetryMs = ms(r.elapsed)
			if r.err != nil {
				w.RetryError = r.err.Error()
			}
		}
		rep.Warmup = append(rep.Warmup, w)
	}
	for i := 0; i < n && ctx.Err() == nil; i++ {
		for _, m := range modes {
			r, cpu := e.runOnce(ctx, m)
			mr := rep.Modes[m]
			if r.err != nil {
				mr.Errors = append(mr.Errors, r.err.Error())
				continue
			}
			mr.SamplesMs = append(mr.SamplesMs, ms(r.elapsed))
			mr.CPUSeconds = append(mr.CPUSeconds, cpu)
		}
		fmt.Printf("sequential: %d/%d\n", i+1, n)
	}
	for _, m := range modes {
		rep.Modes[m].finish()
	}
	t, c, r := rep.Modes[modeTemplate], rep.Modes[modeCold], rep.Modes[modeRunc]
	if t.MedianMs > 0 && r.MedianMs > 0 {
		rep.ColdOverTemplateMedian = c.MedianMs / t.MedianMs
		rep.TemplateOverRuncMedian = t.MedianMs / r.MedianMs
		rep.ColdOverTemplateP99 = c.P99Ms / t.P99Ms
		rep.TemplateOverRuncP99 = t.P99Ms / r.P99Ms
	}
	var errs []error
	for _, m := range modes {
		if k := len(rep.Modes[m].Errors); k > 0 {
			errs = append(errs, fmt.Errorf("%s: %d of %d runs failed", m, k, n))
		}
	}
	return rep, errors.Join(errs...)
}

// concurrent starts c sandboxes from the template at once with
// `run --keep` (so each one's time is create → process exit, without the
// delete), then deletes them.
func (e *env) concurrent(ctx context.Context, c int) (*concReport, error) {
	fmt.Printf("concurrent: %d-way\n", c)
	rep := &concReport{Concurrency: c, LoadBefore: benchutil.LoadAvg()}
	ids := make([]string, c)
	for i := range ids {
		ids[i] = e.newID(fmt.Sprintf("c%d", c))
	}
	res := make([]result, c)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			res[i] = e.rundCmd(ctx, "run", "--keep", "-b", e.bundles["true"], ids[i])
		}()
	}
	cpu0, stat0 := childrenCPU(), readCPUStat()
	t0 := time.Now()
	close(start)
	wg.Wait()
	rep.WallMs = ms(time.Since(t0))
	rep.ChildrenCPUSeconds = childrenCPU() - cpu0
	rep.HostCPU = readCPUStat().since(stat0)
	rep.LoadAfter = benchutil.LoadAvg()
	var errs []error
	for _, r := range res {
		if r.err != nil {
			rep.Errors = append(rep.Errors, r.err.Error())
			continue
		}
		rep.SamplesMs = append(rep.SamplesMs, ms(r.elapsed))
	}
	rep.OK = len(rep.SamplesMs)
	rep.P50Ms, rep.P99Ms = percentile(rep.SamplesMs, 50), percentile(rep.SamplesMs, 99)
	rep.MinMs, rep.MaxMs = percentile(rep.SamplesMs, 0), percentile(rep.SamplesMs, 100)
	if rep.WallMs > 0 {
		rep.StartsPerSecond = float64(rep.OK) / (rep.WallMs / 1000)
	}
	d, derrs := e.rundDelete(ctx, ids)
	rep.DeleteWallMs = ms(d)
	for _, err := range derrs {
		rep.Errors = append(rep.Errors, err.Error())
	}
	if len(rep.Errors) > 0 {
		errs = append(errs, fmt.Errorf("%d errors (first: %s)", len(rep.Errors), rep.Errors[0]))
	}
	return rep, errors.Join(errs...)
}

// memory starts k idle sandboxes one after another, waits for them to
// settle, measures their processes' PSS, then deletes them all and checks
// that nothing is left.
func (e *env) memory(ctx context.Context, k int) (*memReport, error) {
	rep := &memReport{Requested: k, LoadBefore: benchutil.LoadAvg()}
	rep.MemAvailableBeforeMiB = memAvailableMiB()
	rep.TotalProcsBefore = countProcs()
	logs := filepath.Join(e.tmp, "logs")
	if err := os.MkdirAll(logs, 0o755); err != nil {
		return rep, err
	}
	var ids []string
	var errs []error
	var startMs []float64
	for i := 0; i < k && ctx.Err() == nil; i++ {
		if avail := memAvailableMiB(); avail > 0 && avail < float64(e.o.minAvailMiB) {
			rep.StoppedBecause = fmt.Sprintf("host MemAvailable %.0f MiB < %d MiB after %d sandboxes", avail, e.o.minAvailMiB, len(ids))
			break
		}
		id := e.newID("idle")
		lf, err := os.Create(filepath.Join(logs, id+".log"))
		if err != nil {
			errs = append(errs, err)
			break
		}
		// The detached shim inherits the log file, never a pipe of ours.
		r := e.execCmd(ctx, lf, e.rund, e.rundArgs("run", "-d", "-b", e.bundles["sleep"], id)...)
		lf.Close()
		if r.err != nil {
			b, _ := os.ReadFile(lf.Name())
			rep.StoppedBecause = fmt.Sprintf("sandbox %d failed to start: %v: %s", i+1, r.err, tail(string(b), 400))
			ids = append(ids, id) // may be half-made; delete it too
			break
		}
		ids = append(ids, id)
		startMs = append(startMs, ms(r.elapsed))
		if (i+1)%10 == 0 || i+1 == k {
			fmt.Printf("memory: %d/%d idle sandboxes started\n", i+1, k)
		}
	}
	rep.Started = len(startMs)
	rep.StartP50Ms, rep.StartP99Ms = percentile(startMs, 50), percentile(startMs, 99)
	if rep.StoppedBecause != "" {
		fmt.Fprintln(os.Stderr, "bench-startup: memory:", rep.StoppedBecause)
	}

	sbs := make([]*sandboxProcs, 0, len(ids))
	for _, id := range ids[:rep.Started] {
		sb, err := e.findSandbox(ctx, id)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		sbs = append(sbs, sb)
	}
	if len(sbs) > 0 {
		fmt.Printf("memory: waiting for %d sandboxes to go idle\n", len(sbs))
		rep.Idle = waitIdle(ctx, sbs, e.o.idleTimeout)
		if err := measure(sbs, rep, e.memDir); err != nil {
			errs = append(errs, err)
		}
	}
	rep.MemAvailableIdleMiB = memAvailableMiB()
	if rep.Started > 0 {
		rep.HostMemDropPerSandboxMiB = (rep.MemAvailableBeforeMiB - rep.MemAvailableIdleMiB) / float64(rep.Started)
	}
	rep.LoadIdle = benchutil.LoadAvg()

	fmt.Printf("memory: deleting %d sandboxes\n", len(ids))
	d, derrs := e.rundDelete(ctx, ids)
	rep.DeleteWallMs = ms(d)
	for _, err := range derrs {
		rep.DeleteErrors = append(rep.DeleteErrors, err.Error())
	}
	// Leftover check: ours by their command lines, and a host-wide count.
	deadline := time.Now().Add(15 * time.Second)
	for {
		rep.Leftovers = e.leftovers()
		if len(rep.Leftovers) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if left, err := e.listIDs(ctx, e.rund, e.rundArgs()...); err == nil {
		rep.ContainersLeft = left
	}
	for _, sb := range sbs {
		for _, p := range sb.pids() {
			if procAlive(p) {
				rep.Leftovers = append(rep.Leftovers, fmt.Sprintf("pid %d of %s still alive", p, sb.id))
			}
		}
	}
	rep.TotalProcsAfter = countProcs()
	if len(rep.Leftovers) > 0 || len(rep.ContainersLeft) > 0 {
		errs = append(errs, fmt.Errorf("left behind after delete: %v %v", rep.Leftovers, rep.ContainersLeft))
	}
	if len(rep.DeleteErrors) > 0 {
		errs = append(errs, fmt.Errorf("%d deletes failed (first: %s)", len(rep.DeleteErrors), rep.DeleteErrors[0]))
	}
	if rep.Started < k && rep.StoppedBecause != "" {
		errs = append(errs, errors.New(rep.StoppedBecause))
	}
	return rep, errors.Join(errs...)
}

// childrenCPU is the user+system CPU seconds of our waited-for descendants
// (a child's figure includes the grandchildren it waited for: rund waits for
// its shim, the shim for its VMM).
func childrenCPU() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_CHILDREN, &ru); err != nil {
		return 0
	}
	return tv(ru.Utime) + tv(ru.Stime)
}

func tv(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}
