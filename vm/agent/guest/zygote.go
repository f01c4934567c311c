package guest

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// A zygote is a helper child started before it is needed: re-executed, its
// Go runtime up, blocked on its socket until the agent sends it a process to
// set up. Under TCG a clone translates every code path it runs afresh, and
// exec'ing the agent's binary and starting a Go runtime is most of what
// starting a process costs; zygotes started during the template's warm-up
// are part of the template's memory, so a clone's Create and first Exec only
// hand their request to a process that is already there.
//
// A zygote is not a container process until it is taken: ps leaves it out.
// A signal to every process may end idle zygotes, as it would end a helper
// started then; the pool skips dead ones.
//
// The container has its own PID namespace, whose PID 1 is its init process.
// A zygote for the init is started in a new PID namespace (it is PID 1 there
// and execs the init); a zygote for an exec stays in the agent's namespace
// until it is given its process, then joins the init's PID and mount
// namespaces and forks the program (with CLONE_PARENT: it becomes the
// agent's child) and exits. The pool holds zygotes of both kinds.
type zygote struct {
	pid    int
	newPID bool // in a PID namespace of its own: for a container's init
	exitCh <-chan int
	sock   *os.File      // the agent's end of the sync socket
	dec    *json.Decoder // childMsg lines from the zygote
}

// A template holds one zygote for the container's init and one for its
// first exec.
const (
	initZygotes = 1
	execZygotes = 1
)

// zygotePool holds the idle zygotes.
type zygotePool struct {
	reaper *reaper

	mu sync.Mutex
	// idle are ready zygotes, oldest first.
	idle []*zygote
	// pids are the pids of the idle zygotes and of those being started.
	pids map[int]bool
	// refilling is closed when the replacement being started (if any) is
	// idle or failed. Replacements are exec zygotes: a VM runs one init.
	refilling chan struct{}
	// closed is set once the container's init exited: no more refills.
	closed bool
}

func newZygotePool(r *reaper) *zygotePool {
	return &zygotePool{reaper: r, pids: make(map[int]bool)}
}

// isZygote reports whether pid is an idle (or starting) zygote.
func (zp *zygotePool) isZygote(pid int) bool {
	zp.mu.Lock()
	defer zp.mu.Unlock()
	return zp.pids[pid]
}

// take returns an idle zygote (waiting for one being started in the
// background, if any), or starts one when there is none, and marks it a
// container process.
func (zp *zygotePool) take(newPID bool) (z *zygote, fromPool bool, err error) {
	for {
		zp.mu.Lock()
		for i := 0; i < len(zp.idle); {
			z = zp.idle[i]
			if z.newPID != newPID {
				i++
				continue
			}
			zp.idle = append(zp.idle[:i:i], zp.idle[i+1:]...)
			delete(zp.pids, z.pid)
			if z.alive() {
				zp.mu.Unlock()
				return z, true, nil
			}
			z.sock.Close()
		}
		wait := zp.refilling
		zp.mu.Unlock()
		if wait == nil || newPID {
			break
		}
		<-wait
	}
	if z, err = zp.start(false, newPID); err != nil {
		return nil, false, err
	}
	zp.mu.Lock()
	delete(zp.pids, z.pid)
	zp.mu.Unlock()
	return z, false, nil
}

// fill starts zygotes until n of the kind are idle, and waits for them.
func (zp *zygotePool) fill(n int, newPID bool) error {
	for tries := 0; ; tries++ {
		zp.mu.Lock()
		have := 0
		for _, z := range zp.idle {
			if z.newPID == newPID {
				have++
			}
		}
		zp.mu.Unlock()
		if have >= n {
			return nil
		}
		if tries == 2*n {
			return fmt.Errorf("starting spare helpers: %d of %d up, the others died", have, n)
		}
		z, err := zp.start(false, newPID)
		if err != nil {
			return err
		}
		zp.put(z)
	}
}

// refill starts a replacement in the background when no zygote is left
// (a later exec then finds one). It runs at the lowest priority, so that
// it takes nothing from the container.
func (zp *zygotePool) refill(logf func(string, ...any)) {
	zp.mu.Lock()
	if zp.closed || zp.refilling != nil || slices.ContainsFunc(zp.idle, func(z *zygote) bool { return !z.newPID }) {
		zp.mu.Unlock()
		return
	}
	done := make(chan struct{})
	zp.refilling = done
	zp.mu.Unlock()
	go func() {
		z, err := zp.start(true, false)
		if err == nil {
			zp.put(z)
		}
		zp.mu.Lock()
		zp.refilling = nil
		closed := zp.closed
		zp.mu.Unlock()
		if err != nil && !closed {
			// Killed with every process once the container's init ended
			// is no failure.
			logf("starting a spare helper: %v", err)
		}
		close(done)
	}()
}

// close stops refills: the container is gone.
func (zp *zygotePool) close() {
	zp.mu.Lock()
	zp.closed = true
	zp.mu.Unlock()
}

// describe lists the idle zygotes' pids ("pid 40, pid 41").
func (zp *zygotePool) describe() string {
	zp.mu.Lock()
	defer zp.mu.Unlock()
	var s []string
	for _, z := range zp.idle {
		kind := "exec"
		if z.newPID {
			kind = "init"
		}
		s = append(s, fmt.Sprintf("pid %d (%s)", z.pid, kind))
	}
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, ", ")
}

func (zp *zygotePool) put(z *zygote) {
	zp.mu.Lock()
	defer zp.mu.Unlock()
	if !z.alive() {
		delete(zp.pids, z.pid)
		z.sock.Close()
		return
	}
	zp.idle = append(zp.idle, z)
}

// start re-executes the agent's binary as a zygote and waits until it is
// ready for a request. A niced zygote runs at the lowest priority until it
// is given a process. A newPID zygote is PID 1 of a new PID namespace.
func (zp *zygotePool) start(niced, newPID bool) (*zygote, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("making sync socket: %w", err)
	}
	null, err := unix.Open("/dev/null", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Close(fds[0])
		unix.Close(fds[1])
		return nil, fmt.Errorf("opening /dev/null: %w", err)
	}
	attr := &syscall.ProcAttr{
		Dir:   "/",
		Env:   []string{},
		Files: []uintptr{uintptr(null), uintptr(null), uintptr(null), uintptr(fds[1])},
		Sys:   &syscall.SysProcAttr{Setsid: true},
	}
	if newPID {
		attr.Sys.Cloneflags = unix.CLONE_NEWPID
	}
	pid, exitCh, err := zp.reaper.start(func() (int, error) {
		if niced {
			// The child inherits the nice value of the thread that forks.
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			_ = unix.Setpriority(unix.PRIO_PROCESS, 0, 19)
			defer unix.Setpriority(unix.PRIO_PROCESS, 0, 0)
		}
		pid, err := syscall.ForkExec("/proc/self/exe", []string{childArg0}, attr)
		if err == nil {
			zp.mu.Lock()
			zp.pids[pid] = true
			zp.mu.Unlock()
		}
		return pid, err
	})
	unix.Close(fds[1])
	unix.Close(null)
	if err != nil {
		unix.Close(fds[0])
		return nil, fmt.Errorf("starting helper: %w", err)
	}
	_ = unix.SetNonblock(fds[0], true)
	sock := os.NewFile(uintptr(fds[0]), "sync")
	z := &zygote{pid: pid, newPID: newPID, exitCh: exitCh, sock: sock, dec: json.NewDecoder(sock)}
	var msg childMsg
	if err := z.dec.Decode(&msg); err != nil || !msg.Idle {
		_ = unix.Kill(pid, unix.SIGKILL)
		sock.Close()
		zp.mu.Lock()
		delete(zp.pids, pid)
		zp.mu.Unlock()
		if err == nil {
			err = errors.New(msg.Error)
		}
		return nil, fmt.Errorf("starting helper: %w", err)
	}
	return z, nil
}

// alive reports whether the zygote has not exited (its status is then left
// for whoever waits on it).
func (z *zygote) alive() bool {
	select {
	case st := <-z.exitCh:
		ch := make(chan int, 1)
		ch <- st
		z.exitCh = ch
		return false
	default:
		return true
	}
}

// send hands the zygote its process: the config, and the process's stdin,
// stdout and stderr as fds.
func (z *zygote) send(cfg childConfig, stdio []uintptr) error {
	b, err := json.Marshal(cfg)
	if err != nil {
		return fmt.Errorf("encoding helper config: %w", err)
	}
	fds := make([]int, len(stdio))
	for i, fd := range stdio {
		fds[i] = int(fd)
	}
	var hdr [4]byte
	binary.BigEndian.PutUint32(hdr[:], uint32(len(b)))
	rc, err := z.sock.SyscallConn()
	if err != nil {
		return fmt.Errorf("sending config to helper: %w", err)
	}
	var serr error
	if err := rc.Write(func(fd uintptr) bool {
		serr = unix.Sendmsg(int(fd), hdr[:], unix.UnixRights(fds...), nil, 0)
		return !errors.Is(serr, unix.EAGAIN)
	}); err != nil {
		serr = err
	}
	if serr != nil {
		return fmt.Errorf("sending config to helper: %w", serr)
	}
	if _, err := z.sock.Write(b); err != nil {
		return fmt.Errorf("sending config to helper: %w", err)
	}
	return nil
}

// receiveConfig is the zygote's side of send: it reads the config, and
// installs the stdio fds as 0, 1 and 2.
func receiveConfig() (childConfig, error) {
	var cfg childConfig
	var hdr [4]byte
	oob := make([]byte, unix.CmsgSpace(3*4))
	var n, oobn int
	var err error
	for {
		n, oobn, _, _, err = unix.Recvmsg(childSockFd, hdr[:], oob, unix.MSG_CMSG_CLOEXEC)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		return cfg, fmt.Errorf("reading config: %w", err)
	}
	if n != len(hdr) {
		return cfg, fmt.Errorf("reading config: short header (%d bytes)", n)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		return cfg, fmt.Errorf("reading config: no stdio fds (%v)", err)
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 3 {
		return cfg, fmt.Errorf("reading config: %d stdio fds (%v)", len(fds), err)
	}
	for i, fd := range fds {
		if err := unix.Dup3(fd, i, 0); err != nil {
			return cfg, fmt.Errorf("installing stdio fd %d: %w", i, err)
		}
	}
	for _, fd := range fds {
		if fd > 2 {
			unix.Close(fd)
		}
	}
	b := make([]byte, binary.BigEndian.Uint32(hdr[:]))
	for off := 0; off < len(b); {
		n, err := unix.Read(childSockFd, b[off:])
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return cfg, fmt.Errorf("reading config: %w", err)
		}
		if n == 0 {
			return cfg, errors.New("reading config: the agent closed the socket")
		}
		off += n
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		return cfg, fmt.Errorf("decoding config: %w", err)
	}
	return cfg, nil
}
