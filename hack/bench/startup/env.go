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
	"time"

	"github.com/rund-dev/rund/hack/bench/benchutil"
)

// env is one benchmark's private world: binaries, bundles, state roots and
// rund configuration, and the record of every container made in it.
type env struct {
	o          options
	tmp        string // everything private lives here (except memDir)
	rund, runc string // absolute paths
	config     string // the rund config.toml passed to every rund call
	configDesc configInfo
	ownConfig  bool   // we wrote config; remove its data and mem dirs at the end
	memDir     string // the rund mem_dir (tmpfs), when ours
	cgParent   string // the rund cgroup_parent, when ours
	rundRoot   string
	runcRoot   string
	rootfs     string
	bundles    map[string]string // "true", "cold", "sleep" -> bundle dir
	prefix     string            // container id prefix

	mu   sync.Mutex
	made map[string]bool // rund ids ever created (deleted at the end)
	seq  int
}

type configInfo struct {
	Path       string `json:"path"`
	Private    bool   `json:"private"`
	Text       string `json:"text,omitempty"`
	RundRoot   string `json:"rund_root"`
	RuncRoot   string `json:"runc_root"`
	MemDir     string `json:"mem_dir,omitempty"`
	CgroupPrnt string `json:"cgroup_parent,omitempty"`
}

func setup(o options) (*env, error) {
	rund, err := resolveBinary(o.rund)
	if err != nil {
		return nil, fmt.Errorf("-rund: %w", err)
	}
	runc, err := resolveBinary(o.runc)
	if err != nil {
		return nil, fmt.Errorf("-runc: %w", err)
	}
	tmp, err := os.MkdirTemp("", "rund-bench-startup-")
	if err != nil {
		return nil, err
	}
	e := &env{
		o: o, tmp: tmp, rund: rund, runc: runc,
		rundRoot: filepath.Join(tmp, "rund-root"),
		runcRoot: filepath.Join(tmp, "runc-root"),
		rootfs:   filepath.Join(tmp, "rootfs"),
		bundles:  map[string]string{},
		prefix:   fmt.Sprintf("bs%d", os.Getpid()),
		made:     map[string]bool{},
	}
	if o.config == "" {
		e.ownConfig = true
		e.memDir = fmt.Sprintf("/dev/shm/rund-bench-startup-%d", os.Getpid())
		e.cgParent = fmt.Sprintf("/rund-bench-startup-%d", os.Getpid())
		e.config = filepath.Join(tmp, "config.toml")
		text := fmt.Sprintf("# written by hack/bench/startup; removed at the end\n"+
			"data_dir = %q\nmem_dir = %q\ncgroup_parent = %q\n",
			filepath.Join(tmp, "data"), e.memDir, e.cgParent)
		if err := os.WriteFile(e.config, []byte(text), 0o644); err != nil {
			return e, err
		}
		e.configDesc = configInfo{Path: e.config, Private: true, Text: text}
	} else {
		if e.config, err = filepath.Abs(o.config); err != nil {
			return e, err
		}
		b, err := os.ReadFile(e.config)
		if err != nil {
			return e, fmt.Errorf("-config: %w", err)
		}
		e.configDesc = configInfo{Path: e.config, Text: string(b)}
	}
	e.configDesc.RundRoot, e.configDesc.RuncRoot = e.rundRoot, e.runcRoot
	e.configDesc.MemDir, e.configDesc.CgroupPrnt = e.memDir, e.cgParent
	for _, d := range []string{e.rundRoot, e.runcRoot} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return e, err
		}
	}
	if err := e.makeBundles(); err != nil {
		return e, fmt.Errorf("making the busybox bundle: %w", err)
	}
	return e, nil
}

func resolveBinary(p string) (string, error) {
	if !strings.Contains(p, "/") {
		return exec.LookPath(p)
	}
	a, err := filepath.Abs(p)
	if err != nil {
		return "", err
	}
	if _, err := os.Stat(a); err != nil {
		return "", err
	}
	return a, nil
}

// makeBundles builds one busybox rootfs and three bundles whose config.json
// all name it by absolute path: /bin/true from the template, /bin/true with
// a cold boot, and `sleep 100000` for the idle sandboxes.
func (e *env) makeBundles() error {
	if err := benchutil.BusyboxRootfs(e.rootfs, e.o.busybox); err != nil {
		return err
	}
	variants := []struct {
		name string
		args []string
		ann  map[string]string
	}{
		{"true", []string{"/bin/true"}, nil},
		{"cold", []string{"/bin/true"}, map[string]string{"rund.template": "off"}},
		{"sleep", []string{"/bin/sleep", "100000"}, nil},
	}
	for _, v := range variants {
		dir := filepath.Join(e.tmp, "bundle-"+v.name)
		if err := benchutil.Bundle(e.rund, dir, e.rootfs, v.ann, v.args...); err != nil {
			return err
		}
		e.bundles[v.name] = dir
	}
	return nil
}

// newID returns a fresh container id and records it for the final cleanup.
func (e *env) newID(kind string) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.seq++
	id := fmt.Sprintf("%s-%s-%d", e.prefix, kind, e.seq)
	if kind != "runc" {
		e.made[id] = true
	}
	return id
}

func (e *env) rundArgs(args ...string) []string {
	return append([]string{"--root", e.rundRoot, "--config", e.config}, args...)
}

// result is one command's outcome.
type result struct {
	elapsed time.Duration
	err     error
}

// execCmd runs a binary with stdin from /dev/null and stdout/stderr to the
// given file (or captured when nil), bounded by the command timeout. Its
// WaitDelay keeps a leaked grandchild holding a pipe from hanging us.
func (e *env) execCmd(ctx context.Context, logFile *os.File, bin string, args ...string) result {
	ctx, cancel := context.WithTimeout(ctx, e.o.cmdTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.WaitDelay = 5 * time.Second
	var buf bytes.Buffer
	if logFile != nil {
		cmd.Stdout, cmd.Stderr = logFile, logFile
	} else {
		cmd.Stdout, cmd.Stderr = &buf, &buf
	}
	t0 := time.Now()
	err := cmd.Run()
	d := time.Since(t0)
	if err != nil {
		msg := strings.TrimSpace(buf.String())
		if len(msg) > 600 {
			msg = msg[len(msg)-600:]
		}
		if logFile != nil {
			msg = "see " + logFile.Name()
		}
		err = fmt.Errorf("%s %s: %w: %s", filepath.Base(bin), strings.Join(args, " "), err, msg)
	}
	return result{d, err}
}

func (e *env) rundCmd(ctx context.Context, args ...string) result {
	return e.execCmd(ctx, nil, e.rund, e.rundArgs(args...)...)
}

// rundDelete force-deletes the given rund containers, a few at a time.
func (e *env) rundDelete(ctx context.Context, ids []string) (time.Duration, []error) {
	t0 := time.Now()
	var mu sync.Mutex
	var errs []error
	sem := make(chan struct{}, max(e.o.deleteWorkers, 1))
	var wg sync.WaitGroup
	for _, id := range ids {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if r := e.rundCmd(ctx, "delete", "-f", id); r.err != nil {
				mu.Lock()
				errs = append(errs, r.err)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return time.Since(t0), errs
}

// listIDs returns the ids of the containers a runtime lists under root.
func (e *env) listIDs(ctx context.Context, bin string, args ...string) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, append(args, "list", "-q")...).Output()
	if err != nil {
		return nil, err
	}
	return strings.Fields(string(out)), nil
}

// cleanup deletes every container made (whatever state it is in), checks
// that none of their processes are left, and removes the private state:
// templates, mem_dir, the cgroup pool and its parent cgroups, the temp dir.
func (e *env) cleanup(ctx context.Context) error {
	var errs []error
	ids, err := e.listIDs(ctx, e.rund, e.rundArgs()...)
	if err != nil {
		errs = append(errs, fmt.Errorf("rund list: %w", err))
	}
	e.mu.Lock()
	for _, id := range ids {
		e.made[id] = true
	}
	var all []string
	for id := range e.made {
		all = append(all, id)
	}
	e.mu.Unlock()
	// Ids already gone are not errors: only those still listed count.
	e.rundDelete(ctx, all)
	if left, err := e.listIDs(ctx, e.rund, e.rundArgs()...); err == nil && len(left) > 0 {
		errs = append(errs, fmt.Errorf("rund containers left after delete -f: %v", left))
	}
	if ids, err := e.listIDs(ctx, e.runc, "--root", e.runcRoot); err == nil {
		for _, id := range ids {
			if r := e.execCmd(ctx, nil, e.runc, "--root", e.runcRoot, "delete", "-f", id); r.err != nil {
				errs = append(errs, r.err)
			}
		}
	}
	if procs := e.leftovers(); len(procs) > 0 {
		time.Sleep(3 * time.Second)
		if procs = e.leftovers(); len(procs) > 0 {
			errs = append(errs, fmt.Errorf("processes left behind: %v", procs))
		}
	}
	if e.ownConfig {
		if r := e.rundCmd(ctx, "template", "rm", "--all"); r.err != nil {
			errs = append(errs, r.err)
		}
		if r := e.rundCmd(ctx, "pool", "destroy", "--parent", e.cgParent); r.err != nil {
			errs = append(errs, r.err)
		}
		benchutil.RemoveCgroupParent(e.cgParent)
		if err := os.RemoveAll(e.memDir); err != nil {
			errs = append(errs, err)
		}
	}
	if e.o.keepTemp {
		fmt.Fprintln(os.Stderr, "bench-startup: kept", e.tmp)
	} else if err := os.RemoveAll(e.tmp); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
