package client

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rund-dev/rund/vm/agent/proto"
)

// fakeAgent answers frames on the guest end of a net.Pipe with handle.
type fakeAgent struct {
	conn net.Conn
	w    *proto.Writer

	mu    sync.Mutex
	stdin map[uint32]*bytes.Buffer
}

// startFake returns a client connected to a fake agent whose handle
// function sees every frame the client sends.
func startFake(t *testing.T, handle func(a *fakeAgent, f proto.Frame), opts ...Option) (*Client, *fakeAgent) {
	t.Helper()
	host, guest := net.Pipe()
	a := &fakeAgent{conn: guest, w: proto.NewWriter(guest), stdin: map[uint32]*bytes.Buffer{}}
	go func() {
		r := proto.NewReader(guest)
		for {
			f, err := r.Read()
			if err != nil {
				return
			}
			if f.Kind == proto.KindStdin {
				a.mu.Lock()
				if a.stdin[f.Stream] == nil {
					a.stdin[f.Stream] = &bytes.Buffer{}
				}
				a.stdin[f.Stream].Write(f.Payload)
				a.mu.Unlock()
			}
			handle(a, f)
		}
	}()
	c := New(host, opts...)
	t.Cleanup(func() { c.Close(); guest.Close() })
	return c, a
}

func (a *fakeAgent) reply(f proto.Frame, r proto.Reply) {
	a.w.WriteJSON(proto.KindReply, f.Stream, f.Seq, r)
}

func (a *fakeAgent) input(stream uint32) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	if b := a.stdin[stream]; b != nil {
		return b.String()
	}
	return ""
}

func ctxT(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestHello(t *testing.T) {
	tests := []struct {
		name    string
		version int
		wantErr error
	}{
		{name: "same version", version: proto.Version},
		{name: "other version", version: proto.Version + 1, wantErr: ErrVersion},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got proto.Hello
			c, _ := startFake(t, func(a *fakeAgent, f proto.Frame) {
				f.Decode(&got)
				a.reply(f, proto.Reply{Version: tt.version})
			})
			err := c.Hello(ctxT(t), proto.Hello{TimeUnixNano: 42})
			if !errors.Is(err, tt.wantErr) {
				t.Errorf("got %v, want %v", err, tt.wantErr)
			}
			if got.Version != proto.Version || got.TimeUnixNano != 42 {
				t.Errorf("agent got %+v", got)
			}
		})
	}
}

// TestProcessLifecycle runs a fake process: output on both streams, stdin
// echoed back after CloseStdin, then Exit; Wait must see all output first.
func TestProcessLifecycle(t *testing.T) {
	c, _ := startFake(t, func(a *fakeAgent, f proto.Frame) {
		switch f.Kind {
		case proto.KindCreate:
			a.reply(f, proto.Reply{Pid: 42})
			a.w.WriteData(proto.KindStdout, f.Stream, []byte("out "))
			a.w.WriteData(proto.KindStderr, f.Stream, []byte("err"))
		case proto.KindStart:
			a.reply(f, proto.Reply{})
		case proto.KindCloseStdin:
			go func() {
				a.w.WriteData(proto.KindStdout, f.Stream, []byte("stdin="+a.input(f.Stream)))
				a.w.WriteData(proto.KindStdout, f.Stream, bytes.Repeat([]byte("x"), 3<<20))
				a.w.WriteJSON(proto.KindExit, f.Stream, 0, proto.ExitMessage{Status: 3})
			}()
		}
	})
	ctx := ctxT(t)
	var out, errb bytes.Buffer
	pid, err := c.Create(ctx, proto.CreateRequest{ID: "x", Process: proto.Process{Args: []string{"x"}}},
		Stdio{Stdin: strings.NewReader("hello"), Stdout: &out, Stderr: &errb})
	if err != nil || pid != 42 {
		t.Fatalf("create: %d %v", pid, err)
	}
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	st, err := c.Wait(ctx, proto.InitStream)
	if err != nil || st != 3 {
		t.Fatalf("wait: %d %v", st, err)
	}
	want := "out stdin=hello" + strings.Repeat("x", 3<<20)
	if out.String() != want || errb.String() != "err" {
		t.Errorf("got stdout of %d bytes (prefix %q), stderr %q", out.Len(), out.String()[:min(20, out.Len())], errb.String())
	}
	// The status stays available.
	if st, err := c.Wait(ctx, proto.InitStream); err != nil || st != 3 {
		t.Errorf("second wait: %d %v", st, err)
	}
}

func TestAgentError(t *testing.T) {
	c, _ := startFake(t, func(a *fakeAgent, f proto.Frame) {
		a.reply(f, proto.Reply{Error: `exec: "nope": executable file not found in $PATH`})
	})
	_, err := c.Exec(ctxT(t), 2, proto.ExecRequest{}, Stdio{})
	var ae *AgentError
	if !errors.As(err, &ae) || ae.Op != "exec" || !strings.Contains(err.Error(), "executable file not found in $PATH") {
		t.Fatalf("got %v", err)
	}
	// The stream is free again.
	if _, err := c.Exec(ctxT(t), 2, proto.ExecRequest{}, Stdio{}); !errors.As(err, &ae) {
		t.Errorf("reusing the stream: %v", err)
	}
	if _, err := c.Exec(ctxT(t), 1, proto.ExecRequest{}, Stdio{}); err == nil {
		t.Errorf("exec on stream 1 accepted")
	}
}

func TestContextCancel(t *testing.T) {
	c, _ := startFake(t, func(a *fakeAgent, f proto.Frame) {})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := c.Ps(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("got %v, want deadline exceeded", err)
	}
}

func TestConnectionLost(t *testing.T) {
	got := make(chan proto.Frame, 4)
	c, a := startFake(t, func(a *fakeAgent, f proto.Frame) {
		if f.Kind == proto.KindCreate {
			a.reply(f, proto.Reply{Pid: 7})
			return
		}
		got <- f
	})
	ctx := ctxT(t)
	if _, err := c.Create(ctx, proto.CreateRequest{}, Stdio{}); err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { _, err := c.Ps(ctx); errc <- err }()
	for f := range got {
		if f.Kind == proto.KindPs {
			break
		}
	}
	a.conn.Close()
	if err := <-errc; !errors.Is(err, ErrClosed) {
		t.Errorf("pending call: got %v, want ErrClosed", err)
	}
	if _, err := c.Wait(ctx, proto.InitStream); !errors.Is(err, ErrClosed) {
		t.Errorf("wait: got %v, want ErrClosed", err)
	}
	if err := c.Start(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("call after close: got %v, want ErrClosed", err)
	}
	select {
	case <-c.Done():
	default:
		t.Error("Done not closed")
	}
}

func TestShutdownWithoutReply(t *testing.T) {
	c, _ := startFake(t, func(a *fakeAgent, f proto.Frame) {
		if f.Kind == proto.KindShutdown {
			a.conn.Close()
		}
	})
	if err := c.Shutdown(ctxT(t)); err != nil {
		t.Errorf("got %v, want nil", err)
	}
}

func TestLogsAndRequests(t *testing.T) {
	logs := make(chan string, 1)
	var mu sync.Mutex
	var seen []string
	c, _ := startFake(t, func(a *fakeAgent, f proto.Frame) {
		mu.Lock()
		seen = append(seen, f.Kind.String())
		mu.Unlock()
		switch f.Kind {
		case proto.KindPs:
			a.w.Write(proto.Frame{Kind: proto.KindLog, Payload: []byte("hi")})
			a.reply(f, proto.Reply{Pids: []int{5, 6}})
		case proto.KindWarmup:
			a.reply(f, proto.Reply{Info: "warm"})
		default:
			a.reply(f, proto.Reply{})
		}
	}, WithLogs(func(m string) { logs <- m }))
	ctx := ctxT(t)
	pids, err := c.Ps(ctx)
	if err != nil || len(pids) != 2 {
		t.Errorf("ps: %v %v", pids, err)
	}
	if m := <-logs; m != "hi" {
		t.Errorf("log %q", m)
	}
	if info, err := c.Warmup(ctx, proto.WarmupRequest{}); err != nil || info != "warm" {
		t.Errorf("warmup: %q %v", info, err)
	}
	for _, fn := range []func() error{
		func() error { return c.Signal(ctx, 1, 9, true) },
		func() error { return c.Resize(ctx, 1, 24, 80) },
		func() error { return c.Pause(ctx) },
		func() error { return c.Resume(ctx) },
	} {
		if err := fn(); err != nil {
			t.Error(err)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	want := "ps warmup signal resize pause resume"
	if got := strings.Join(seen, " "); got != want {
		t.Errorf("agent saw %q, want %q", got, want)
	}
}

// TestStdinNil closes stdin at once when no reader is given.
func TestStdinNil(t *testing.T) {
	closed := make(chan uint32, 1)
	c, _ := startFake(t, func(a *fakeAgent, f proto.Frame) {
		switch f.Kind {
		case proto.KindExec:
			a.reply(f, proto.Reply{Pid: 9})
		case proto.KindCloseStdin:
			closed <- f.Stream
		}
	})
	if _, err := c.Exec(ctxT(t), 5, proto.ExecRequest{}, Stdio{Stdout: io.Discard}); err != nil {
		t.Fatal(err)
	}
	select {
	case s := <-closed:
		if s != 5 {
			t.Errorf("close-stdin on stream %d", s)
		}
	case <-time.After(5 * time.Second):
		t.Error("no close-stdin")
	}
}
