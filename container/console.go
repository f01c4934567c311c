package container

import (
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// newConsole opens a pty, sends its master to the console socket (the
// runc/conmon protocol: one message, SCM_RIGHTS carrying the master) and
// returns the slave, which becomes the shim's controlling terminal.
func newConsole(socket string) (*os.File, error) {
	master, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening /dev/ptmx: %w", err)
	}
	defer master.Close()
	if err := unix.IoctlSetPointerInt(int(master.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		return nil, fmt.Errorf("unlocking pty: %w", err)
	}
	n, err := unix.IoctlGetInt(int(master.Fd()), unix.TIOCGPTN)
	if err != nil {
		return nil, fmt.Errorf("getting pty number: %w", err)
	}
	name := fmt.Sprintf("/dev/pts/%d", n)
	slave, err := os.OpenFile(name, os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", name, err)
	}
	conn, err := net.Dial("unix", socket)
	if err != nil {
		slave.Close()
		return nil, fmt.Errorf("connecting to console socket %s: %w", socket, err)
	}
	defer conn.Close()
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		slave.Close()
		return nil, fmt.Errorf("console socket %s is not a unix socket", socket)
	}
	rights := unix.UnixRights(int(master.Fd()))
	if _, _, err := uc.WriteMsgUnix([]byte(name), rights, nil); err != nil {
		slave.Close()
		return nil, fmt.Errorf("sending pty master to %s: %w", socket, err)
	}
	return slave, nil
}
