package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fakeQMP is a QMP server on one end of a socket pair. handle answers each
// command: it returns the reply's "return" value, or a *QMPError.
type fakeQMP struct {
	t    *testing.T
	conn *net.UnixConn

	mu       sync.Mutex
	commands []string
	fds      []int // descriptors received with commands
}

type fakeRequest struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments"`
	ID        string          `json:"id"`
}

// newFakeQMP returns the client's end of a connection to a fake server
// that greets and then runs handle for each command, in its own goroutine.
func newFakeQMP(t *testing.T, greet bool, handle func(f *fakeQMP, r fakeRequest) (any, error)) (*fakeQMP, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "qmp")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c.(*net.UnixConn)
	}
	f := &fakeQMP{t: t, conn: conn(fds[0])}
	client := conn(fds[1])
	t.Cleanup(func() {
		f.conn.Close()
		client.Close()
		for _, fd := range f.fds {
			unix.Close(fd)
		}
	})
	if greet {
		f.send(map[string]any{"QMP": map[string]any{
			"version":      map[string]any{"qemu": map[string]int{"major": 7, "minor": 2, "micro": 22}, "package": "test"},
			"capabilities": []string{"oob"}}})
	}
	go f.serve(handle)
	return f, client
}

func (f *fakeQMP) send(v any) {
	b, _ := json.Marshal(v)
	f.conn.Write(append(b, '\r', '\n'))
}

func (f *fakeQMP) event(name string, data any) {
	f.send(map[string]any{"event": name, "data": data,
		"timestamp": map[string]int{"seconds": 1, "microseconds": 2}})
}

func (f *fakeQMP) serve(handle func(f *fakeQMP, r fakeRequest) (any, error)) {
	var pending []byte
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(4*4))
	for {
		n, oobn, _, _, err := f.conn.ReadMsgUnix(buf, oob)
		if err != nil {
			return
		}
		if oobn > 0 {
			msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
			for _, m := range msgs {
				fds, _ := unix.ParseUnixRights(&m)
				f.mu.Lock()
				f.fds = append(f.fds, fds...)
				f.mu.Unlock()
			}
		}
		pending = append(pending, buf[:n]...)
		for {
			i := bytes.IndexByte(pending, '\n')
			if i < 0 {
				break
			}
			var r fakeRequest
			if err := json.Unmarshal(pending[:i], &r); err != nil {
				f.t.Errorf("fake qmp: bad request %q: %v", pending[:i], err)
				return
			}
			pending = pending[i+1:]
			f.mu.Lock()
			f.commands = append(f.commands, r.Execute)
			f.mu.Unlock()
			var ret any = map[string]any{}
			var err error
			if r.Execute != "qmp_capabilities" && handle != nil {
				ret, err = handle(f, r)
			}
			var qe *QMPError
			switch {
			case errors.As(err, &qe):
				f.send(map[string]any{"error": qe, "id": r.ID})
			case errors.Is(err, errNoReply):
			default:
				f.send(map[string]any{"return": ret, "id": r.ID})
			}
		}
	}
}

// errNoReply makes the fake server leave a command unanswered.
var errNoReply = errors.New("no reply")

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestQMPCommands(t *testing.T) {
	f, conn := newFakeQMP(t, true, func(f *fakeQMP, r fakeRequest) (any, error) {
		switch r.Execute {
		case "query-status":
			return map[string]any{"running": true, "status": "running", "singlestep": false}, nil
		case "migrate-set-capabilities":
			var args struct {
				Capabilities []migrationCapability `json:"capabilities"`
			}
			json.Unmarshal(r.Arguments, &args)
			if len(args.Capabilities) != 2 || args.Capabilities[0].Capability != "x-ignore-shared" || !args.Capabilities[1].State {
				return nil, &QMPError{Class: "GenericError", Desc: "unexpected " + string(r.Arguments)}
			}
			return map[string]any{}, nil
		}
		return nil, &QMPError{Class: "CommandNotFound", Desc: "The command " + r.Execute + " has not been found"}
	})
	ctx := testContext(t)
	c, err := newQMP(ctx, conn)
	if err != nil {
		t.Fatalf("newQMP: %v", err)
	}
	defer c.Close()
	if got := c.greeting.Version.QEMU.Minor; got != 2 {
		t.Errorf("greeting minor version: got %d, want 2", got)
	}

	st, err := c.queryStatus(ctx)
	if err != nil || !st.Running || st.Status != "running" {
		t.Errorf("query-status: got %+v, %v, want running", st, err)
	}
	if err := c.setMigrationCapabilities(ctx, "x-ignore-shared", "events"); err != nil {
		t.Errorf("migrate-set-capabilities: %v", err)
	}
	err = c.execute(ctx, "no-such-command", nil, nil)
	var qe *QMPError
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" || qe.Command != "no-such-command" {
		t.Errorf("unknown command: got %v, want a CommandNotFound QMPError", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	want := []string{"qmp_capabilities", "query-status", "migrate-set-capabilities", "no-such-command"}
	if !slices.Equal(f.commands, want) {
		t.Errorf("commands: got %q, want %q", f.commands, want)
	}
}

func TestQMPRepliesOutOfOrder(t *testing.T) {
	slow := make(chan string, 1)
	arrived := make(chan struct{})
	_, conn := newFakeQMP(t, true, func(f *fakeQMP, r fakeRequest) (any, error) {
		switch r.Execute {
		case "slow":
			slow <- r.ID // answered after "fast"
			close(arrived)
			return nil, errNoReply
		case "fast":
			f.send(map[string]any{"return": "fast", "id": r.ID})
			f.send(map[string]any{"return": "slow", "id": <-slow})
			return nil, errNoReply
		}
		return nil, nil
	})
	ctx := testContext(t)
	c, err := newQMP(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	done := make(chan string)
	go func() {
		var s string
		if err := c.execute(ctx, "slow", nil, &s); err != nil {
			t.Errorf("slow: %v", err)
		}
		done <- s
	}()
	<-arrived // "slow" reaches the server first
	var s string
	if err := c.execute(ctx, "fast", nil, &s); err != nil || s != "fast" {
		t.Errorf("fast: got %q, %v", s, err)
	}
	if got := <-done; got != "slow" {
		t.Errorf("slow: got %q, want %q", got, "slow")
	}
}

func TestQMPEvents(t *testing.T) {
	_, conn := newFakeQMP(t, true, func(f *fakeQMP, r fakeRequest) (any, error) {
		switch r.Execute {
		case "stop":
			f.event("RTC_CHANGE", map[string]int{"offset": 1})
			f.send(map[string]any{"return": map[string]any{}, "id": r.ID})
			f.event("STOP", nil)
			return nil, errNoReply
		case "migrate":
			f.send(map[string]any{"return": map[string]any{}, "id": r.ID})
			for _, s := range []string{"setup", "active", "completed"} {
				f.event("MIGRATION", map[string]string{"status": s})
			}
			return nil, errNoReply
		}
		return map[string]any{}, nil
	})
	ctx := testContext(t)
	c, err := newQMP(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	sub := c.subscribe()
	if err := c.execute(ctx, "stop", nil, nil); err != nil {
		t.Fatal(err)
	}
	if e, err := sub.wait(ctx, eventNamed("STOP")); err != nil || e.Name != "STOP" {
		t.Errorf("waiting for STOP: got %+v, %v", e, err)
	}
	sub.cancel()

	sub = c.subscribe()
	defer sub.cancel()
	if err := c.execute(ctx, "migrate", map[string]string{"uri": "fd:x"}, nil); err != nil {
		t.Fatal(err)
	}
	e, err := sub.wait(ctx, migrationEnded)
	if err != nil || migrationStatus(e) != "completed" {
		t.Errorf("waiting for the migration: got %+v, %v, want completed", e, err)
	}

	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if _, err := sub.wait(short, eventNamed("RESUME")); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("waiting for an event that never comes: got %v, want DeadlineExceeded", err)
	}
}

func TestQMPContextAndClose(t *testing.T) {
	f, conn := newFakeQMP(t, true, func(f *fakeQMP, r fakeRequest) (any, error) {
		if r.Execute == "hang" {
			return nil, errNoReply
		}
		return map[string]any{}, nil
	})
	ctx := testContext(t)
	c, err := newQMP(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if err := c.execute(short, "hang", nil, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("unanswered command: got %v, want DeadlineExceeded", err)
	}
	if err := c.execute(ctx, "query-status", nil, nil); err != nil {
		t.Errorf("command after a timed-out one: %v", err)
	}

	sub := c.subscribe()
	defer sub.cancel()
	f.conn.Close()
	if err := c.execute(ctx, "hang", nil, nil); !errors.Is(err, errQMPClosed) {
		t.Errorf("command on a closed connection: got %v, want errQMPClosed", err)
	}
	if _, err := sub.wait(ctx, eventNamed("STOP")); !errors.Is(err, errQMPClosed) {
		t.Errorf("waiting on a closed connection: got %v, want errQMPClosed", err)
	}
}

func TestQMPGreeting(t *testing.T) {
	t.Run("none", func(t *testing.T) {
		_, conn := newFakeQMP(t, false, nil)
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		defer cancel()
		if _, err := newQMP(ctx, conn); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("no greeting: got %v, want DeadlineExceeded", err)
		}
	})
	t.Run("closed", func(t *testing.T) {
		f, conn := newFakeQMP(t, false, nil)
		f.conn.Close()
		if _, err := newQMP(testContext(t), conn); !errors.Is(err, errQMPClosed) {
			t.Errorf("closed before the greeting: got %v, want errQMPClosed", err)
		}
	})
}

func TestQMPPassesFile(t *testing.T) {
	f, conn := newFakeQMP(t, true, nil)
	ctx := testContext(t)
	c, err := newQMP(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	path := filepath.Join(t.TempDir(), "state")
	file, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	if err := c.executeWithFile(ctx, "getfd", map[string]string{"fdname": "x"}, nil, file); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	fds := append([]int(nil), f.fds...)
	f.mu.Unlock()
	if len(fds) != 1 {
		t.Fatalf("descriptors received: got %d, want 1", len(fds))
	}
	if _, err := unix.Write(fds[0], []byte("via qmp")); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(path); string(b) != "via qmp" {
		t.Errorf("file written through the passed descriptor: got %q", b)
	}
}
