package guest

import (
	"os"
	"os/signal"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// reaper reaps every child of PID 1 (its own and every orphan in the VM) and
// hands the exit status of the ones it started to whoever waits for them.
type reaper struct {
	sig chan os.Signal

	mu      sync.Mutex
	waiters map[int]chan int
	// early holds the statuses of children no one waited for yet: a
	// process a helper forked with CLONE_PARENT can exit before the agent
	// learns its pid.
	early map[int]int
}

func newReaper() *reaper {
	r := &reaper{sig: make(chan os.Signal, 1), waiters: make(map[int]chan int), early: make(map[int]int)}
	signal.Notify(r.sig, unix.SIGCHLD)
	return r
}

func (r *reaper) run() {
	for range r.sig {
		r.reap()
	}
}

func (r *reaper) reap() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if err == unix.EINTR {
			continue
		}
		if pid <= 0 || err != nil {
			return
		}
		if ch, ok := r.waiters[pid]; ok {
			delete(r.waiters, pid)
			ch <- exitStatus(ws)
			continue
		}
		if len(r.early) >= 256 {
			clear(r.early) // orphans no one will ask for
		}
		r.early[pid] = exitStatus(ws)
	}
}

// adopt returns the channel that gets the exit status of pid, a child of the
// agent that it did not start itself (or has already exited).
func (r *reaper) adopt(pid int) <-chan int {
	r.mu.Lock()
	defer r.mu.Unlock()
	ch := make(chan int, 1)
	if st, ok := r.early[pid]; ok {
		delete(r.early, pid)
		ch <- st
		return ch
	}
	r.waiters[pid] = ch
	return ch
}

// start runs fork, which starts a process and returns its pid, so that the
// process cannot be reaped before its waiter is registered.
func (r *reaper) start(fork func() (int, error)) (int, <-chan int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	pid, err := fork()
	if err != nil {
		return 0, nil, err
	}
	ch := make(chan int, 1)
	r.waiters[pid] = ch
	return pid, ch, nil
}

// exitStatus is the exit code, or 128+N when killed by signal N.
func exitStatus(ws unix.WaitStatus) int {
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus()
}

func ioctlPtr[T any](fd int, req uint, p *T) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(unsafe.Pointer(p)))
	if errno != 0 {
		return errno
	}
	return nil
}
