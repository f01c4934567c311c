package cloudhypervisor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"time"

	"github.com/rund-dev/rund/vm"
)

// DefaultVirtiofsd is the virtio-fs daemon looked up on PATH when
// Backend.Virtiofsd is empty.
const DefaultVirtiofsd = "virtiofsd"

// startVirtiofsd starts one virtiofsd per share and waits for its socket, so
// that the VMM finds it at boot. The daemons exit with the VMM's connection;
// the Machine also kills them when the VMM is gone.
func (m *Machine) startVirtiofsd(ctx context.Context, shares []vm.Share, fs []FsConfig) error {
	if len(shares) == 0 {
		return nil
	}
	bin := m.virtiofsd
	if bin == "" {
		bin = DefaultVirtiofsd
	}
	for i, s := range shares {
		sock := fs[i].Socket
		if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("removing stale socket: %w", err)
		}
		cmd := exec.Command(bin, "--socket-path="+sock, "--shared-dir="+s.Path, "--cache=never")
		cmd.Env = m.env
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			return fmt.Errorf("starting %s for share %q: %w", bin, s.Tag, err)
		}
		exited := make(chan struct{})
		go func() {
			_ = cmd.Wait()
			close(exited)
		}()
		m.helpers = append(m.helpers, helper{cmd: cmd, done: exited})
		if err := waitSocket(ctx, sock, exited); err != nil {
			return fmt.Errorf("starting %s for share %q: %w", bin, s.Tag, err)
		}
	}
	return nil
}

// waitSocket polls for path to appear until ctx is done or exited closes.
func waitSocket(ctx context.Context, path string, exited <-chan struct{}) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, apiReadyTimeout)
		defer cancel()
	}
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("exited before creating %s", path)
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w", path, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// helper is a process that lives and dies with the VMM.
type helper struct {
	cmd  *exec.Cmd
	done chan struct{}
}

// stopHelpers kills the helper processes and waits for them; calling it
// again is harmless.
func (m *Machine) stopHelpers() {
	m.helperOnce.Do(func() {
		for _, h := range m.helpers {
			_ = h.cmd.Process.Signal(syscall.SIGKILL)
			<-h.done
		}
	})
}
