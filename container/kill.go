package container

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/rund-dev/rund/internal/shimapi"
)

// ParseSignal accepts a signal as a number or a name, with or without the
// SIG prefix, in any case (runc's rules).
func ParseSignal(s string) (syscall.Signal, error) {
	if s == "" {
		return syscall.SIGTERM, nil
	}
	if n, err := strconv.Atoi(s); err == nil {
		if n <= 0 || n > 64 {
			return 0, fmt.Errorf("unknown signal %q", s)
		}
		return syscall.Signal(n), nil
	}
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	if sig := unix.SignalNum(name); sig != 0 {
		return sig, nil
	}
	return 0, fmt.Errorf("unknown signal %q", s)
}

// Kill sends sig to the container's process (all its processes with all).
func Kill(ctx context.Context, root, id string, sig syscall.Signal, all bool) error {
	st, err := Load(root, id)
	if err != nil {
		return err
	}
	switch st.Refresh() {
	case Created, Running, Paused:
	default:
		return fmt.Errorf("%s: %w", id, ErrNotRunning)
	}
	if _, err := callShim(ctx, root, id, shimapi.Request{Op: shimapi.OpKill, Signal: int(sig), All: all}); err != nil {
		if !st.Shim.Alive() {
			return fmt.Errorf("%s: %w", id, ErrNotRunning)
		}
		return fmt.Errorf("signalling container %s: %w", id, err)
	}
	return nil
}
