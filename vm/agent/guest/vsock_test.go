package guest

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/rund-dev/rund/vm/agent/proto"
	"golang.org/x/sys/unix"
)

// fakeConn records what is written to it; it fails writes after failAfter
// successful ones when failAfter > 0.
type fakeConn struct {
	mu        sync.Mutex
	buf       bytes.Buffer
	writes    int
	failAfter int
	closed    bool
}

func (c *fakeConn) Read([]byte) (int, error) { return 0, io.EOF }

func (c *fakeConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return 0, errors.New("closed")
	}
	if c.failAfter > 0 && c.writes >= c.failAfter {
		return 0, unix.EPIPE
	}
	c.writes++
	return c.buf.Write(b)
}

func (c *fakeConn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	return nil
}

func (c *fakeConn) frames(t *testing.T) []proto.Frame {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	r := proto.NewReader(bytes.NewReader(c.buf.Bytes()))
	var fs []proto.Frame
	for {
		f, err := r.Read()
		if errors.Is(err, io.EOF) {
			return fs
		}
		if err != nil {
			t.Fatalf("connection holds a broken stream: %v (after %d frames)", err, len(fs))
		}
		fs = append(fs, f)
	}
}

func (c *fakeConn) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

func encode(f proto.Frame) []byte {
	var b bytes.Buffer
	_ = proto.NewWriter(&b).Write(f)
	return b.Bytes()
}

func wantFrames(t *testing.T, got []proto.Frame, want ...proto.Frame) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d frames %v, want %d", len(got), got, len(want))
	}
	for i := range got {
		g, w := got[i], want[i]
		if g.Kind != w.Kind || g.Stream != w.Stream || g.Seq != w.Seq || !bytes.Equal(g.Payload, w.Payload) {
			t.Errorf("frame %d: got %+v, want %+v", i, g, w)
		}
	}
}

func TestLinkWaitsForHost(t *testing.T) {
	l := newLink()
	w := proto.NewWriter(l)
	f := proto.Frame{Kind: proto.KindStdout, Stream: 1, Payload: []byte("early")}
	done := make(chan error, 1)
	go func() { done <- w.Write(f) }()
	select {
	case err := <-done:
		t.Fatalf("write with no host returned %v", err)
	case <-time.After(30 * time.Millisecond):
	}
	c := &fakeConn{}
	if old := l.attach(&hostConn{rw: c}); old != nil {
		t.Fatalf("attach replaced %v", old)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	wantFrames(t, c.frames(t), f)
}

func TestLinkByteAtATime(t *testing.T) {
	l := newLink()
	c := &fakeConn{}
	l.attach(&hostConn{rw: c})
	fs := []proto.Frame{
		{Kind: proto.KindStart, Stream: 1, Seq: 7},
		{Kind: proto.KindStdout, Stream: 2, Payload: []byte("abc")},
		{Kind: proto.KindReply, Stream: 2, Seq: 8, Payload: []byte("{}")},
	}
	var all []byte
	for _, f := range fs {
		all = append(all, encode(f)...)
	}
	for i := range all {
		if n, err := l.Write(all[i : i+1]); n != 1 || err != nil {
			t.Fatalf("byte %d: %d, %v", i, n, err)
		}
	}
	wantFrames(t, c.frames(t), fs...)
}

// A frame is not split between connections.
func TestLinkReplacedMidFrame(t *testing.T) {
	l := newLink()
	w := proto.NewWriter(l)
	a, b := &fakeConn{}, &fakeConn{}
	ha := &hostConn{rw: a}
	l.attach(ha)
	first := proto.Frame{Kind: proto.KindStdout, Stream: 1, Payload: []byte("split me")}
	enc := encode(first)
	if _, err := l.Write(enc[:proto.HeaderSize]); err != nil {
		t.Fatal(err)
	}
	if old := l.attach(&hostConn{rw: b}); old != ha {
		t.Fatalf("attach replaced %v, want the first connection", old)
	}
	l.detach(ha)
	if !a.isClosed() {
		t.Error("replaced connection not closed")
	}
	if n, err := l.Write(enc[proto.HeaderSize:]); n != len(enc)-proto.HeaderSize || err != nil {
		t.Fatalf("rest of the frame: %d, %v", n, err)
	}
	second := proto.Frame{Kind: proto.KindStderr, Stream: 1, Payload: []byte("whole")}
	if err := w.Write(second); err != nil {
		t.Fatal(err)
	}
	wantFrames(t, b.frames(t), second)
}

// A connection that fails mid-frame is dropped with the rest of the frame;
// the next frame waits for the next connection.
func TestLinkWriteFails(t *testing.T) {
	l := newLink()
	w := proto.NewWriter(l)
	a := &fakeConn{failAfter: 1} // the header goes, the payload fails
	l.attach(&hostConn{rw: a})
	if err := w.Write(proto.Frame{Kind: proto.KindStdout, Stream: 1, Payload: []byte("lost")}); err != nil {
		t.Fatalf("write to a failing host: %v", err)
	}
	if !a.isClosed() {
		t.Error("failed connection not closed")
	}
	next := proto.Frame{Kind: proto.KindExit, Stream: 1, Payload: []byte(`{"status":0}`)}
	done := make(chan error, 1)
	go func() { done <- w.Write(next) }()
	select {
	case err := <-done:
		t.Fatalf("write after the host failed returned %v before a new host", err)
	case <-time.After(30 * time.Millisecond):
	}
	b := &fakeConn{}
	if old := l.attach(&hostConn{rw: b}); old != nil {
		t.Fatalf("failed connection still attached")
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	wantFrames(t, b.frames(t), next)
}

// testHost is the host end of one connection.
type testHost struct {
	t    *testing.T
	conn net.Conn
	w    *proto.Writer
	r    *proto.Reader
}

func dialHost(t *testing.T, path string) *testHost {
	t.Helper()
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &testHost{t: t, conn: conn, w: proto.NewWriter(conn), r: proto.NewReader(conn)}
}

func (h *testHost) read() (proto.Frame, error) {
	_ = h.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	return h.r.Read()
}

// hello sends a Hello and returns its Reply, skipping log frames.
func (h *testHost) hello(seq uint32, version int) proto.Reply {
	h.t.Helper()
	if err := h.w.WriteJSON(proto.KindHello, 0, seq, proto.Hello{Version: version}); err != nil {
		h.t.Fatal(err)
	}
	for {
		f, err := h.read()
		if err != nil {
			h.t.Fatalf("waiting for the reply to hello %d: %v", seq, err)
		}
		if f.Kind == proto.KindLog {
			continue
		}
		if f.Kind != proto.KindReply || f.Seq != seq {
			h.t.Fatalf("got %s seq %d, want the reply to %d", f.Kind, f.Seq, seq)
		}
		var r proto.Reply
		if err := json.Unmarshal(f.Payload, &r); err != nil {
			h.t.Fatal(err)
		}
		return r
	}
}

// wantClosed waits until the agent has closed the connection.
func (h *testHost) wantClosed() {
	h.t.Helper()
	for {
		f, err := h.read()
		if err == nil {
			if f.Kind == proto.KindLog {
				continue
			}
			h.t.Fatalf("got %s, want the connection closed", f.Kind)
		}
		if !errors.Is(err, io.EOF) {
			h.t.Fatalf("got %v, want EOF", err)
		}
		return
	}
}

// TestServeConnections runs the accept side over a unix socket in place of
// vsock: same accept, same serving, as many hosts in turn as come.
func TestServeConnections(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.sock")
	lfd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(lfd)
	if err := unix.Bind(lfd, &unix.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(lfd, 4); err != nil {
		t.Fatal(err)
	}
	a := &agent{modulesDone: make(chan struct{}), procs: make(map[uint32]*process)}
	a.blockCacheClean.Store(true) // hello flushes no disk of this machine
	l := newLink()
	a.w = proto.NewWriter(l)
	accept := func() {
		t.Helper()
		f, err := acceptFile(lfd)
		if err != nil {
			t.Fatal(err)
		}
		a.serveNew(l, &hostConn{rw: f})
	}

	h1 := dialHost(t, path)
	accept()
	if r := h1.hello(1, proto.Version); r.Error != "" || r.Version != proto.Version {
		t.Fatalf("hello: %+v", r)
	}
	if r := h1.hello(2, proto.Version+1); r.Error == "" {
		t.Fatalf("hello with another version: %+v", r)
	}

	// The host goes; what the agent says meanwhile waits for the next one.
	h1.conn.Close()
	deadline := time.Now().Add(5 * time.Second)
	for !l.current(nil) {
		if time.Now().After(deadline) {
			t.Fatal("the agent did not notice the host closing")
		}
		time.Sleep(time.Millisecond)
	}
	logged := make(chan struct{})
	go func() { a.logf("while no host is connected"); close(logged) }()
	select {
	case <-logged:
		t.Fatal("log frame written with no host")
	case <-time.After(30 * time.Millisecond):
	}
	h2 := dialHost(t, path)
	accept()
	f, err := h2.read()
	if err != nil || f.Kind != proto.KindLog || string(f.Payload) != "while no host is connected" {
		t.Fatalf("first frame of the new host: %+v, %v", f, err)
	}
	<-logged
	if r := h2.hello(3, proto.Version); r.Error != "" {
		t.Fatalf("hello on the second connection: %+v", r)
	}

	// A new connection replaces the open one.
	h3 := dialHost(t, path)
	accept()
	h2.wantClosed()
	if r := h3.hello(4, proto.Version); r.Error != "" {
		t.Fatalf("hello on the third connection: %+v", r)
	}

	// A broken stream ends its connection.
	hdr := make([]byte, proto.HeaderSize)
	hdr[0] = byte(proto.KindHello)
	hdr[9], hdr[10] = 0xff, 0xff // far above MaxPayload
	if _, err := h3.conn.Write(hdr); err != nil {
		t.Fatal(err)
	}
	h3.wantClosed()

	h4 := dialHost(t, path)
	accept()
	if r := h4.hello(5, proto.Version); r.Error != "" {
		t.Fatalf("hello on the fourth connection: %+v", r)
	}
}
