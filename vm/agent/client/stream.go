package client

import (
	"context"
	"fmt"
	"io"
	"sync"

	"github.com/rund-dev/rund/vm/agent/proto"
)

// Stdio is where a process's standard streams come from and go to.
type Stdio struct {
	// Stdin is copied to the process in Stdin frames; at its EOF the
	// process's stdin is closed. Nil closes it at once.
	Stdin io.Reader
	// Stdout and Stderr receive the process's output (with a terminal, all
	// of it arrives on Stdout). Nil discards it.
	Stdout, Stderr io.Writer
}

// event is what the reader hands a stream's writer goroutine.
type event struct {
	kind   proto.Kind // Stdout, Stderr, Exit; 0 for an abort
	data   []byte
	status int
	err    error
}

// stream is one process's output and exit, as seen by the host.
type stream struct {
	id             uint32
	stdout, stderr io.Writer
	q              chan event

	mu     sync.Mutex
	exited bool // set when Exit or an abort was queued

	done   chan struct{} // closed once the status (or err) is known
	status int
	err    error
}

func newStream(id uint32, s Stdio) *stream {
	st := &stream{id: id, stdout: s.Stdout, stderr: s.Stderr, q: make(chan event, 64), done: make(chan struct{})}
	if st.stdout == nil {
		st.stdout = io.Discard
	}
	if st.stderr == nil {
		st.stderr = io.Discard
	}
	go st.run()
	return st
}

// run writes the output in order, then publishes the exit status.
func (s *stream) run() {
	var werr [2]error
	for ev := range s.q {
		switch ev.kind {
		case proto.KindStdout:
			if werr[0] == nil {
				_, werr[0] = s.stdout.Write(ev.data)
			}
		case proto.KindStderr:
			if werr[1] == nil {
				_, werr[1] = s.stderr.Write(ev.data)
			}
		case proto.KindExit:
			s.status = ev.status
			close(s.done)
			return
		default:
			s.err = ev.err
			close(s.done)
			return
		}
	}
}

// push queues an event (blocking while the queue is full: back-pressure on
// the reader). Nothing is queued after the Exit or an abort.
func (s *stream) push(ev event) {
	s.mu.Lock()
	if s.exited {
		s.mu.Unlock()
		return
	}
	if ev.kind != proto.KindStdout && ev.kind != proto.KindStderr {
		s.exited = true
	}
	s.mu.Unlock()
	select {
	case s.q <- ev:
	case <-s.done:
	}
}

// abort ends the stream with err, without blocking.
func (s *stream) abort(err error) {
	s.mu.Lock()
	if s.exited {
		s.mu.Unlock()
		return
	}
	s.exited = true
	s.mu.Unlock()
	ev := event{err: fmt.Errorf("stream %d: %w", s.id, err)}
	go func() {
		select {
		case s.q <- ev:
		case <-s.done:
		}
	}()
}

// addStream registers a stream before the request that starts its process
// is sent, so that no output is lost.
func (c *Client) addStream(id uint32, stdio Stdio) (*stream, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pending == nil {
		return nil, c.err
	}
	if old, ok := c.streams[id]; ok {
		select {
		case <-old.done:
		default:
			return nil, fmt.Errorf("stream %d is in use", id)
		}
	}
	s := newStream(id, stdio)
	c.streams[id] = s
	return s, nil
}

func (c *Client) removeStream(s *stream) {
	c.mu.Lock()
	if c.streams[s.id] == s {
		delete(c.streams, s.id)
	}
	c.mu.Unlock()
	s.abort(ErrClosed)
}

// copyStdin sends r to the stream's process, then closes its stdin.
func (c *Client) copyStdin(s *stream, r io.Reader) {
	if r != nil {
		buf := make([]byte, 32<<10)
		for {
			n, err := r.Read(buf)
			select {
			case <-s.done:
				return
			default:
			}
			if n > 0 {
				if c.w.WriteData(proto.KindStdin, s.id, buf[:n]) != nil {
					return
				}
			}
			if err != nil {
				break
			}
		}
	}
	_ = c.w.Write(proto.Frame{Kind: proto.KindCloseStdin, Stream: s.id})
}

// Wait returns the exit status of the stream's process (the exit code, or
// 128+N when killed by signal N) once all of its output was written to the
// Stdio writers. It fails when the connection is lost first.
func (c *Client) Wait(ctx context.Context, stream uint32) (int, error) {
	c.mu.Lock()
	s := c.streams[stream]
	c.mu.Unlock()
	if s == nil {
		return 0, fmt.Errorf("wait: no process on stream %d", stream)
	}
	select {
	case <-s.done:
	case <-ctx.Done():
		return 0, fmt.Errorf("wait for stream %d: %w", stream, ctx.Err())
	}
	if s.err != nil {
		return 0, s.err
	}
	return s.status, nil
}
