// Package client is the host side of the guest channel: a typed client of
// the agent (vm/agent/guest) over any net.Conn, speaking vm/agent/proto.
//
// One reader goroutine dispatches what the agent sends: Replies by seq to the
// call waiting for them, output frames and Exit by stream. Output of a stream
// is written to its Stdio writers in order, by one goroutine per stream, and
// the stream's exit status becomes available (Wait) only after all of its
// output was written.
//
//	c := client.New(conn, client.WithLogs(func(m string) { log.Print(m) }))
//	defer c.Close()
//	err := c.Hello(ctx, proto.Hello{Version: proto.Version, TimeUnixNano: ...})
//	pid, err := c.Create(ctx, req, client.Stdio{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr})
//	err = c.Start(ctx)
//	status, err := c.Wait(ctx, proto.InitStream)
//	err = c.Shutdown(ctx)
//
// Every call honours its ctx. When the connection fails or is closed, every
// pending call and every Wait fails with an error wrapping ErrClosed.
package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"

	"github.com/rund-dev/rund/vm/agent/proto"
)

// ErrClosed is wrapped by the errors of calls made on, or pending when, the
// connection failed or was closed.
var ErrClosed = errors.New("agent connection closed")

// ErrVersion is wrapped by Hello's error when the agent speaks another
// protocol version.
var ErrVersion = errors.New("agent protocol version mismatch")

// AgentError is an error the agent reported for a request.
type AgentError struct {
	Op  string // the request kind ("create", "exec", ...)
	Msg string // the agent's message
}

func (e *AgentError) Error() string { return fmt.Sprintf("agent %s: %s", e.Op, e.Msg) }

// Option configures a Client.
type Option func(*Client)

// WithLogs sets the function that receives the agent's diagnostics (KindLog
// frames). It is called from the reader goroutine and must not block long.
func WithLogs(fn func(msg string)) Option {
	return func(c *Client) { c.logs = fn }
}

// Client talks to one agent. Its methods are safe for concurrent use.
type Client struct {
	conn net.Conn
	w    *proto.Writer
	logs func(string)
	done chan struct{} // closed when the reader stops

	mu      sync.Mutex
	seq     uint32
	pending map[uint32]chan proto.Reply
	streams map[uint32]*stream // kept after exit, for Wait, until reused
	err     error              // why the reader stopped, wraps ErrClosed
}

// New returns a client of the agent at the other end of conn and starts its
// reader. Close releases it.
func New(conn net.Conn, opts ...Option) *Client {
	c := &Client{
		conn:    conn,
		w:       proto.NewWriter(conn),
		done:    make(chan struct{}),
		pending: make(map[uint32]chan proto.Reply),
		streams: make(map[uint32]*stream),
	}
	for _, o := range opts {
		o(c)
	}
	go c.read()
	return c
}

// Close closes the connection; pending calls and Waits fail with ErrClosed.
func (c *Client) Close() error {
	err := c.conn.Close()
	<-c.done
	return err
}

// Done is closed when the connection has failed or was closed.
func (c *Client) Done() <-chan struct{} { return c.done }

func (c *Client) read() {
	r := proto.NewReader(c.conn)
	var err error
	for {
		var f proto.Frame
		if f, err = r.Read(); err != nil {
			break
		}
		c.handle(f)
	}
	if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
		err = ErrClosed
	} else {
		err = fmt.Errorf("%w: %w", ErrClosed, err)
	}
	c.mu.Lock()
	c.err = err
	pending := c.pending
	c.pending = nil
	streams := make([]*stream, 0, len(c.streams))
	for _, s := range c.streams {
		streams = append(streams, s)
	}
	c.mu.Unlock()
	for _, ch := range pending {
		close(ch)
	}
	for _, s := range streams {
		s.abort(err)
	}
	close(c.done)
}

func (c *Client) handle(f proto.Frame) {
	switch f.Kind {
	case proto.KindReply:
		var r proto.Reply
		if err := f.Decode(&r); err != nil {
			r = proto.Reply{Error: err.Error()}
		}
		c.mu.Lock()
		ch := c.pending[f.Seq]
		delete(c.pending, f.Seq)
		c.mu.Unlock()
		if ch != nil {
			ch <- r
		}
	case proto.KindStdout, proto.KindStderr:
		if s := c.stream(f.Stream); s != nil {
			s.push(event{kind: f.Kind, data: f.Payload})
		}
	case proto.KindExit:
		var m proto.ExitMessage
		if err := f.Decode(&m); err != nil {
			c.log(fmt.Sprintf("bad exit frame on stream %d: %v", f.Stream, err))
			return
		}
		if s := c.stream(f.Stream); s != nil {
			s.push(event{kind: proto.KindExit, status: m.Status})
		}
	case proto.KindLog:
		c.log(string(f.Payload))
	default:
		c.log(fmt.Sprintf("unexpected %s frame from the agent", f.Kind))
	}
}

func (c *Client) log(msg string) {
	if c.logs != nil {
		c.logs(msg)
	}
}

func (c *Client) stream(id uint32) *stream {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.streams[id]
}

// call sends a request and waits for its reply.
func (c *Client) call(ctx context.Context, kind proto.Kind, stream uint32, payload any) (proto.Reply, error) {
	c.mu.Lock()
	if c.pending == nil {
		err := c.err
		c.mu.Unlock()
		return proto.Reply{}, fmt.Errorf("agent %s: %w", kind, err)
	}
	c.seq++
	if c.seq == 0 {
		c.seq = 1
	}
	seq := c.seq
	ch := make(chan proto.Reply, 1)
	c.pending[seq] = ch
	c.mu.Unlock()

	forget := func() {
		c.mu.Lock()
		if c.pending != nil {
			delete(c.pending, seq)
		}
		c.mu.Unlock()
	}
	if err := c.send(ctx, kind, stream, seq, payload); err != nil {
		forget()
		return proto.Reply{}, fmt.Errorf("agent %s: %w", kind, err)
	}
	select {
	case r, ok := <-ch:
		if !ok {
			return proto.Reply{}, fmt.Errorf("agent %s: %w", kind, c.closedErr())
		}
		if r.Error != "" {
			return r, &AgentError{Op: kind.String(), Msg: r.Error}
		}
		return r, nil
	case <-ctx.Done():
		forget()
		return proto.Reply{}, fmt.Errorf("agent %s: %w", kind, ctx.Err())
	}
}

// send writes one control frame, giving up when ctx is done (the write
// itself cannot be interrupted: the connection is then closed, as its
// framing would be lost).
func (c *Client) send(ctx context.Context, kind proto.Kind, stream, seq uint32, payload any) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	errc := make(chan error, 1)
	go func() { errc <- c.w.WriteJSON(kind, stream, seq, payload) }()
	select {
	case err := <-errc:
		return c.writeErr(err)
	case <-ctx.Done():
		select {
		case err := <-errc:
			return c.writeErr(err)
		default:
		}
		c.conn.Close()
		return ctx.Err()
	}
}

func (c *Client) writeErr(err error) error {
	if err == nil {
		return nil
	}
	select {
	case <-c.done:
		return c.closedErr()
	default:
	}
	if errors.Is(err, net.ErrClosed) || errors.Is(err, io.ErrClosedPipe) {
		return fmt.Errorf("%w: %w", ErrClosed, err)
	}
	return err
}

func (c *Client) closedErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return c.err
	}
	return ErrClosed
}
