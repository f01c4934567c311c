package shim

import (
	"context"
	"os"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/rund-dev/rund/internal/term"
	"github.com/rund-dev/rund/vm/agent/client"
	"github.com/rund-dev/rund/vm/agent/proto"
)

// stdio is the container's stdio: the shim's own fds 0-2, which create gave
// it (conmon's pipes, or a pty slave when the process has a terminal). With a
// terminal the host pty is put in raw mode: the guest's pty does the line
// discipline. It returns a function that restores the terminal.
func (s *shim) stdio() (client.Stdio, func(), error) {
	io := client.Stdio{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}
	if !s.launch.Create.Process.Terminal {
		return io, func() {}, nil
	}
	io.Stderr = nil
	if rows, cols := term.Size(0); rows > 0 {
		s.launch.Create.Process.Rows, s.launch.Create.Process.Cols = rows, cols
	}
	restore := term.MakeRaw(0)
	if restore == nil {
		restore = func() {}
	}
	return io, restore, nil
}

// resize passes the host pty's size (set by conmon) to the guest's.
func (s *shim) resize() {
	if !s.launch.Create.Process.Terminal {
		return
	}
	rows, cols := term.Size(0)
	if rows == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.agent.Resize(ctx, proto.InitStream, rows, cols); err != nil {
		logrus.Debugf("resizing terminal: %v", err)
	}
}
