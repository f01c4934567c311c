package container

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"

	"github.com/rund-dev/rund/internal/atomicfile"
	"github.com/rund-dev/rund/internal/cleanup"
	"github.com/rund-dev/rund/internal/config"
	"github.com/rund-dev/rund/internal/shimapi"
)

// Options are the global settings every verb receives.
type Options struct {
	Root          string // state root (--root)
	Config        config.Config
	ConfigPath    string
	Debug         bool
	LogPath       string
	LogFormat     string
	SystemdCgroup bool
}

// CreateOptions are create's flags.
type CreateOptions struct {
	Options
	ID            string
	Bundle        string
	PidFile       string
	ConsoleSocket string
	PreserveFDs   int
	// Stdio given to the container (nil: this process's).
	Stdin, Stdout, Stderr *os.File
}

// Create makes a container: its state directory, root filesystem layers,
// cgroup and a shim that boots (or restores) the microVM and holds the
// container's process ready to run. It returns once the process is ready
// (runtime-spec: create applies all configuration but process.args).
func Create(ctx context.Context, o CreateOptions) (*State, error) {
	if err := ValidateID(o.ID); err != nil {
		return nil, err
	}
	spec, bundle, err := loadSpec(o.Bundle)
	if err != nil {
		return nil, err
	}
	if spec.Process.Terminal && o.ConsoleSocket == "" {
		return nil, errors.New("process.terminal is true but --console-socket was not given")
	}
	if !spec.Process.Terminal && o.ConsoleSocket != "" {
		return nil, errors.New("--console-socket given but process.terminal is false")
	}
	if err := os.MkdirAll(o.Root, 0o711); err != nil {
		return nil, fmt.Errorf("creating root %s: %w", o.Root, err)
	}
	dir := dirOf(o.Root, o.ID)
	if err := os.Mkdir(dir, 0o700); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("%s: %w", o.ID, ErrExist)
		}
		return nil, fmt.Errorf("creating state directory: %w", err)
	}
	var undo cleanup.Stack
	defer undo.Run()
	undo.Add(func() { os.RemoveAll(dir); os.RemoveAll(vmDirOf(o.Root, o.ID)) })

	st := &State{
		ID: o.ID, Bundle: bundle, Rootfs: rootfsOf(spec, bundle), Status: Creating,
		Created: time.Now().UTC(), Annotations: spec.Annotations,
	}
	if err := st.saveLocked(o.Root); err != nil {
		return nil, err
	}
	t0 := time.Now()
	launch, files, handOverCgroup, err := prepare(ctx, o, spec, st, &undo)
	if err != nil {
		return nil, err
	}
	logrus.Debugf("create %s: rootfs and cgroup ready in %s", o.ID, time.Since(t0))
	ready, shim, err := startShim(ctx, o, launch, files, spec.Process.Terminal)
	for _, f := range files {
		f.Close()
	}
	if shim != nil {
		undo.Add(func() { shim.Signal(syscall.SIGKILL); waitGone(shim, 5*time.Second) })
	}
	if err != nil {
		return nil, err
	}
	if err := handOverCgroup(shim.Pid); err != nil {
		return nil, err
	}
	st.Shim = NewProc(shim.Pid)
	st.VMM = NewProc(ready.VMMPid)
	st.Template = ready.Template
	if ready.TemplateBuilt && ready.Template != "" {
		logrus.Infof("built template %s (first use); later creates restore it", ready.Template)
	}
	if ready.Warning != "" {
		logrus.Warn(ready.Warning)
	}
	st.Status = Created
	undo.Add(func() { st.VMM.Signal(syscall.SIGKILL) })
	if err := st.saveLocked(o.Root); err != nil {
		return nil, err
	}
	if o.PidFile != "" {
		if err := writePidFile(o.PidFile, shim.Pid); err != nil {
			return nil, err
		}
	}
	undo.Release()
	return st, nil
}

// prepare builds everything the shim needs: the launch description and the
// files it inherits (the writable layer), and returns the function that hands
// the cgroup lease to the shim once it runs.
func prepare(ctx context.Context, o CreateOptions, spec *specs.Spec, st *State, undo *cleanup.Stack) (*shimapi.Launch, []*os.File, func(int) error, error) {
	cfg := o.Config
	hv := hypervisorOf(cfg, spec)
	switch hv {
	case "qemu", "cloud-hypervisor":
	default:
		return nil, nil, nil, fmt.Errorf("annotation %s: unknown hypervisor %q (want qemu or cloud-hypervisor)", AnnotationHypervisor, hv)
	}
	shares := newShareSet(cfg.Shares, hv, cfg.GuestKernel)
	req, err := toCreateRequest(o.ID, st.Bundle, spec, shares.add, func(f string, a ...any) { logrus.Warnf(f, a...) })
	if err != nil {
		return nil, nil, nil, err
	}
	l := BaseLaunch(o.Options, o.ID)
	l.Create = req
	setBackend(l, cfg, hv, templatesOn(cfg, spec))
	st.Hypervisor = l.Hypervisor
	for _, p := range []string{cfg.Kernel, cfg.Initrd} {
		if _, err := os.Stat(p); err != nil {
			return nil, nil, nil, fmt.Errorf("guest artifact: %w (run `make install`, or set kernel/initrd in the config)", err)
		}
	}
	files, err := prepareRootfs(ctx, cfg, spec, st, l, shares.add)
	if err != nil {
		return nil, nil, nil, err
	}
	l.Shares = shares.list
	if l.Hypervisor == "qemu" {
		l.ShareSlots = shareClass(len(l.Shares), cfg.Shares)
	}
	handOver, err := prepareCgroup(ctx, o, spec, st, l, undo)
	if err != nil {
		for _, f := range files {
			f.Close()
		}
		return nil, nil, nil, err
	}
	return l, files, handOver, nil
}

// BaseLaunch is the part of a sandbox's launch that comes from the
// configuration alone: the VM's shape, guest artifacts and template store.
func BaseLaunch(o Options, id string) *shimapi.Launch {
	cfg := o.Config
	l := &shimapi.Launch{
		ID: id, StateDir: dirOf(o.Root, id), VMDir: vmDirOf(o.Root, id), Debug: o.Debug,
		Hypervisor: cfg.Hypervisor, Kernel: cfg.Kernel, Initrd: cfg.Initrd,
		Cmdline: cfg.KernelCmdline, VCPUs: cfg.VCPUs, MemoryMiB: cfg.MemoryMiB,
		Accel: cfg.Accel, TBSizeMiB: cfg.TBSizeMiB,
		WritableSize: int64(cfg.WritableMiB) << 20, PmemSize: int64(cfg.PmemMiB) << 20,
	}
	setBackend(l, cfg, cfg.Hypervisor, cfg.Templates == "on")
	return l
}

// setBackend sets the hypervisor, its binary and the template store.
func setBackend(l *shimapi.Launch, cfg config.Config, hypervisor string, templates bool) {
	l.Hypervisor, l.VMMBinary = hypervisor, cfg.QEMUBinary
	if hypervisor == "cloud-hypervisor" {
		l.VMMBinary = cfg.CloudHypervisorBinary
	}
	l.TemplateDir, l.MemDir = "", ""
	if templates {
		l.TemplateDir, l.MemDir = filepath.Join(cfg.DataDir, "templates"), cfg.MemDir
	}
}

// startShim starts `rund shim ID` with the container's stdio and waits for it
// to report the container ready (or an error).
func startShim(ctx context.Context, o CreateOptions, l *shimapi.Launch, files []*os.File, terminal bool) (*shimapi.Ready, *Proc, error) {
	b, err := json.Marshal(l)
	if err != nil {
		return nil, nil, fmt.Errorf("encoding launch: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(l.StateDir, shimapi.LaunchFile), b, 0o600); err != nil {
		return nil, nil, err
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, nil, fmt.Errorf("finding rund executable: %w", err)
	}
	args := []string{"--root", o.Root}
	if o.Debug {
		args = append(args, "--debug")
	}
	args = append(args, "shim", o.ID)
	cmd := exec.Command(exe, args...)
	cmd.Args[0] = "rund-shim"
	cmd.Env = append(os.Environ(), "RUND_SHIM=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if terminal {
		pty, err := newConsole(o.ConsoleSocket)
		if err != nil {
			return nil, nil, err
		}
		defer pty.Close()
		cmd.Stdin, cmd.Stdout, cmd.Stderr = pty, pty, pty
		cmd.SysProcAttr.Setctty = true
		cmd.SysProcAttr.Ctty = 0
	} else {
		cmd.Stdin, cmd.Stdout, cmd.Stderr = orStd(o.Stdin, os.Stdin), orStd(o.Stdout, os.Stdout), orStd(o.Stderr, os.Stderr)
	}
	syncR, syncW, err := os.Pipe()
	if err != nil {
		return nil, nil, fmt.Errorf("creating sync pipe: %w", err)
	}
	defer syncR.Close()
	cmd.ExtraFiles = append([]*os.File{syncW}, files...)
	if err := cmd.Start(); err != nil {
		syncW.Close()
		return nil, nil, fmt.Errorf("starting shim: %w", err)
	}
	syncW.Close()
	shim := NewProc(cmd.Process.Pid)
	// The shim outlives us; it is reparented to our parent's subreaper
	// (conmon) or to init. Do not wait for it.
	cmd.Process.Release()

	deadline := time.Duration(o.Config.BootTimeoutSeconds) * time.Second
	done := make(chan struct{})
	var msg []byte
	var rerr error
	go func() { msg, rerr = io.ReadAll(syncR); close(done) }()
	select {
	case <-done:
	case <-time.After(deadline):
		return nil, &shim, fmt.Errorf("sandbox not ready after %s (see %s)", deadline, filepath.Join(l.StateDir, shimapi.ShimLogFile))
	case <-ctx.Done():
		return nil, &shim, ctx.Err()
	}
	if rerr != nil {
		return nil, &shim, fmt.Errorf("reading from shim: %w", rerr)
	}
	var r shimapi.Ready
	if len(msg) == 0 {
		return nil, &shim, fmt.Errorf("shim exited before the sandbox was ready: %s", tailLog(filepath.Join(l.StateDir, shimapi.ShimLogFile)))
	}
	if err := json.Unmarshal(msg, &r); err != nil {
		return nil, &shim, fmt.Errorf("decoding shim status %q: %w", msg, err)
	}
	if r.Error != "" {
		return nil, &shim, errors.New(r.Error)
	}
	return &r, &shim, nil
}

func orStd(f, std *os.File) *os.File {
	if f != nil {
		return f
	}
	return std
}

// writePidFile writes pid in decimal, without a newline, atomically.
func writePidFile(path string, pid int) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return fmt.Errorf("pid file %s: %w", path, err)
	}
	return atomicfile.Write(abs, []byte(strconv.Itoa(pid)), 0o644)
}

// waitGone waits until p has exited, at most d.
func waitGone(p *Proc, d time.Duration) {
	end := time.Now().Add(d)
	for p.Alive() && time.Now().Before(end) {
		time.Sleep(5 * time.Millisecond)
	}
}

// tailLog returns the last line of a log file, for error messages.
func tailLog(path string) string {
	b, err := os.ReadFile(path)
	if err != nil || len(b) == 0 {
		return "no shim log"
	}
	lines := splitLines(string(b))
	return lines[len(lines)-1]
}
