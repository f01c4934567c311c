package guest

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rund-dev/rund/vm/agent/proto"
	"golang.org/x/sys/unix"
)

// agent is PID 1's state.
type agent struct {
	w       *proto.Writer
	reaper  *reaper
	zygotes *zygotePool

	// stage holds mounts made in advance by the warm-up (under mu).
	stage *stage

	capOnce  sync.Once
	capLastN int

	// blockCacheClean is set when the warm-up dropped every cached block
	// of the disks and nothing read them since: a clone of the template
	// then has nothing of its template's disks to forget.
	blockCacheClean atomic.Bool

	modulesDone chan struct{} // closed once loadModules has finished
	modulesErr  error         // set before modulesDone is closed
	modulesTime time.Duration
	bootTime    time.Duration

	mu sync.Mutex
	// ctr is the container, once Create has built its root.
	ctr *container
	// procs are the processes by stream, from Create/Exec until their Exit
	// was sent.
	procs map[uint32]*process
}

func newAgent() *agent {
	r := newReaper()
	return &agent{
		reaper:      r,
		zygotes:     newZygotePool(r),
		modulesDone: make(chan struct{}),
		procs:       make(map[uint32]*process),
	}
}

// serve reads frames from the channel forever.
func (a *agent) serve(port *os.File) {
	a.w = proto.NewWriter(port)
	r := proto.NewReader(portReader{port})
	for {
		f, err := r.Read()
		if err != nil {
			// A malformed frame: the stream cannot be resynchronised in
			// general, but a new session starts with a new Hello; keep going.
			consolef("rund-agent: reading frame: %v", err)
			continue
		}
		a.dispatch(f)
	}
}

// dispatch handles one host frame. Requests that may block (they wait on a
// process) run in their own goroutine; data frames are queued in order on
// their stream.
func (a *agent) dispatch(f proto.Frame) {
	switch f.Kind {
	case proto.KindStdin, proto.KindCloseStdin:
		a.mu.Lock()
		p := a.procs[f.Stream]
		a.mu.Unlock()
		if p == nil {
			return
		}
		if f.Kind == proto.KindCloseStdin {
			p.queueStdin(nil)
		} else if len(f.Payload) > 0 {
			p.queueStdin(f.Payload)
		}
	case proto.KindHello:
		var h proto.Hello
		if err := f.Decode(&h); err != nil {
			a.replyErr(f, err)
			return
		}
		r, err := a.hello(h)
		a.replyAndLog(f, r, err)
	case proto.KindCreate:
		var req proto.CreateRequest
		if err := f.Decode(&req); err != nil {
			a.replyErr(f, err)
			return
		}
		a.startProcess(f, req.Process, func(p *process) (proto.Reply, error) { return a.create(req, p) })
	case proto.KindStart:
		go func() { r, err := a.start(f.Stream); a.replyAndLog(f, r, err) }()
	case proto.KindExec:
		var req proto.ExecRequest
		if err := f.Decode(&req); err != nil {
			a.replyErr(f, err)
			return
		}
		a.startProcess(f, req.Process, a.exec)
	case proto.KindWarmup:
		var req proto.WarmupRequest
		if err := f.Decode(&req); err != nil {
			a.replyErr(f, err)
			return
		}
		go func() { r, err := a.warmup(req); a.reply(f, r, err) }()
	case proto.KindSignal:
		var req proto.SignalRequest
		a.decodeThen(f, &req, func() (proto.Reply, error) { return proto.Reply{}, a.signal(f.Stream, req) })
	case proto.KindResize:
		var req proto.ResizeRequest
		a.decodeThen(f, &req, func() (proto.Reply, error) { return proto.Reply{}, a.resize(f.Stream, req) })
	case proto.KindPs:
		a.reply(f, proto.Reply{Pids: a.containerPids()}, nil)
	case proto.KindPause:
		a.reply(f, proto.Reply{}, signalAll(unix.SIGSTOP))
	case proto.KindResume:
		a.reply(f, proto.Reply{}, signalAll(unix.SIGCONT))
	case proto.KindIomem:
		// The agent reads it as root of the first namespaces, so the
		// addresses are real (rund kernelpatch report).
		b, err := os.ReadFile("/proc/iomem")
		a.reply(f, proto.Reply{Info: string(b)}, err)
	case proto.KindShutdown:
		go a.shutdown(f)
	default:
		a.replyErr(f, fmt.Errorf("unknown frame kind %s", f.Kind))
	}
}

// startProcess registers the process of f's stream and runs run (create or
// exec) for it in the background, replying with its result; the helper it
// used is then replaced.
func (a *agent) startProcess(f proto.Frame, spec proto.Process, run func(*process) (proto.Reply, error)) {
	p, err := a.register(f.Stream, spec)
	if err != nil {
		a.replyErr(f, err)
		return
	}
	go func() {
		r, err := run(p)
		a.replyAndLog(f, r, err)
		a.zygotes.refill(a.logf)
	}()
}

// decodeThen decodes f's payload into v, runs fn and replies with its result.
func (a *agent) decodeThen(f proto.Frame, v any, fn func() (proto.Reply, error)) {
	if err := f.Decode(v); err != nil {
		a.replyErr(f, err)
		return
	}
	r, err := fn()
	a.reply(f, r, err)
}

// reply answers request f (requests with seq 0 expect no answer).
func (a *agent) reply(f proto.Frame, r proto.Reply, err error) {
	if err != nil {
		r = proto.Reply{Error: err.Error()}
	}
	if f.Seq == 0 {
		if err != nil {
			a.logf("%s: %v", f.Kind, err)
		}
		return
	}
	if werr := a.w.WriteJSON(proto.KindReply, f.Stream, f.Seq, r); werr != nil {
		consolef("rund-agent: replying to %s: %v", f.Kind, werr)
	}
}

func (a *agent) replyErr(f proto.Frame, err error) { a.reply(f, proto.Reply{}, err) }

// replyAndLog replies, then sends the host the reply's Info (where the
// request's time went) as a log frame. Not to the console: under TCG the
// serial console is slow enough to delay the next request.
func (a *agent) replyAndLog(f proto.Frame, r proto.Reply, err error) {
	a.reply(f, r, err)
	if err == nil && r.Info != "" {
		_ = a.w.Write(proto.Frame{Kind: proto.KindLog, Payload: []byte(f.Kind.String() + ": " + r.Info)})
	}
}

// logf sends a diagnostic to the host (and the console).
func (a *agent) logf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	consolef("rund-agent: %s", msg)
	if a.w != nil {
		_ = a.w.Write(proto.Frame{Kind: proto.KindLog, Payload: []byte(msg)})
	}
}

// hello takes the identity the host gives this (possibly cloned) VM.
func (a *agent) hello(h proto.Hello) (proto.Reply, error) {
	if h.Version != proto.Version {
		return proto.Reply{}, fmt.Errorf("protocol version %d, agent speaks %d", h.Version, proto.Version)
	}
	sp := newSteps()
	if h.TimeUnixNano != 0 {
		ts := unix.NsecToTimespec(h.TimeUnixNano)
		if err := unix.ClockSettime(unix.CLOCK_REALTIME, &ts); err != nil {
			return proto.Reply{}, fmt.Errorf("setting the clock: %w", err)
		}
	}
	sp.mark("clock")
	if len(h.Seed) > 0 {
		if err := addEntropy(h.Seed); err != nil {
			return proto.Reply{}, err
		}
	}
	sp.mark("rng")
	if h.Hostname != "" {
		if err := unix.Sethostname([]byte(h.Hostname)); err != nil {
			return proto.Reply{}, fmt.Errorf("setting hostname: %w", err)
		}
	}
	sp.mark("identity")
	// A clone's disks have other backing files than its template's: forget
	// whatever the template cached of them.
	if !a.blockCacheClean.Load() {
		flushBlockDevices()
		sp.mark("flush")
	}
	info := fmt.Sprintf("agent serving %v after start; hello %s", a.bootTime.Round(time.Millisecond), sp)
	return proto.Reply{Version: proto.Version, Info: info}, nil
}

// addEntropy mixes seed into the kernel RNG, credits it, and reseeds the
// CRNG from it at once: a clone's CRNG state is its template's (and its
// siblings'), and crediting alone reseeds it only on the kernel's schedule.
func addEntropy(seed []byte) error {
	fd, err := unix.Open("/dev/urandom", unix.O_WRONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("reseeding the RNG: %w", err)
	}
	defer unix.Close(fd)
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	buf := make([]byte, 8+(len(seed)+3)/4*4)
	binary.NativeEndian.PutUint32(buf[0:], uint32(len(seed)*8))
	binary.NativeEndian.PutUint32(buf[4:], uint32(len(seed)))
	copy(buf[8:], seed)
	if err := ioctlPtr(fd, unix.RNDADDENTROPY, &buf[0]); err != nil {
		return fmt.Errorf("reseeding the RNG: %w", err)
	}
	// ENODATA: the CRNG is not ready yet, and the credit just given makes
	// it reseed when it becomes so.
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.RNDRESEEDCRNG, 0); e != 0 && e != unix.ENODATA {
		return fmt.Errorf("reseeding the RNG: %w", e)
	}
	return nil
}

// flushBlockDevices drops the buffer cache of every virtio disk and pmem.
func flushBlockDevices() {
	for _, pat := range []string{"/dev/vd*", "/dev/pmem*"} {
		devs, _ := filepath.Glob(pat)
		for _, d := range devs {
			fd, err := unix.Open(d, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
			if err != nil {
				continue
			}
			_ = unix.IoctlSetInt(fd, unix.BLKFLSBUF, 0)
			unix.Close(fd)
		}
	}
}

// signal delivers a signal to a stream's process, or to every container
// process.
func (a *agent) signal(stream uint32, req proto.SignalRequest) error {
	if req.All {
		return signalAll(unix.Signal(req.Signal))
	}
	a.mu.Lock()
	p := a.procs[stream]
	a.mu.Unlock()
	if p == nil || p.pid == 0 {
		return fmt.Errorf("signal %d: no process on stream %d", req.Signal, stream)
	}
	if err := unix.Kill(p.pid, unix.Signal(req.Signal)); err != nil {
		return fmt.Errorf("signal %d to pid %d: %w", req.Signal, p.pid, err)
	}
	return nil
}

// signalAll signals every process but the agent (kernel threads ignore it).
func signalAll(sig unix.Signal) error {
	if err := unix.Kill(-1, sig); err != nil && err != unix.ESRCH {
		return fmt.Errorf("signal %d to all processes: %w", sig, err)
	}
	return nil
}

func (a *agent) resize(stream uint32, req proto.ResizeRequest) error {
	a.mu.Lock()
	p := a.procs[stream]
	a.mu.Unlock()
	if p == nil || p.stdio == nil || p.stdio.pty == nil {
		return fmt.Errorf("resize: no terminal on stream %d", stream)
	}
	return p.stdio.resize(req.Rows, req.Cols)
}

// containerPids lists every live process of the container: those in a PID
// namespace other than the agent's, but for idle helpers (zombies, already
// dead, are left out). The namespace test also leaves out a helper being
// started in the background, which is in the agent's namespace but not yet
// known to the pool.
func (a *agent) containerPids() []int {
	own, _ := os.Readlink("/proc/self/ns/pid")
	return userPids(func(pid int) bool {
		if a.zygotes.isZygote(pid) {
			return false
		}
		ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", pid))
		return err == nil && ns != own
	})
}

// userPids lists the live user processes but the agent that keep says yes to.
func userPids(keep func(pid int) bool) []int {
	ents, _ := os.ReadDir("/proc")
	pids := []int{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == 1 || !isContainerProcess(pid) || !keep(pid) {
			continue
		}
		pids = append(pids, pid)
	}
	return pids
}

// isContainerProcess reports whether pid is a live user process.
func isContainerProcess(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false // gone
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return false
	}
	// Fields after the command: state ppid pgrp session tty tpgid flags ...
	f := strings.Fields(s[i+1:])
	if len(f) < 7 || f[0] == "Z" || f[0] == "X" {
		return false
	}
	flags, _ := strconv.ParseUint(f[6], 10, 64)
	const pfKthread = 0x00200000
	return flags&pfKthread == 0
}

// killAll SIGKILLs every container process (and the idle helpers: no
// process is started after this) and waits, up to timeout, until they are
// gone.
func (a *agent) killAll(timeout time.Duration) {
	a.zygotes.close()
	deadline := time.Now().Add(timeout)
	all := func(int) bool { return true }
	for {
		// Again each round: a helper being started in the background
		// when the first signal went out is killed by a later one.
		_ = signalAll(unix.SIGKILL)
		if len(userPids(all)) == 0 || time.Now().After(deadline) {
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// shutdown kills every container process, unmounts, syncs and powers off.
func (a *agent) shutdown(f proto.Frame) {
	a.killAll(time.Second)
	a.mu.Lock()
	c := a.ctr
	a.mu.Unlock()
	if c != nil {
		if err := c.teardown(); err != nil {
			a.logf("shutdown: %v", err)
		}
	}
	unix.Sync()
	a.reply(f, proto.Reply{}, nil)
	powerOff()
}
