package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rund-dev/rund/hack/bench/benchutil"
)

// modeResult is one configuration's figures (MiB unless named otherwise).
type modeResult struct {
	Mode    string `json:"mode"`
	PmemMiB int    `json:"pmem_mib"`
	Config  string `json:"config_toml"`
	Started int    `json:"readers_started"`
	Read    int    `json:"readers_done"`

	Images []imageInfo `json:"images"`
	// Host page cache pages of the image file(s): after the eviction (the
	// baseline sandbox running) and once every reader has read.
	ImageMiB            float64 `json:"image_mib"`
	ImageAllocMiB       float64 `json:"image_allocated_mib"`
	HostCacheBeforeMiB  float64 `json:"host_cache_image_before_mib"`
	HostCacheAfterMiB   float64 `json:"host_cache_image_after_mib"`
	HostCacheEvictedMiB float64 `json:"host_cache_image_at_build_mib"`

	// Guest page cache: the baseline's Cached+Buffers, and per reader the
	// increase over the baseline and over its own figure before the read.
	BaselineCachedMiB  float64 `json:"baseline_guest_cached_mib"`
	BaselineBuffersMiB float64 `json:"baseline_guest_buffers_mib"`
	GuestIncVsBaseline summary `json:"guest_cached_buffers_increase_vs_baseline_mib"`
	GuestIncSelf       summary `json:"guest_cached_buffers_increase_during_read_mib"`

	// VMM PSS: readers and the baseline.
	PSS         summary `json:"vmm_pss_mib"`
	BaselinePSS float64 `json:"baseline_vmm_pss_mib"`

	// Host MemAvailable before the readers started and after they all read.
	MemAvailBeforeMiB      float64 `json:"host_memavailable_before_mib"`
	MemAvailAfterMiB       float64 `json:"host_memavailable_after_mib"`
	MemAvailDropPerSandbox float64 `json:"host_memavailable_drop_per_sandbox_mib"`

	ExecRetries int             `json:"exec_retries"`
	Sandboxes   []sandboxResult `json:"sandboxes"`
	Leftovers   []string        `json:"leftover_processes,omitempty"`
	Errors      []string        `json:"errors,omitempty"`
}

type imageInfo struct {
	Path        string  `json:"path"`
	SizeMiB     float64 `json:"size_mib"`      // st_size (padded, sparse, to the pmem region size)
	AllocMiB    float64 `json:"allocated_mib"` // st_blocks
	ResidentMiB float64 `json:"resident_after_mib"`
}

type sandboxResult struct {
	ID         string  `json:"id"`
	Baseline   bool    `json:"baseline,omitempty"`
	VMMPid     int     `json:"vmm_pid"`
	PSSMiB     float64 `json:"vmm_pss_mib"`
	CachedMiB  float64 `json:"guest_cached_mib"`
	BuffersMiB float64 `json:"guest_buffers_mib"`
	// Cached+Buffers inside the guest just before and just after the read.
	BeforeMiB float64 `json:"guest_cached_buffers_before_read_mib"`
	AfterMiB  float64 `json:"guest_cached_buffers_after_read_mib"`
	StartMs   float64 `json:"start_ms"`
	// Transient `rund exec` failures retried while measuring.
	ExecRetries int      `json:"exec_retries,omitempty"`
	ExecErrors  []string `json:"exec_errors,omitempty"`
}

type summary struct {
	Avg float64 `json:"avg"`
	Min float64 `json:"min"`
	Max float64 `json:"max"`
	N   int     `json:"n"`
}

func summarize(v []float64) summary {
	if len(v) == 0 {
		return summary{}
	}
	s := summary{Min: v[0], Max: v[0], N: len(v)}
	for _, x := range v {
		s.Avg += x
		s.Min = min(s.Min, x)
		s.Max = max(s.Max, x)
	}
	s.Avg /= float64(len(v))
	return s
}

// mode is one configuration's private world.
type mode struct {
	o        options
	rund     string
	dir      string // temp dir: config, root, data_dir, logs
	root     string
	dataDir  string
	memDir   string
	cgParent string
	config   string

	mu  sync.Mutex
	ids []string // every id ever created
}

func (m *mode) args(a ...string) []string {
	return append([]string{"--root", m.root, "--config", m.config}, a...)
}

// rundCmd runs rund with stdin from /dev/null, output to logFile (the
// detached shim inherits it, never a pipe of ours) or captured.
func (m *mode) rundCmd(ctx context.Context, logFile *os.File, a ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, m.o.cmdTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, m.rund, m.args(a...)...)
	cmd.WaitDelay = 5 * time.Second
	var out, errb bytes.Buffer
	if logFile != nil {
		cmd.Stdout, cmd.Stderr = logFile, logFile
	} else {
		cmd.Stdout, cmd.Stderr = &out, &errb
	}
	err := cmd.Run()
	if err != nil {
		msg := strings.TrimSpace(errb.String())
		if logFile != nil {
			b, _ := os.ReadFile(logFile.Name())
			msg = strings.TrimSpace(string(b))
		}
		if len(msg) > 400 {
			msg = msg[len(msg)-400:]
		}
		err = fmt.Errorf("rund %s: %w: %s", strings.Join(a, " "), err, msg)
	}
	return out.String(), err
}

// start runs `rund run -d` of a bundle and returns how long it took.
func (m *mode) start(ctx context.Context, bundle, id string) (time.Duration, error) {
	m.mu.Lock()
	m.ids = append(m.ids, id)
	m.mu.Unlock()
	lf, err := os.Create(filepath.Join(m.dir, "logs", id+".log"))
	if err != nil {
		return 0, err
	}
	defer lf.Close()
	t0 := time.Now()
	_, err = m.rundCmd(ctx, lf, "run", "-d", "-b", bundle, id)
	return time.Since(t0), err
}

// waitDone polls every sandbox for /tmp/done until all have it or the
// deadline passes; it returns those that are done.
func (m *mode) waitDone(ctx context.Context, ids []string) (map[string]bool, error) {
	done := map[string]bool{}
	deadline := time.Now().Add(m.o.readWait)
	for {
		for _, id := range ids {
			if done[id] {
				continue
			}
			if out, err := m.rundCmd(ctx, nil, "exec", id, "cat", "/tmp/done"); err == nil && strings.TrimSpace(out) == "ok" {
				done[id] = true
			}
		}
		if len(done) == len(ids) {
			return done, nil
		}
		if ctx.Err() != nil {
			return done, ctx.Err()
		}
		if time.Now().After(deadline) {
			return done, fmt.Errorf("%d of %d sandboxes not done reading after %s", len(ids)-len(done), len(ids), m.o.readWait)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// vmmPid reads the VMM's pid from the container's state.
func (m *mode) vmmPid(id string) (int, error) {
	_, vmm, err := benchutil.SandboxPids(m.root, id)
	return vmm, err
}

// measureSandbox fills a sandboxResult: VMM PSS, guest meminfo now, and the
// meminfo the process saved before and after its read.
func (m *mode) measureSandbox(ctx context.Context, id string) (sandboxResult, error) {
	r := sandboxResult{ID: id}
	var errs []error
	pid, err := m.vmmPid(id)
	if err == nil {
		r.VMMPid = pid
		r.PSSMiB, err = benchutil.PssMiB(pid)
	}
	errs = append(errs, err)
	out, err := m.execRetry(ctx, &r, id, "cat", "/proc/meminfo")
	if err == nil {
		mi := benchutil.ParseMeminfo(out)
		r.CachedMiB, r.BuffersMiB = mi["Cached"], mi["Buffers"]
	}
	errs = append(errs, err)
	for _, f := range []struct {
		path string
		v    *float64
	}{{"/tmp/m0", &r.BeforeMiB}, {"/tmp/m1", &r.AfterMiB}} {
		out, err := m.execRetry(ctx, &r, id, "cat", f.path)
		if err == nil {
			mi := benchutil.ParseMeminfo(out)
			*f.v = mi["Cached"] + mi["Buffers"]
		}
		errs = append(errs, err)
	}
	return r, errors.Join(errs...)
}

// execRetry runs `rund exec` up to three times: an exec that fails
// transiently (seen here: "decoding shim's answer to exec: unexpected end of
// JSON input") is retried and counted in r.ExecRetries rather than losing
// the sandbox's figures.
func (m *mode) execRetry(ctx context.Context, r *sandboxResult, id string, argv ...string) (string, error) {
	var err error
	for try := 0; try < 3; try++ {
		if try > 0 {
			r.ExecRetries++
			r.ExecErrors = append(r.ExecErrors, err.Error())
			time.Sleep(500 * time.Millisecond)
		}
		var out string
		if out, err = m.rundCmd(ctx, nil, append([]string{"exec", id}, argv...)...); err == nil {
			return out, nil
		}
	}
	return "", err
}

// runMode runs one configuration from setup to teardown.
func runMode(ctx context.Context, o options, rund, top string, b *bundles, name string, pmemMiB int) (res *modeResult, retErr error) {
	res = &modeResult{Mode: name, PmemMiB: pmemMiB}
	tag := fmt.Sprintf("%d-%s", os.Getpid(), strings.ReplaceAll(name, "-", ""))
	m := &mode{
		o: o, rund: rund,
		dir:      filepath.Join(top, name),
		memDir:   "/dev/shm/rund-bench-dax-" + tag,
		cgParent: "/rund-bench-dax-" + tag,
	}
	m.root = filepath.Join(m.dir, "root")
	m.dataDir = filepath.Join(m.dir, "data")
	m.config = filepath.Join(m.dir, "config.toml")
	for _, d := range []string{m.root, m.dataDir, filepath.Join(m.dir, "logs")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return res, err
		}
	}
	res.Config = fmt.Sprintf("# written by hack/bench/dax; removed at the end\n"+
		"data_dir = %q\nmem_dir = %q\ncgroup_parent = %q\npmem_mib = %d\n",
		m.dataDir, m.memDir, m.cgParent, pmemMiB)
	if err := os.WriteFile(m.config, []byte(res.Config), 0o644); err != nil {
		return res, err
	}

	var errs []error
	defer func() {
		// Tear down with a fresh context: ctx may be cancelled by a signal.
		cctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		left, err := m.cleanup(cctx)
		res.Leftovers = left
		if err != nil {
			errs = append(errs, fmt.Errorf("cleanup: %w", err))
		}
		for _, e := range errs {
			res.Errors = append(res.Errors, e.Error())
		}
		retErr = errors.Join(errs...)
	}()

	// The baseline builds the template and the image.
	fmt.Printf("%s: starting the baseline sandbox (builds the template and the image)\n", name)
	baseID := fmt.Sprintf("dx%s-base", tag)
	if _, err := m.start(ctx, b.baseline, baseID); err != nil {
		errs = append(errs, err)
		return res, nil
	}
	if _, err := m.waitDone(ctx, []string{baseID}); err != nil {
		errs = append(errs, fmt.Errorf("baseline: %w", err))
		return res, nil
	}
	// rund's image cache keeps complete images in data_dir/images/images/.
	images, _ := filepath.Glob(filepath.Join(m.dataDir, "images", "*.erofs"))
	more, _ := filepath.Glob(filepath.Join(m.dataDir, "images", "images", "*.erofs"))
	images = append(images, more...)
	if len(images) == 0 {
		errs = append(errs, fmt.Errorf("no image under %s/images", m.dataDir))
		return res, nil
	}
	for _, p := range images {
		at, _ := residentMiB(p)
		res.HostCacheEvictedMiB += at
		if err := evict(p); err != nil {
			errs = append(errs, fmt.Errorf("evicting %s: %w", p, err))
		}
		now, err := residentMiB(p)
		if err != nil {
			errs = append(errs, err)
		}
		res.HostCacheBeforeMiB += now
	}

	res.MemAvailBeforeMiB = benchutil.MeminfoFileMiB("/proc/meminfo", "MemAvailable")
	var ids []string
	var startDur []time.Duration
	for i := 0; i < o.n && ctx.Err() == nil; i++ {
		id := fmt.Sprintf("dx%s-%d", tag, i+1)
		d, err := m.start(ctx, b.reader, id)
		if err != nil {
			errs = append(errs, err)
			break
		}
		ids = append(ids, id)
		startDur = append(startDur, d)
		if (i+1)%5 == 0 || i+1 == o.n {
			fmt.Printf("%s: %d/%d readers started\n", name, i+1, o.n)
		}
	}
	res.Started = len(ids)
	done, err := m.waitDone(ctx, ids)
	res.Read = len(done)
	if err != nil {
		errs = append(errs, err)
	}
	// Let the host settle (the last reads' page cache, QEMU's allocations).
	time.Sleep(2 * time.Second)
	res.MemAvailAfterMiB = benchutil.MeminfoFileMiB("/proc/meminfo", "MemAvailable")
	if len(ids) > 0 {
		res.MemAvailDropPerSandbox = (res.MemAvailBeforeMiB - res.MemAvailAfterMiB) / float64(len(ids))
	}
	for _, p := range images {
		ii := imageInfo{Path: p}
		if fi, err := os.Stat(p); err == nil {
			ii.SizeMiB = float64(fi.Size()) / (1 << 20)
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				ii.AllocMiB = float64(st.Blocks*512) / (1 << 20)
			}
		}
		ii.ResidentMiB, err = residentMiB(p)
		if err != nil {
			errs = append(errs, err)
		}
		res.Images = append(res.Images, ii)
		res.ImageMiB += ii.SizeMiB
		res.ImageAllocMiB += ii.AllocMiB
		res.HostCacheAfterMiB += ii.ResidentMiB
	}
	fmt.Printf("%s: %d/%d readers done; measuring\n", name, len(done), len(ids))

	base, err := m.measureSandbox(ctx, baseID)
	if err != nil {
		errs = append(errs, fmt.Errorf("baseline: %w", err))
	}
	base.Baseline = true
	res.Sandboxes = append(res.Sandboxes, base)
	res.BaselineCachedMiB, res.BaselineBuffersMiB, res.BaselinePSS = base.CachedMiB, base.BuffersMiB, base.PSSMiB
	var incBase, incSelf, pss []float64
	for i, id := range ids {
		if !done[id] {
			continue
		}
		r, err := m.measureSandbox(ctx, id)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		r.StartMs = float64(startDur[i].Microseconds()) / 1000
		res.Sandboxes = append(res.Sandboxes, r)
		incBase = append(incBase, r.CachedMiB+r.BuffersMiB-base.CachedMiB-base.BuffersMiB)
		incSelf = append(incSelf, r.AfterMiB-r.BeforeMiB)
		pss = append(pss, r.PSSMiB)
	}
	res.GuestIncVsBaseline = summarize(incBase)
	res.GuestIncSelf = summarize(incSelf)
	res.PSS = summarize(pss)
	for _, s := range res.Sandboxes {
		res.ExecRetries += s.ExecRetries
	}
	return res, nil
}

// cleanup deletes every sandbox made, checks that none of their processes
// are left, and removes templates, the cgroup pool, mem_dir and the temp dir
// of this configuration. It returns the processes left behind.
func (m *mode) cleanup(ctx context.Context) ([]string, error) {
	var errs []error
	m.mu.Lock()
	ids := append([]string(nil), m.ids...)
	m.mu.Unlock()
	var vmms []int
	for _, id := range ids {
		if pid, err := m.vmmPid(id); err == nil {
			vmms = append(vmms, pid)
		}
	}
	if out, err := m.rundCmd(ctx, nil, "list", "-q"); err == nil {
		for _, id := range strings.Fields(out) {
			if !contains(ids, id) {
				ids = append(ids, id)
			}
		}
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	sem := make(chan struct{}, 4)
	for _, id := range ids {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if _, err := m.rundCmd(ctx, nil, "delete", "-f", id); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if out, err := m.rundCmd(ctx, nil, "list", "-q"); err == nil && strings.TrimSpace(out) != "" {
		errs = append(errs, fmt.Errorf("containers left after delete -f: %s", strings.Fields(out)))
	}
	left := m.leftovers(vmms)
	if len(left) > 0 {
		time.Sleep(3 * time.Second)
		if left = m.leftovers(vmms); len(left) > 0 {
			errs = append(errs, fmt.Errorf("processes left behind: %v", left))
		}
	}
	if _, err := m.rundCmd(ctx, nil, "template", "rm", "--all"); err != nil {
		errs = append(errs, err)
	}
	if _, err := m.rundCmd(ctx, nil, "pool", "destroy", "--parent", m.cgParent); err != nil {
		errs = append(errs, err)
	}
	benchutil.RemoveCgroupParent(m.cgParent)
	if err := os.RemoveAll(m.memDir); err != nil {
		errs = append(errs, err)
	}
	if !m.o.keepTemp {
		if err := os.RemoveAll(m.dir); err != nil {
			errs = append(errs, err)
		}
	}
	return left, errors.Join(errs...)
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}
