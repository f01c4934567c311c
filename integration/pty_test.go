//go:build integration

package integration

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// ptyCmd is a command whose stdio is the slave of a pty we hold the master of.
type ptyCmd struct {
	t      *testing.T
	master *os.File
	cmd    *exec.Cmd
	mu     sync.Mutex
	out    bytes.Buffer
	read   chan struct{} // closed when the master reads EOF or EIO
}

// openPty opens a new pty pair.
func openPty() (master, slave *os.File, err error) {
	master, err = os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	if err := unix.IoctlSetPointerInt(int(master.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		master.Close()
		return nil, nil, err
	}
	n, err := unix.IoctlGetInt(int(master.Fd()), unix.TIOCGPTN)
	if err != nil {
		master.Close()
		return nil, nil, err
	}
	slave, err = os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		master.Close()
		return nil, nil, err
	}
	return master, slave, nil
}

// startOnPty starts c as a session leader whose controlling terminal is a
// new pty of rows x cols.
func startOnPty(t *testing.T, rows, cols uint16, c *exec.Cmd) *ptyCmd {
	t.Helper()
	master, slave, err := openPty()
	if err != nil {
		t.Fatalf("opening a pty: %v", err)
	}
	if err := unix.IoctlSetWinsize(int(slave.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: rows, Col: cols}); err != nil {
		t.Fatalf("sizing the pty: %v", err)
	}
	c.Stdin, c.Stdout, c.Stderr = slave, slave, slave
	c.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	if err := c.Start(); err != nil {
		t.Fatalf("starting %v: %v", c.Args, err)
	}
	slave.Close()
	pc := &ptyCmd{t: t, master: master, cmd: c, read: make(chan struct{})}
	t.Cleanup(func() {
		if c.ProcessState == nil {
			c.Process.Kill()
			c.Wait()
		}
		master.Close()
	})
	go func() {
		defer close(pc.read)
		buf := make([]byte, 4096)
		for {
			n, err := master.Read(buf)
			pc.mu.Lock()
			pc.out.Write(buf[:n])
			pc.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	return pc
}

func (pc *ptyCmd) output() string {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	return pc.out.String()
}

// waitFor waits until the output matches re.
func (pc *ptyCmd) waitFor(re *regexp.Regexp) {
	pc.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !re.MatchString(pc.output()) {
		if time.Now().After(deadline) {
			pc.t.Fatalf("pty output %q does not match %s", pc.output(), re)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// resize sets the pty's size, as a terminal emulator would (the kernel
// sends SIGWINCH to the foreground process group: podman).
func (pc *ptyCmd) resize(rows, cols uint16) {
	pc.t.Helper()
	if err := unix.IoctlSetWinsize(int(pc.master.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: rows, Col: cols}); err != nil {
		pc.t.Fatalf("resizing the pty: %v", err)
	}
}

func (pc *ptyCmd) write(s string) {
	pc.t.Helper()
	if _, err := pc.master.WriteString(s); err != nil {
		pc.t.Fatalf("writing to the pty: %v", err)
	}
}

// wait waits for the command and all its output, and returns its exit code.
func (pc *ptyCmd) wait() int {
	pc.t.Helper()
	err := pc.cmd.Wait()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		pc.t.Fatalf("waiting for %v: %v", pc.cmd.Args, err)
	}
	select {
	case <-pc.read:
	case <-time.After(10 * time.Second):
	}
	return pc.cmd.ProcessState.ExitCode()
}
