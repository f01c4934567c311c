package container

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/sirupsen/logrus"
)

// Run creates and starts a container; unless detach, it waits for the
// container's process, relaying signals to it, deletes the container (unless
// keep) and returns the process's exit status.
func Run(ctx context.Context, o CreateOptions, detach, keep bool) (int, error) {
	sigs := make(chan os.Signal, 16)
	if !detach {
		signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2)
		defer signal.Stop(sigs)
	}
	st, err := Create(ctx, o)
	if err != nil {
		return 0, err
	}
	if err := Start(ctx, o.Root, o.ID); err != nil {
		Delete(ctx, o.Options, o.ID, true)
		return 0, err
	}
	if detach {
		return 0, nil
	}
	done := make(chan int, 1)
	go func() { done <- waitChild(st.Shim.Pid) }()
	var status int
wait:
	for {
		select {
		case status = <-done:
			break wait
		case s := <-sigs:
			if err := Kill(ctx, o.Root, o.ID, s.(syscall.Signal), false); err != nil {
				logrus.Debugf("forwarding %v: %v", s, err)
			}
		}
	}
	if !keep {
		if err := Delete(ctx, o.Options, o.ID, true); err != nil {
			return status, err
		}
	}
	return status, nil
}

// waitChild waits for our child pid and returns its exit status, the way a
// shell reports it (128+N for a signal).
func waitChild(pid int) int {
	var ws syscall.WaitStatus
	for {
		_, err := syscall.Wait4(pid, &ws, 0, nil)
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return 255
		}
		break
	}
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus()
}
