package guest

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"time"

	"github.com/rund-dev/rund/vm/agent/proto"
	"golang.org/x/sys/unix"
)

// warmupMounts are the mounts a typical OCI config asks for, applied once
// during warm-up so that clones find their kernel paths warm.
var warmupMounts = []proto.Mount{
	{Destination: "/proc", Type: "proc", Source: "proc"},
	{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
	{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"}},
	{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
	{Destination: "/dev/mqueue", Type: "mqueue", Source: "mqueue", Options: []string{"nosuid", "noexec", "nodev"}},
	{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
	{Destination: "/etc/hostname", Type: "bind", Options: []string{"rbind", "ro"}, Data: []byte("warmup\n")},
}

// warmup does once, during a template build, what every sandbox will do:
// mount a root, run the spawn path (with pipes and with a terminal), tear
// it all down, then drop caches so the snapshot holds no stale blocks.
func (a *agent) warmup(req proto.WarmupRequest) (proto.Reply, error) {
	<-a.modulesDone
	t := time.Now()
	var did []string
	if a.modulesErr != nil {
		did = append(did, a.modulesErr.Error())
	}
	creq := proto.CreateRequest{
		ID:            "warmup",
		Root:          req.Root,
		Mounts:        warmupMounts,
		MaskedPaths:   []string{"/proc/kcore", "/sys/firmware"},
		ReadonlyPaths: []string{"/proc/sys"},
	}
	var c *container
	var err error
	if req.Root.Lower == "" && req.Root.SharedTag == "" {
		c, err = tmpfsContainer(creq.ID)
		did = append(did, "root: tmpfs")
	} else {
		c, err = mountRoot(creq.ID, req.Root)
		did = append(did, fmt.Sprintf("root: %s", describeRoot(req.Root)))
	}
	if err != nil {
		return proto.Reply{}, fmt.Errorf("warmup: %w", err)
	}
	if err := c.setup(creq, a.logf); err != nil {
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
	unix.Sync()
	flushBlockDevices()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0o644); err != nil {
		did = append(did, fmt.Sprintf("drop_caches: %v", err))
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
	if err := a.spawn(p, root); err != nil {
		p.closeStdinQueue()
		if strings.Contains(err.Error(), "executable file not found") {
			return fmt.Sprintf("spawn (%s): helper set up, no program to run", mode)
		}
		return fmt.Sprintf("spawn (%s): %v", mode, err)
	}
	err := p.release()
	status := <-p.exitCh
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
