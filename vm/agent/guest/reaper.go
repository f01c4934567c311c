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
}

func newReaper() *reaper {
	r := &reaper{sig: make(chan os.Signal, 1), waiters: make(map[int]chan int)}
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
		}
	}
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
