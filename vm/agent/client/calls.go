package client

import (
	"context"
	"errors"
	"fmt"

	"github.com/rund-dev/rund/vm/agent/proto"
)

// Hello opens the session: it gives the agent the VM's identity (clock,
// entropy, hostname) and checks that it speaks proto.Version. A zero
// h.Version is filled in.
func (c *Client) Hello(ctx context.Context, h proto.Hello) error {
	if h.Version == 0 {
		h.Version = proto.Version
	}
	r, err := c.call(ctx, proto.KindHello, 0, h)
	if err != nil {
		return err
	}
	if r.Version != proto.Version {
		return fmt.Errorf("agent speaks version %d, host %d: %w", r.Version, proto.Version, ErrVersion)
	}
	return nil
}

// Warmup asks a template's agent to run its mount and spawn paths once and
// drop its caches; it returns the agent's account of what it did.
func (c *Client) Warmup(ctx context.Context, req proto.WarmupRequest) (string, error) {
	r, err := c.call(ctx, proto.KindWarmup, 0, req)
	return r.Info, err
}

// Create builds the container and starts its init process (stream 1), held
// before exec until Start. It returns the process's guest pid. Stdio is
// relayed from then on: stdin is copied once Create succeeded.
func (c *Client) Create(ctx context.Context, req proto.CreateRequest, stdio Stdio) (int, error) {
	return c.spawn(ctx, proto.KindCreate, proto.InitStream, req, stdio)
}

// Exec runs another process in the container on stream (2 or more, chosen
// by the caller and unused), at once, and returns its guest pid.
func (c *Client) Exec(ctx context.Context, stream uint32, req proto.ExecRequest, stdio Stdio) (int, error) {
	if stream <= proto.InitStream {
		return 0, fmt.Errorf("exec: stream %d is reserved", stream)
	}
	return c.spawn(ctx, proto.KindExec, stream, req, stdio)
}

func (c *Client) spawn(ctx context.Context, kind proto.Kind, id uint32, req any, stdio Stdio) (int, error) {
	s, err := c.addStream(id, stdio)
	if err != nil {
		return 0, fmt.Errorf("agent %s: %w", kind, err)
	}
	r, err := c.call(ctx, kind, id, req)
	if err != nil {
		c.removeStream(s)
		return 0, err
	}
	go c.copyStdin(s, stdio.Stdin)
	return r.Pid, nil
}

// Start releases the init process into exec. It returns once exec happened,
// or with exec's error.
func (c *Client) Start(ctx context.Context) error {
	_, err := c.call(ctx, proto.KindStart, proto.InitStream, nil)
	return err
}

// Signal sends sig to the stream's process, or with all to every process
// of the container.
func (c *Client) Signal(ctx context.Context, stream uint32, sig int, all bool) error {
	_, err := c.call(ctx, proto.KindSignal, stream, proto.SignalRequest{Signal: sig, All: all})
	return err
}

// Resize sets the terminal size of the stream's process.
func (c *Client) Resize(ctx context.Context, stream uint32, rows, cols uint16) error {
	_, err := c.call(ctx, proto.KindResize, stream, proto.ResizeRequest{Rows: rows, Cols: cols})
	return err
}

// Pause stops every process of the container (SIGSTOP).
func (c *Client) Pause(ctx context.Context) error {
	_, err := c.call(ctx, proto.KindPause, 0, nil)
	return err
}

// Resume continues them (SIGCONT).
func (c *Client) Resume(ctx context.Context) error {
	_, err := c.call(ctx, proto.KindResume, 0, nil)
	return err
}

// Iomem returns the text of the guest's /proc/iomem (the kernel's layout
// in guest-physical memory).
func (c *Client) Iomem(ctx context.Context) (string, error) {
	r, err := c.call(ctx, proto.KindIomem, 0, nil)
	return r.Info, err
}

// Ps returns the guest pids of the container's processes.
func (c *Client) Ps(ctx context.Context) ([]int, error) {
	r, err := c.call(ctx, proto.KindPs, 0, nil)
	return r.Pids, err
}

// Shutdown asks the agent to kill every process, unmount, sync and power
// the VM off. The connection dropping before the reply counts as done.
func (c *Client) Shutdown(ctx context.Context) error {
	_, err := c.call(ctx, proto.KindShutdown, 0, nil)
	var ae *AgentError
	if err != nil && !errors.As(err, &ae) && errors.Is(err, ErrClosed) {
		return nil
	}
	return err
}
