package guest

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"time"

	"github.com/rund-dev/rund/vm/agent/proto"
	"golang.org/x/sys/unix"
)

// warmupMounts are the usual mounts plus a bind-mounted file, applied once
// during warm-up so that the template has run their paths.
var warmupMounts = append(slices.Clone(usualMounts),
	proto.Mount{Destination: "/etc/hostname", Type: "bind", Options: []string{"rbind", "ro"}, Data: []byte("warmup\n")})

// warmup does once, during a template build, what every sandbox will do:
// mount a root, run the spawn path (with pipes and with a terminal), tear
// it all down. It then leaves ready what a clone's Create can use as it is
// (a container directory, the usual mounts, spare helpers), and drops
// caches so the snapshot holds no stale blocks.
func (a *agent) warmup(req proto.WarmupRequest) (proto.Reply, error) {
	<-a.modulesDone
	a.blockCacheClean.Store(false)
	t := time.Now()
	var did []string
	if a.modulesErr != nil {
		did = append(did, a.modulesErr.Error())
	}
	creq := proto.CreateRequest{
		ID:            "warmup",
		Root:          req.Root,
		Mounts:        warmupMounts,
		MaskedPaths:   usualMasked,
		ReadonlyPaths: usualReadonly,
	}
	var c *container
	var err error
	if req.Root.Lower == "" && req.Root.SharedTag == "" {
		c, err = tmpfsContainer(creq.ID)
		did = append(did, "root: tmpfs")
	} else {
		c, err = mountRoot(creq.ID, req.Root, newSteps())
		did = append(did, fmt.Sprintf("root: %s", describeRoot(req.Root)))
	}
	if err != nil {
		return proto.Reply{}, fmt.Errorf("warmup: %w", err)
	}
	if err := c.setup(creq, nil, a.logf, newSteps()); err != nil {
		_ = c.teardown()
		return proto.Reply{}, fmt.Errorf("warmup: %w", err)
	}
	for _, term := range []bool{false, true} {
		spec := proto.Process{Args: []string{"true"}, Cwd: "/", Env: []string{"PATH=" + defaultPath}, Terminal: term, Rows: 24, Cols: 80}
		did = append(did, a.warmSpawn(spec, c.root))
	}
	if err := c.teardown(); err != nil {
		return proto.Reply{}, fmt.Errorf("warmup: %w", err)
	}
	if _, err := os.Stat(spareDir); err != nil {
		if err := makeContainerDir(spareDir); err != nil {
			return proto.Reply{}, fmt.Errorf("warmup: %w", err)
		}
	}
	a.mu.Lock()
	old := a.stage
	a.stage = nil
	a.mu.Unlock()
	old.discard()
	if st, err := buildStage(stageDir, a.logf); err != nil {
		did = append(did, fmt.Sprintf("no staged mounts: %v", err))
	} else {
		a.mu.Lock()
		a.stage = st
		a.mu.Unlock()
		did = append(did, fmt.Sprintf("staged mounts: %d groups", len(st.groups)))
	}
	if err := a.zygotes.fill(initZygotes, true); err != nil {
		return proto.Reply{}, fmt.Errorf("warmup: %w", err)
	}
	if err := a.zygotes.fill(execZygotes, false); err != nil {
		return proto.Reply{}, fmt.Errorf("warmup: %w", err)
	}
	did = append(did, "spare helpers: "+a.zygotes.describe())
	_ = a.capLast()
	unix.Sync()
	flushBlockDevices()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0o644); err != nil {
		did = append(did, fmt.Sprintf("drop_caches: %v", err))
	} else {
		a.blockCacheClean.Store(true)
	}
	runtime.GC()
	debug.FreeOSMemory()
	did = append(did, fmt.Sprintf("modules %v, warm-up %v", a.modulesTime.Round(time.Millisecond), time.Since(t).Round(time.Millisecond)))
	return proto.Reply{Info: strings.Join(did, "; ")}, nil
}

// warmSpawn runs one process through the spawn path. A root without the
// program still runs the helper's whole setup, which is what matters.
func (a *agent) warmSpawn(spec proto.Process, root string) string {
	p := &process{spec: spec, stdinQ: make(chan []byte, 1)}
	p.queueStdin(nil)
	mode := "pipes"
	if spec.Terminal {
		mode = "terminal"
	}
	cfg := childConfig{Root: root, Masked: usualMasked, Readonly: usualReadonly, ProcMounts: procMounts(warmupMounts)}
	if err := a.spawn(p, cfg, newSteps()); err != nil {
		p.closeStdinQueue()
		if strings.Contains(err.Error(), "executable file not found") {
			return fmt.Sprintf("spawn (%s): helper set up, no program to run", mode)
		}
		return fmt.Sprintf("spawn (%s): %v", mode, err)
	}
	err := p.release(a.reaper)
	status := <-p.exitCh
	dropPidnsStage(p.pid)
	p.stdio.drain(time.Second)
	p.closeStdinQueue()
	p.stdio.closeAll()
	if err != nil {
		return fmt.Sprintf("spawn (%s): %v", mode, err)
	}
	return fmt.Sprintf("spawn (%s): exit %d", mode, status)
}

// tmpfsContainer is an empty root on tmpfs, for a warm-up without an image.
func tmpfsContainer(id string) (*container, error) {
	c := &container{id: id, dir: filepath.Join(stateDir, id)}
	c.root = filepath.Join(c.dir, "root")
	for _, d := range []string{"root", "files"} {
		if err := os.MkdirAll(filepath.Join(c.dir, d), 0o700); err != nil {
			return nil, err
		}
	}
	for _, d := range []string{"root", "files"} {
		if err := unix.Mount("tmpfs", filepath.Join(c.dir, d), "tmpfs", 0, "mode=0755"); err != nil {
			_ = c.teardown()
			return nil, fmt.Errorf("mounting tmpfs root: %w", err)
		}
	}
	return c, nil
}

func describeRoot(r proto.Root) string {
	if r.SharedTag != "" {
		return fmt.Sprintf("shared %q", r.SharedTag)
	}
	s := fmt.Sprintf("%s (%s", r.Lower, r.LowerType)
	if r.DAX {
		s += ", dax"
	}
	s += ")"
	if r.Upper != "" {
		s += " + " + r.Upper
	}
	return s
}
