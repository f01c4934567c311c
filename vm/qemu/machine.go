package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rund-dev/rund/vm"
)

// Files QEMU's runtime directory holds.
const (
	agentSocketName = "agent.sock"
	logName         = "qemu.log" // QEMU's stdout and stderr
)

// maxSocketPath is the longest path a unix socket address holds.
const maxSocketPath = len(unix.RawSockaddrUnix{}.Path) - 1

// Machine is a running QEMU process. It implements vm.Machine.
type Machine struct {
	cfg      vm.Config // as started, without Files
	firmware string
	cmd      *exec.Cmd
	qmp      *qmpClient
	logPath  string

	agentPath string
	agentLn   *net.UnixListener
	agent     chan net.Conn // receives QEMU's connection to the agent socket
	dialed    atomic.Bool

	exited   chan struct{} // closed once the process is reaped
	waitErr  error         // set before exited is closed
	quitting atomic.Bool   // Shutdown asked QEMU to go: its exit is expected

	mu sync.Mutex
	// sharedSnapshot is set once the VM's shared RAM has been saved as a
	// template: running it again would change the template's memory.
	sharedSnapshot bool
	memShared      bool
}

var _ vm.Machine = (*Machine)(nil)

// Start cold-boots a VM from cfg's kernel and initrd. An empty cfg.Accel
// means DetectAccel's choice.
func (b *Backend) Start(ctx context.Context, cfg vm.Config) (vm.Machine, error) {
	m, err := b.start(ctx, cfg, false, nil)
	if err != nil {
		return nil, fmt.Errorf("starting vm %q: %w", cfg.Name, err)
	}
	return m, nil
}

// start execs QEMU for cfg and connects QMP. For a clone (incoming) it passes
// extra as one more inherited file, at descriptor extraFD(cfg). On error
// nothing is left running.
func (b *Backend) start(ctx context.Context, cfg vm.Config, incoming bool, extra *os.File) (*Machine, error) {
	if cfg.Accel == "" {
		cfg.Accel, _ = DetectAccel()
	}
	if err := validate(&cfg); err != nil {
		return nil, err
	}
	bin, err := b.lookPath()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating runtime directory: %w", err)
	}
	m := &Machine{
		logPath:   filepath.Join(cfg.Dir, logName),
		agentPath: filepath.Join(cfg.Dir, agentSocketName),
		agent:     make(chan net.Conn, 1),
		exited:    make(chan struct{}),
		memShared: cfg.MemShared && !incoming && cfg.MemPath != "",
		firmware:  b.firmware,
	}
	m.cfg = cfg
	m.cfg.Files = nil
	if len(m.agentPath) > maxSocketPath {
		return nil, fmt.Errorf("agent socket path %s: longer than %d bytes", m.agentPath, maxSocketPath)
	}
	var undo []func()
	defer func() {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
	}()

	// The agent socket listens before QEMU starts, so QEMU's connect
	// succeeds during startup.
	if err := os.Remove(m.agentPath); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("removing stale agent socket: %w", err)
	}
	m.agentLn, err = net.ListenUnix("unix", &net.UnixAddr{Name: m.agentPath, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listening for the agent channel: %w", err)
	}
	m.agentLn.SetUnlinkOnClose(true)
	undo = append(undo, func() { m.agentLn.Close() })

	// QMP runs over a socket pair: QEMU inherits one end as an already
	// connected chardev, so there is no socket file to wait for.
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("creating qmp socket pair: %w", err)
	}
	hostEnd := os.NewFile(uintptr(fds[0]), "qmp")
	qemuEnd := os.NewFile(uintptr(fds[1]), "qmp-qemu")
	defer qemuEnd.Close()
	fc, err := net.FileConn(hostEnd)
	hostEnd.Close()
	if err != nil {
		return nil, fmt.Errorf("qmp socket: %w", err)
	}
	qmpConn := fc.(*net.UnixConn)
	undo = append(undo, func() { qmpConn.Close() })

	files := append(append([]*os.File(nil), cfg.Files...), qemuEnd)
	l := launch{
		cfg:       cfg,
		firmware:  b.firmware,
		qmpFD:     2 + len(files),
		agentPath: m.agentPath,
		incoming:  incoming,
		kernel:    !incoming || cloneLoadsKernel,
	}
	if extra != nil {
		files = append(files, extra)
	}
	logf, err := os.OpenFile(m.logPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("creating qemu log: %w", err)
	}
	defer logf.Close()

	m.cmd = &exec.Cmd{
		Path:       bin,
		Args:       append([]string{bin}, l.args()...),
		Stdout:     logf,
		Stderr:     logf,
		ExtraFiles: files,
		Env:        qemuEnv(),
		// Its own process group: a terminal's ^C reaches the owner, which
		// decides what happens to the VM.
		SysProcAttr: &syscall.SysProcAttr{Setpgid: true},
	}
	if err := startNoTHP(m.cmd, disableTHP && (cfg.Accel == "tcg" || cfg.MemPath != "")); err != nil {
		return nil, fmt.Errorf("executing %s: %w", bin, err)
	}
	// Only QEMU may hold its end: QMP then sees EOF when QEMU exits.
	qemuEnd.Close()
	go m.reap()
	undo = append(undo, func() {
		m.cmd.Process.Kill()
		<-m.exited
		select {
		case c := <-m.agent:
			c.Close()
		default:
		}
	})
	go m.acceptAgent()

	m.qmp, err = newQMP(ctx, qmpConn)
	if err != nil {
		return nil, m.exitedErr(err)
	}
	undo = nil
	return m, nil
}

// extraFD is the descriptor by which QEMU inherits start's extra file: after
// cfg.Files and the QMP socket.
func extraFD(cfg *vm.Config) int { return 3 + len(cfg.Files) + 1 }

// Knobs the memory measurements turn; see measure_test.go.
var (
	// mallocArenaMax, when set, limits glibc's malloc arenas in QEMU. The
	// measurements showed no gain for an idle 1-vCPU clone, so it is off.
	mallocArenaMax = 0
	// cloneLoadsKernel passes -kernel/-initrd to clones too. QEMU reads
	// both into its heap for fw_cfg, which a restored guest never uses.
	cloneLoadsKernel = false
	// disableTHP starts QEMU without transparent huge pages (startNoTHP)
	// under TCG or with file-backed RAM; KVM guests on anonymous RAM keep
	// them for speed.
	disableTHP = true
)

// qemuEnv is QEMU's environment: the caller's, plus mallocArenaMax.
func qemuEnv() []string {
	env := os.Environ()
	if mallocArenaMax > 0 {
		env = append(env, "MALLOC_ARENA_MAX="+strconv.Itoa(mallocArenaMax))
	}
	return env
}

// thpMu serialises startNoTHP's changes to this process's THP setting.
var thpMu sync.Mutex

// startNoTHP starts cmd, with transparent huge pages disabled in the new
// process when noTHP is set. QEMU asks for huge pages for its TCG
// translation buffer, where a few KiB of code then pin 2 MiB pages: measured
// ~3 MiB more private memory per idle clone. The setting is inherited across
// fork and exec, so it is set on this process around the fork; it changes
// nothing else here for that instant.
func startNoTHP(cmd *exec.Cmd, noTHP bool) error {
	if noTHP {
		thpMu.Lock()
		defer thpMu.Unlock()
		// Only when it is not disabled already, and undone after the fork.
		if was, err := unix.PrctlRetInt(unix.PR_GET_THP_DISABLE, 0, 0, 0, 0); err == nil && was == 0 {
			if err := unix.Prctl(unix.PR_SET_THP_DISABLE, 1, 0, 0, 0); err == nil {
				defer unix.Prctl(unix.PR_SET_THP_DISABLE, 0, 0, 0, 0)
			}
		}
	}
	return startWithoutMknod(cmd)
}

// dropMknod, when set, starts QEMU without CAP_MKNOD (see
// startWithoutMknod).
var dropMknod = true

// startWithoutMknod starts cmd without CAP_MKNOD in its capability bounding
// set, so that QEMU, running as root, can never create a device node: a
// guest asking its 9p server to mknod a block device in a shared host
// directory gets EPERM instead of a node on the host. (runc's device cgroup
// refuses such a mknod the same way.) The bounding set is per thread and
// inherited by a child, so it is dropped on a locked thread that forks
// QEMU and is then discarded (a goroutine that exits locked takes its
// thread with it). Without CAP_SETPCAP (not root) it starts cmd as is.
func startWithoutMknod(cmd *exec.Cmd) error {
	if !dropMknod {
		return cmd.Start()
	}
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, unix.CAP_MKNOD, 0, 0, 0); err != nil {
			runtime.UnlockOSThread() // unchanged: the thread can stay
		}
		done <- cmd.Start()
	}()
	return <-done
}

// reap waits for QEMU and records how it ended.
func (m *Machine) reap() {
	err := m.cmd.Wait()
	if err != nil && m.quitting.Load() {
		err = nil
	}
	if err != nil {
		err = fmt.Errorf("qemu (pid %d): %w", m.cmd.Process.Pid, err)
	}
	m.waitErr = err
	// Nothing will connect any more: stop accepting.
	m.agentLn.Close()
	close(m.exited)
}

// acceptAgent waits for QEMU to connect the agent port, and stops listening
// once it has. Connections from any other process are refused.
func (m *Machine) acceptAgent() {
	defer m.agentLn.Close()
	for {
		c, err := m.agentLn.AcceptUnix()
		if err != nil {
			return
		}
		if peerPid(c) == m.cmd.Process.Pid {
			m.agent <- c
			return
		}
		c.Close()
	}
}

// peerPid returns the pid of the process at the other end of c, or -1.
func peerPid(c *net.UnixConn) int {
	raw, err := c.SyscallConn()
	if err != nil {
		return -1
	}
	pid := -1
	raw.Control(func(fd uintptr) {
		if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
			pid = int(cred.Pid)
		}
	})
	return pid
}

// qemuVersion is the running QEMU's version, in Backend.Version's format.
func (m *Machine) qemuVersion() string {
	v := m.qmp.greeting.Version
	s := fmt.Sprintf("%d.%d.%d", v.QEMU.Major, v.QEMU.Minor, v.QEMU.Micro)
	if v.Package != "" {
		s += " (" + v.Package + ")"
	}
	return s
}

// Pid returns QEMU's process id.
func (m *Machine) Pid() int { return m.cmd.Process.Pid }

// Dial returns the guest channel: the agent port's host end. It fails with
// vm.ErrExited as soon as QEMU exits. It may be called once.
func (m *Machine) Dial(ctx context.Context) (net.Conn, error) {
	if m.dialed.Swap(true) {
		return nil, errors.New("dialing the guest channel: already dialed")
	}
	select {
	case <-m.exited:
		return nil, fmt.Errorf("dialing the guest channel: %w", vm.ErrExited)
	default:
	}
	select {
	case c := <-m.agent:
		return c, nil
	case <-m.exited:
		return nil, fmt.Errorf("dialing the guest channel: %w", vm.ErrExited)
	case <-ctx.Done():
		m.dialed.Store(false)
		return nil, fmt.Errorf("dialing the guest channel: %w", ctx.Err())
	}
}

// Pause stops the vCPUs and returns once QEMU reports them stopped.
func (m *Machine) Pause(ctx context.Context) error {
	if err := m.runstate(ctx, "stop", "STOP", false); err != nil {
		return fmt.Errorf("pausing vm: %w", err)
	}
	return nil
}

// Resume starts the vCPUs again and returns once QEMU reports them running.
// A VM whose shared memory was saved as a template cannot resume: it would
// change the template's memory under its clones.
func (m *Machine) Resume(ctx context.Context) error {
	m.mu.Lock()
	saved := m.sharedSnapshot
	m.mu.Unlock()
	if saved {
		return errors.New("resuming vm: its memory is a saved template's")
	}
	if err := m.runstate(ctx, "cont", "RESUME", true); err != nil {
		return fmt.Errorf("resuming vm: %w", err)
	}
	return nil
}

// runstate issues cmd unless the VM already runs (or not) as wanted, and
// waits for event.
func (m *Machine) runstate(ctx context.Context, cmd, event string, running bool) error {
	st, err := m.qmp.queryStatus(ctx)
	if err != nil {
		return m.exitedErr(err)
	}
	if st.Running == running {
		return nil
	}
	sub := m.qmp.subscribe()
	defer sub.cancel()
	if err := m.qmp.execute(ctx, cmd, nil, nil); err != nil {
		return m.exitedErr(err)
	}
	if _, err := sub.wait(ctx, eventNamed(event)); err != nil {
		return m.exitedErr(fmt.Errorf("waiting for %s: %w", event, err))
	}
	return nil
}

// Shutdown asks QEMU to quit, kills it if it has not exited when ctx is done,
// and returns once it is reaped. It returns nil whenever the process is gone.
func (m *Machine) Shutdown(ctx context.Context) error {
	m.quitting.Store(true)
	select {
	case <-m.exited:
	default:
		// quit's reply may never come if QEMU exits first; the exit is
		// what counts.
		go m.qmp.execute(ctx, "quit", nil, nil)
		select {
		case <-m.exited:
		case <-ctx.Done():
			m.cmd.Process.Kill()
			<-m.exited
		}
	}
	m.close()
	return nil
}

// Wait blocks until QEMU exits. It returns nil when QEMU exited with status 0
// or because Shutdown asked it to.
func (m *Machine) Wait() error {
	<-m.exited
	m.close()
	return m.waitErr
}

// kill ends QEMU at once and reaps it.
func (m *Machine) kill() {
	m.quitting.Store(true)
	m.cmd.Process.Kill()
	<-m.exited
	m.close()
}

// close releases the host side of a VM whose process is gone.
func (m *Machine) close() {
	m.qmp.Close()
	m.agentLn.Close()
	select {
	case c := <-m.agent: // accepted but never dialed
		c.Close()
	default:
	}
}

// exitedErr turns err into one wrapping vm.ErrExited, with the end of QEMU's
// log, when QEMU has exited (or is exiting: its QMP socket closed).
func (m *Machine) exitedErr(err error) error {
	if !errors.Is(err, errQMPClosed) {
		select {
		case <-m.exited:
		default:
			return err
		}
	}
	// QEMU closes QMP only as it exits; give it time to finish.
	select {
	case <-m.exited:
	case <-time.After(cleanupTimeout):
		m.cmd.Process.Kill()
		<-m.exited
	}
	if tail := m.logTail(); tail != "" {
		return fmt.Errorf("%w: %w: %s", vm.ErrExited, err, tail)
	}
	return fmt.Errorf("%w: %w", vm.ErrExited, err)
}

// logTail returns the last lines QEMU wrote, for error messages.
func (m *Machine) logTail() string {
	f, err := os.Open(m.logPath)
	if err != nil {
		return ""
	}
	defer f.Close()
	const max = 1024
	if fi, err := f.Stat(); err == nil && fi.Size() > max {
		f.Seek(fi.Size()-max, io.SeekStart)
	}
	b, _ := io.ReadAll(io.LimitReader(f, max))
	return string(bytes.TrimSpace(b))
}
