// Package cloudhypervisor is rund's Cloud Hypervisor backend. It starts one
// cloud-hypervisor process per VM and drives it over its REST API on a unix
// socket (a small typed client of only the calls rund makes), restores clones
// from template snapshots whose RAM is a shared tmpfs file mapped
// copy-on-write by every clone, and reaches the guest agent over hybrid vsock.
//
// The VMM process belongs to whoever holds the Machine (the shim, or the
// template builder): Start and Restore kill it on failure, and the holder
// must call Shutdown, Kill or Wait.
package cloudhypervisor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rund-dev/rund/vm"
)

// Name is the backend's name in configuration and annotations.
const Name = "cloud-hypervisor"

// DefaultBinary is the VMM binary looked up on PATH when Backend.Binary is
// empty.
const DefaultBinary = "cloud-hypervisor"

// Timeouts applied when the caller's context has no deadline.
const (
	apiReadyTimeout = 10 * time.Second
	shutdownGrace   = 3 * time.Second
)

// Backend starts Cloud Hypervisor VMs. The zero value uses DefaultBinary.
type Backend struct {
	// Binary is the cloud-hypervisor executable (a name on PATH or a path).
	Binary string
	// Virtiofsd serves Config.Shares (default "virtiofsd" on PATH).
	Virtiofsd string
	// Verbosity is the number of -v flags (0: warnings only).
	Verbosity int
	// Env, when set, is the VMM's environment (default: rund's own).
	Env []string
}

var _ vm.Backend = (*Backend)(nil)

// New returns a backend that runs binary ("" for DefaultBinary).
func New(binary string) *Backend { return &Backend{Binary: binary} }

// Name is "cloud-hypervisor".
func (b *Backend) Name() string { return Name }

func (b *Backend) binary() string {
	if b.Binary == "" {
		return DefaultBinary
	}
	return b.Binary
}

// Version runs `cloud-hypervisor --version` and returns its answer, e.g.
// "cloud-hypervisor v42.0.0". Templates are keyed by it: a snapshot restores
// only into the same build.
func (b *Backend) Version(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, quickTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, b.binary(), "--version")
	cmd.Env = b.Env
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("running %s --version: %w", b.binary(), err)
	}
	v := strings.TrimSpace(string(out))
	if v == "" {
		return "", fmt.Errorf("%s --version printed nothing", b.binary())
	}
	return v, nil
}

// Start cold-boots a VM: it starts the VMM, waits for its API, then sends
// vm.create and vm.boot. The returned vm.Machine is a *Machine.
func (b *Backend) Start(ctx context.Context, cfg vm.Config) (vm.Machine, error) {
	p, err := vmmPaths(cfg.Dir)
	if err != nil {
		return nil, err
	}
	vmcfg, err := vmConfig(cfg, p)
	if err != nil {
		return nil, fmt.Errorf("configuring vm %s: %w", cfg.Name, err)
	}
	m, err := b.launch(ctx, cfg, p)
	if err != nil {
		return nil, fmt.Errorf("starting vm %s: %w", cfg.Name, err)
	}
	if err := m.boot(ctx, cfg, vmcfg); err != nil {
		m.kill()
		return nil, fmt.Errorf("starting vm %s: %w", cfg.Name, err)
	}
	return m, nil
}

func (m *Machine) boot(ctx context.Context, cfg vm.Config, vmcfg VMConfig) error {
	if err := m.startVirtiofsd(ctx, cfg.Shares, vmcfg.Fs); err != nil {
		return err
	}
	if err := m.api.CreateVM(ctx, vmcfg); err != nil {
		return m.explain(err)
	}
	if err := m.api.BootVM(ctx); err != nil {
		return m.explain(err)
	}
	return nil
}

// Machine is one cloud-hypervisor process and its VM.
type Machine struct {
	cmd     *exec.Cmd
	api     *Client
	paths   paths
	done    chan struct{}
	waitErr error // set before done is closed

	virtiofsd  string
	env        []string // for helpers, as for the VMM
	helpers    []helper // virtiofsd, one per share
	helperOnce sync.Once
}

var _ vm.Machine = (*Machine)(nil)

// launch starts the VMM process and waits until its API answers.
func (b *Backend) launch(ctx context.Context, cfg vm.Config, p paths) (*Machine, error) {
	if err := os.MkdirAll(p.dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating runtime directory: %w", err)
	}
	// Before v53 the VMM cannot bind over a stale socket, and a clone's
	// vsock socket must not exist when its snapshot is restored.
	for _, s := range []string{p.api, p.vsock} {
		if err := os.Remove(s); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("removing stale socket: %w", err)
		}
	}
	stderr, err := os.OpenFile(p.stderr, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening vmm output file: %w", err)
	}
	defer stderr.Close()
	args := []string{
		"--api-socket", "path=" + p.api,
		"--event-monitor", "path=" + p.events,
		"--log-file", p.log,
	}
	for range b.Verbosity {
		args = append(args, "-v")
	}
	// Not CommandContext: the VMM outlives the call that starts it.
	cmd := exec.Command(b.binary(), args...)
	cmd.Env = b.Env
	cmd.Stdout = stderr
	cmd.Stderr = stderr
	cmd.ExtraFiles = cfg.Files
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Keep terminal signals meant for the shim away from the VMM,
		// and take the VMM down if its owner dies.
		Setpgid:   true,
		Pdeathsig: syscall.SIGKILL,
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("executing %s: %w", b.binary(), err)
	}
	m := &Machine{cmd: cmd, paths: p, done: make(chan struct{}), virtiofsd: b.Virtiofsd, env: b.Env}
	m.api = NewClient(p.api)
	m.api.exited = m.done
	go func() {
		m.waitErr = cmd.Wait()
		close(m.done)
	}()
	if err := m.waitReady(ctx); err != nil {
		m.kill()
		return nil, err
	}
	return m, nil
}

// waitReady polls vmm.ping with backoff until it answers, the process exits,
// or ctx (by default apiReadyTimeout) runs out.
func (m *Machine) waitReady(ctx context.Context) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, apiReadyTimeout)
		defer cancel()
	}
	backoff := 2 * time.Millisecond
	var last error
	for {
		select {
		case <-m.done:
			return fmt.Errorf("waiting for cloud-hypervisor api: %w", m.exitError())
		default:
		}
		if _, err := os.Stat(m.paths.api); err == nil {
			_, last = m.api.Ping(ctx)
			if last == nil {
				return nil
			}
		} else {
			last = fmt.Errorf("api socket %s never appeared", m.paths.api)
		}
		select {
		case <-m.done:
			return fmt.Errorf("waiting for cloud-hypervisor api: %w", m.exitError())
		case <-ctx.Done():
			return fmt.Errorf("waiting for cloud-hypervisor api: %w: %w", ctx.Err(), last)
		case <-time.After(backoff):
		}
		if backoff < 100*time.Millisecond {
			backoff *= 2
		}
	}
}

// exitError describes a VMM that exited; it matches vm.ErrExited.
// Preconditions: m.done is closed.
func (m *Machine) exitError() error {
	return fmt.Errorf("%w: %w", vm.ErrExited, m.exitDetail())
}

// exitDetail is the exit status with the tail of what the VMM logged.
// Preconditions: m.done is closed.
func (m *Machine) exitDetail() error {
	status := "exited"
	if m.waitErr != nil {
		status = m.waitErr.Error()
	}
	msg := fmt.Sprintf("cloud-hypervisor (pid %d) %s", m.Pid(), status)
	for _, f := range []string{m.paths.stderr, m.paths.log} {
		if t := tail(f, 512); t != "" {
			msg += fmt.Sprintf("; %s: %s", filepath.Base(f), t)
		}
	}
	return errors.New(msg)
}

// explain adds the exit status and log tail to an error caused by the VMM's
// death; other errors pass unchanged.
func (m *Machine) explain(err error) error {
	var apiErr *APIError
	if err == nil || errors.As(err, &apiErr) || !errors.Is(err, vm.ErrExited) {
		return err
	}
	return fmt.Errorf("%w: %w", err, m.exitDetail())
}

// tail returns the last n bytes of a file, trimmed, on one line.
func tail(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Size() > n {
		_, _ = f.Seek(st.Size()-n, io.SeekStart)
	}
	b, _ := io.ReadAll(io.LimitReader(f, n))
	return strings.Join(strings.Fields(string(b)), " ")
}

// Pid is the VMM's process id.
func (m *Machine) Pid() int { return m.cmd.Process.Pid }

// API is the VMM's REST client, for the calls the vm.Machine interface does
// not name: hot-plug (AddDisk, AddPmem, AddFs, AddNet, AddVsock,
// RemoveDevice), Info, ShutdownVM and DeleteVM.
func (m *Machine) API() *Client { return m.api }

// VsockSocket is the host side of the guest's vsock device.
func (m *Machine) VsockSocket() string { return m.paths.vsock }

// EventsFile is where the VMM writes its event-monitor stream.
func (m *Machine) EventsFile() string { return m.paths.events }

// Dial connects to the guest agent on AgentPort over hybrid vsock, retrying
// until the agent listens, ctx is done, or the VMM exits.
func (m *Machine) Dial(ctx context.Context) (net.Conn, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-m.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	conn, err := DialVsock(ctx, m.paths.vsock, AgentPort)
	if err != nil {
		select {
		case <-m.done:
			return nil, fmt.Errorf("dialing guest agent: %w", m.exitError())
		default:
		}
		return nil, fmt.Errorf("dialing guest agent: %w", err)
	}
	return conn, nil
}

// Pause stops the vCPUs.
func (m *Machine) Pause(ctx context.Context) error {
	return m.explain(m.api.PauseVM(ctx))
}

// Resume restarts the vCPUs.
func (m *Machine) Resume(ctx context.Context) error {
	return m.explain(m.api.ResumeVM(ctx))
}

// Snapshot saves the paused VM into dir (which must exist and be empty):
// config.json, state.json and, unless all RAM is a shared file-backed zone,
// memory-ranges.
func (m *Machine) Snapshot(ctx context.Context, dir string) error {
	if err := m.api.SnapshotVM(ctx, dir); err != nil {
		return fmt.Errorf("snapshotting vm into %s: %w", dir, m.explain(err))
	}
	return nil
}

// Shutdown asks the VMM to exit (vmm.shutdown) and waits for the process; if
// it is still there when ctx is done (by default after a short grace), it is
// killed and the context's error returned.
func (m *Machine) Shutdown(ctx context.Context) error {
	select {
	case <-m.done:
		m.stopHelpers()
		return nil
	default:
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, shutdownGrace)
		defer cancel()
	}
	reqErr := m.api.ShutdownVMM(ctx)
	select {
	case <-m.done:
		m.stopHelpers()
		return nil
	case <-ctx.Done():
	}
	m.kill()
	if reqErr != nil {
		return fmt.Errorf("shutting down cloud-hypervisor: killed it: %w", reqErr)
	}
	return fmt.Errorf("shutting down cloud-hypervisor: killed it: %w", ctx.Err())
}

// Kill sends SIGKILL to the VMM (and its virtiofsd helpers) and waits for it.
func (m *Machine) Kill() error {
	m.kill()
	return nil
}

func (m *Machine) kill() {
	_ = m.cmd.Process.Signal(syscall.SIGKILL)
	<-m.done
	m.stopHelpers()
}

// Wait blocks until the VMM process exits and returns its exit error.
func (m *Machine) Wait() error {
	<-m.done
	m.stopHelpers()
	if m.waitErr != nil {
		return fmt.Errorf("cloud-hypervisor: %w", m.waitErr)
	}
	return nil
}

// Done is closed when the VMM process has exited.
func (m *Machine) Done() <-chan struct{} { return m.done }
