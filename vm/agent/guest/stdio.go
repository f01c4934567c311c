package guest

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/rund-dev/rund/vm/agent/proto"
	"golang.org/x/sys/unix"
)

// stdio is a process's standard streams: three pipes, or one terminal.
type stdio struct {
	// child holds the process's ends (fds 0, 1, 2), closed by the agent once
	// the process is started.
	child [3]*os.File
	// stdin is the agent's end of the process's input: the pipe's write end
	// or the terminal master.
	stdin *os.File
	// pty is the terminal master, nil with pipes.
	pty  *os.File
	outs []*output

	wg sync.WaitGroup
}

// output is one stream the agent reads from the process.
type output struct {
	f    *os.File
	kind proto.Kind
	raw  int // a dup of f's fd, read directly for what is left after a deadline
}

// newStdio makes pipes, or a terminal whose master comes from the ptmx
// device at ptmx (the container's devpts instance when it has one).
func newStdio(p proto.Process, ptmx string) (*stdio, error) {
	s := &stdio{}
	if p.Terminal {
		return s, s.openTerminal(ptmx, p.Rows, p.Cols)
	}
	var ends [3][2]*os.File
	for i := range ends {
		r, w, err := os.Pipe()
		if err != nil {
			s.closeAll()
			return nil, fmt.Errorf("making stdio pipes: %w", err)
		}
		ends[i] = [2]*os.File{r, w}
	}
	s.child = [3]*os.File{ends[0][0], ends[1][1], ends[2][1]}
	s.stdin = ends[0][1]
	s.outs = []*output{{f: ends[1][0], kind: proto.KindStdout}, {f: ends[2][0], kind: proto.KindStderr}}
	return s, s.dupOutputs()
}

func (s *stdio) openTerminal(ptmx string, rows, cols uint16) error {
	mfd, err := unix.Open(ptmx, unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening %s: %w", ptmx, err)
	}
	if err := unix.IoctlSetPointerInt(mfd, unix.TIOCSPTLCK, 0); err != nil {
		unix.Close(mfd)
		return fmt.Errorf("unlocking pty: %w", err)
	}
	sfd, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(mfd), unix.TIOCGPTPEER, uintptr(unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC))
	if errno != 0 {
		unix.Close(mfd)
		return fmt.Errorf("opening pty peer: %w", errno)
	}
	if rows > 0 || cols > 0 {
		_ = unix.IoctlSetWinsize(mfd, unix.TIOCSWINSZ, &unix.Winsize{Row: rows, Col: cols})
	}
	if err := unix.SetNonblock(mfd, true); err != nil {
		unix.Close(mfd)
		unix.Close(int(sfd))
		return fmt.Errorf("pty master: %w", err)
	}
	master := os.NewFile(uintptr(mfd), "ptmx")
	slave := os.NewFile(sfd, "pts")
	s.pty = master
	s.stdin = master
	s.child = [3]*os.File{slave, slave, slave}
	s.outs = []*output{{f: master, kind: proto.KindStdout}}
	return s.dupOutputs()
}

func (s *stdio) dupOutputs() error {
	for _, o := range s.outs {
		var derr error
		if err := withFd(o.f, func(fd int) {
			o.raw, derr = unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
		}); err != nil {
			derr = err
		}
		if derr != nil {
			s.closeAll()
			return fmt.Errorf("duplicating output fd: %w", derr)
		}
	}
	return nil
}

func withFd(f *os.File, fn func(int)) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	return rc.Control(func(fd uintptr) { fn(int(fd)) })
}

// childFds returns the fds the process gets as 0, 1 and 2. Fd() puts the
// child's ends in blocking mode, as a process expects its stdio.
func (s *stdio) childFds() []uintptr {
	return []uintptr{s.child[0].Fd(), s.child[1].Fd(), s.child[2].Fd()}
}

// closeChild closes the process's ends in the agent, so that EOF on the
// outputs means that every process holding them has closed them.
func (s *stdio) closeChild() {
	for i, f := range s.child {
		if f != nil && (i == 0 || f != s.child[i-1]) {
			f.Close()
		}
		s.child[i] = nil
	}
}

// relay copies every output to the host as data frames of stream.
func (s *stdio) relay(w *proto.Writer, stream uint32) {
	for _, o := range s.outs {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			o.copy(w, stream)
		}()
	}
}

func (o *output) copy(w *proto.Writer, stream uint32) {
	buf := make([]byte, 32<<10)
	for {
		n, err := o.f.Read(buf)
		if n > 0 {
			if werr := w.WriteData(o.kind, stream, buf[:n]); werr != nil {
				return
			}
		}
		if err == nil {
			continue
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			o.drainRaw(w, stream, buf)
		}
		// EOF, or EIO from a terminal master whose slave is closed.
		return
	}
}

// drainRaw sends what is buffered in the pipe at the time the drain deadline
// passed (the relay may have been busy writing to the host until then), but
// stops at a few MiB: a daemon may still be writing.
func (o *output) drainRaw(w *proto.Writer, stream uint32, buf []byte) {
	for total := 0; total < 4<<20; {
		n, err := unix.Read(o.raw, buf)
		if n <= 0 || err != nil {
			return
		}
		if w.WriteData(o.kind, stream, buf[:n]) != nil {
			return
		}
		total += n
	}
}

// drain waits for the outputs to reach EOF, giving up after grace (a
// daemonized grandchild may keep them open).
func (s *stdio) drain(grace time.Duration) {
	deadline := time.Now().Add(grace)
	for _, o := range s.outs {
		_ = o.f.SetReadDeadline(deadline)
	}
	s.wg.Wait()
}

func (s *stdio) resize(rows, cols uint16) error {
	var err error
	cerr := withFd(s.pty, func(fd int) {
		err = unix.IoctlSetWinsize(fd, unix.TIOCSWINSZ, &unix.Winsize{Row: rows, Col: cols})
	})
	if err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("resizing terminal: %w", err)
	}
	return nil
}

// closeAll closes every fd the agent holds for the process.
func (s *stdio) closeAll() {
	s.closeChild()
	if s.stdin != nil {
		s.stdin.Close()
	}
	for _, o := range s.outs {
		if o.f != nil && o.f != s.stdin {
			o.f.Close()
		}
		if o.raw > 0 {
			unix.Close(o.raw)
			o.raw = 0
		}
	}
}

// writeStdin feeds the process's input from q until nil (close) arrives.
// After a write error (the process closed its input) the rest is dropped.
func (s *stdio) writeStdin(q <-chan []byte) {
	broken := false
	for b := range q {
		if b == nil {
			if s.pty != nil {
				// A terminal has no half-close: send EOF (^D) instead.
				if !broken {
					_, _ = s.pty.Write([]byte{4})
				}
				continue
			}
			s.stdin.Close()
			broken = true
			continue
		}
		if broken {
			continue
		}
		if _, err := s.stdin.Write(b); err != nil {
			if !errors.Is(err, syscall.EPIPE) && !errors.Is(err, os.ErrClosed) {
				consolef("rund-agent: writing stdin: %v", err)
			}
			broken = true
		}
	}
}
