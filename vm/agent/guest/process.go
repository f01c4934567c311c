package guest

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"slices"
	"sync"
	"time"

	"github.com/rund-dev/rund/vm/agent/proto"
	"golang.org/x/sys/unix"
)

// process is a container process on one stream, from Create/Exec until its
// Exit is sent.
type process struct {
	stream uint32
	spec   proto.Process

	pid    int
	stdio  *stdio
	exitCh <-chan int

	// sock talks to the helper child: it sends childMsg lines; the agent
	// sends one byte to release it into exec.
	sock *os.File
	dec  *json.Decoder

	qmu     sync.Mutex
	qclosed bool
	stdinQ  chan []byte

	startOnce sync.Once
	startErr  error
}

// childConfig is what the agent sends the helper child.
type childConfig struct {
	Root    string        `json:"root"`
	Process proto.Process `json:"process"`
	// CapLast is the highest capability the kernel knows.
	CapLast int `json:"capLast"`
	// InitPid is, for an exec, the container's init (its pid in the agent's
	// namespace): the process joins its PID and mount namespaces. Zero for
	// the init itself, which is PID 1 of its zygote's PID namespace.
	InitPid int `json:"initPid,omitempty"`
	// Masked and Readonly are the spec's paths, for the init: it mounts
	// its namespace's proc over each proc mount and applies those under it.
	Masked   []string `json:"masked,omitempty"`
	Readonly []string `json:"readonly,omitempty"`
	// ProcMounts are where the root has proc filesystems (the spec's proc
	// mounts' destinations, cleaned), for the init.
	ProcMounts []string `json:"procMounts,omitempty"`
}

// procMounts lists the destinations of the proc mounts, cleaned, once each.
func procMounts(mounts []proto.Mount) []string {
	var out []string
	for _, m := range mounts {
		d := path.Clean("/" + m.Destination)
		if m.Type == "proc" && !slices.Contains(out, d) {
			out = append(out, d)
		}
	}
	return out
}

// childMsg is what the helper child sends back: Ready once it is set up and
// blocked, or Error.
type childMsg struct {
	Ready bool   `json:"ready,omitempty"`
	Error string `json:"error,omitempty"`
	// Idle is the first message of a zygote: it is up and waits for a
	// config.
	Idle bool `json:"idle,omitempty"`
	// Info says how long the setup steps took, for the debug log.
	Info string `json:"info,omitempty"`
	// Pid is the process an exec's helper forked (in the agent's PID
	// namespace), sent once it has exec'd; the helper then exits.
	Pid int `json:"pid,omitempty"`
}

// register reserves a stream for a new process. Stdin frames that arrive
// before the process is started are queued.
func (a *agent) register(stream uint32, spec proto.Process) (*process, error) {
	if len(spec.Args) == 0 {
		return nil, errors.New("process has no args")
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, ok := a.procs[stream]; ok {
		return nil, fmt.Errorf("stream %d is in use", stream)
	}
	p := &process{stream: stream, spec: spec, stdinQ: make(chan []byte, 256)}
	a.procs[stream] = p
	return p, nil
}

func (a *agent) unregister(p *process) {
	a.mu.Lock()
	if a.procs[p.stream] == p {
		delete(a.procs, p.stream)
	}
	a.mu.Unlock()
	p.closeStdinQueue()
}

// queueStdin queues input for the process; nil closes its stdin.
func (p *process) queueStdin(b []byte) {
	p.qmu.Lock()
	defer p.qmu.Unlock()
	if p.qclosed {
		return
	}
	p.stdinQ <- b
}

func (p *process) closeStdinQueue() {
	p.qmu.Lock()
	defer p.qmu.Unlock()
	if !p.qclosed {
		p.qclosed = true
		close(p.stdinQ)
	}
}

// spawn gives p to a helper child in the container root, and returns once
// the child is set up and blocked before exec. The helper is a zygote from
// the pool when there is one (see zygote.go), else one started now.
//
// cfg gives the root and, for an exec, the init's pid; spawn sets the rest.
func (a *agent) spawn(p *process, cfg childConfig, sp *steps) error {
	root := cfg.Root
	st, err := newStdio(p.spec, ptmxFor(root))
	if err != nil {
		return err
	}
	sp.mark("stdio")
	z, pooled, err := a.zygotes.take(cfg.InitPid == 0)
	if err != nil {
		st.closeAll()
		return err
	}
	if pooled {
		sp.mark(fmt.Sprintf("helper %d from the pool", z.pid))
	} else {
		sp.mark(fmt.Sprintf("helper %d started", z.pid))
	}
	cfg.Process, cfg.CapLast = p.spec, a.capLast()
	serr := z.send(cfg, st.childFds())
	st.closeChild()
	p.pid, p.stdio, p.exitCh, p.sock, p.dec = z.pid, st, z.exitCh, z.sock, z.dec
	st.relay(a.w, p.stream)
	go st.writeStdin(p.stdinQ)
	if serr != nil {
		return p.failed(serr)
	}
	var msg childMsg
	if err := p.dec.Decode(&msg); err != nil {
		return p.failed(p.helperDied(err))
	}
	if msg.Error != "" {
		return p.failed(errors.New(msg.Error))
	}
	sp.mark("helper ready")
	sp.note("helper: %s", msg.Info)
	return nil
}

// helperDied describes a helper that closed its socket unexpectedly.
func (p *process) helperDied(err error) error {
	if !errors.Is(err, io.EOF) {
		return fmt.Errorf("reading from helper: %w", err)
	}
	select {
	case st := <-p.exitCh:
		return fmt.Errorf("container process setup: helper exited with status %d", st)
	case <-time.After(time.Second):
		return errors.New("container process setup: helper closed its channel")
	}
}

// failed cleans up after a helper that did not get ready.
func (p *process) failed(err error) error {
	_ = unix.Kill(p.pid, unix.SIGKILL)
	p.sock.Close()
	p.stdio.drain(100 * time.Millisecond)
	p.stdio.closeAll()
	return err
}

// release lets the helper exec and waits for the outcome. An exec's helper
// forks the program and reports its pid, which p then stands for.
func (p *process) release(r *reaper) error {
	p.startOnce.Do(func() {
		defer p.sock.Close()
		if _, err := p.sock.Write([]byte{1}); err != nil {
			// The helper is gone (killed before start): its Exit follows.
			return
		}
		var msg childMsg
		err := p.dec.Decode(&msg)
		switch {
		case errors.Is(err, io.EOF):
			// The socket is close-on-exec: EOF means exec happened.
		case err != nil:
			p.startErr = fmt.Errorf("reading from helper: %w", err)
		case msg.Error != "":
			p.startErr = errors.New(msg.Error)
		case msg.Pid > 0:
			p.pid, p.exitCh = msg.Pid, r.adopt(msg.Pid)
		}
	})
	return p.startErr
}

// watch waits for the process to exit, drains its output and reports Exit.
func (a *agent) watch(p *process) {
	status := <-p.exitCh
	if p.stream == proto.InitStream {
		// As with a PID namespace: when the container's init exits, every
		// other container process is killed.
		a.killAll(time.Second)
		dropPidnsStage(p.pid)
		a.mu.Lock()
		if a.ctr != nil {
			a.ctr.initExited = true
		}
		a.mu.Unlock()
	}
	p.stdio.drain(time.Second)
	p.closeStdinQueue()
	p.stdio.closeAll()
	a.unregister(p)
	if err := a.w.WriteJSON(proto.KindExit, p.stream, 0, proto.ExitMessage{Status: status}); err != nil {
		consolef("rund-agent: sending exit of stream %d: %v", p.stream, err)
	}
}

// dropPidnsStage detaches what an init's helper staged (see stageOwnProc):
// its copy of the agent's mount namespace took the proc, the agent's holds
// the rest.
func dropPidnsStage(helperPid int) {
	dir := pidnsStage(helperPid)
	if err := unix.Unmount(dir, unix.MNT_DETACH); err == nil {
		_ = os.Remove(dir)
	}
}

// create builds the container and starts its init process, held before exec.
func (a *agent) create(req proto.CreateRequest, p *process) (proto.Reply, error) {
	<-a.modulesDone
	a.mu.Lock()
	if a.ctr != nil {
		a.mu.Unlock()
		a.unregister(p)
		return proto.Reply{}, fmt.Errorf("create %s: container %s already exists", req.ID, a.ctr.id)
	}
	a.mu.Unlock()
	sp := newSteps()
	a.blockCacheClean.Store(false)
	a.mu.Lock()
	st := a.stage
	a.stage = nil
	a.mu.Unlock()
	c, err := buildContainer(req, st, a.logf, sp)
	if err != nil {
		a.unregister(p)
		if a.modulesErr != nil {
			err = fmt.Errorf("%w (%v)", err, a.modulesErr)
		}
		return proto.Reply{}, fmt.Errorf("create %s: %w", req.ID, err)
	}
	cfg := childConfig{Root: c.root, Masked: req.MaskedPaths, Readonly: req.ReadonlyPaths, ProcMounts: procMounts(req.Mounts)}
	if err := a.spawn(p, cfg, sp); err != nil {
		a.unregister(p)
		if terr := c.teardown(); terr != nil {
			a.logf("create %s: %v", req.ID, terr)
		}
		return proto.Reply{}, fmt.Errorf("create %s: %w", req.ID, err)
	}
	c.initPid = p.pid
	a.mu.Lock()
	a.ctr = c
	a.mu.Unlock()
	go a.watch(p)
	return proto.Reply{Pid: p.pid, Info: sp.String()}, nil
}

// start releases the init process into exec.
func (a *agent) start(stream uint32) (proto.Reply, error) {
	a.mu.Lock()
	p := a.procs[stream]
	a.mu.Unlock()
	if p == nil || p.sock == nil {
		return proto.Reply{}, fmt.Errorf("start: no created process on stream %d", stream)
	}
	sp := newSteps()
	if err := p.release(a.reaper); err != nil {
		return proto.Reply{}, fmt.Errorf("start: %w", err)
	}
	return proto.Reply{Info: sp.String()}, nil
}

// exec runs another process in the container, at once.
func (a *agent) exec(p *process) (proto.Reply, error) {
	a.mu.Lock()
	c := a.ctr
	exited := c != nil && c.initExited
	a.mu.Unlock()
	if c == nil {
		a.unregister(p)
		return proto.Reply{}, errors.New("exec: no container")
	}
	if exited {
		a.unregister(p)
		return proto.Reply{}, errors.New("exec: the container's init process has exited")
	}
	sp := newSteps()
	if err := a.spawn(p, childConfig{Root: c.root, InitPid: c.initPid}, sp); err != nil {
		a.unregister(p)
		return proto.Reply{}, fmt.Errorf("exec: %w", err)
	}
	// The helper forks the program: p is that process once released (or
	// the helper, which exits, when that failed).
	err := p.release(a.reaper)
	go a.watch(p)
	if err != nil {
		return proto.Reply{}, fmt.Errorf("exec: %w", err)
	}
	sp.mark("exec")
	return proto.Reply{Pid: p.pid, Info: sp.String()}, nil
}

// capLast is the highest capability number the kernel knows (read once:
// a clone runs its template's kernel).
func (a *agent) capLast() int {
	a.capOnce.Do(func() { a.capLastN = readCapLast() })
	return a.capLastN
}

func readCapLast() int {
	b, err := os.ReadFile("/proc/sys/kernel/cap_last_cap")
	if err != nil {
		return lastKnownCap
	}
	n := 0
	for _, c := range b {
		if c >= '0' && c <= '9' {
			n = n*10 + int(c-'0')
		}
	}
	return n
}
