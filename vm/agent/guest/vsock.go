package guest

import (
	"encoding/binary"
	"errors"
	"io"
	"os"
	"sync"
	"time"

	"github.com/rund-dev/rund/vm/agent/proto"
	"golang.org/x/sys/unix"
)

// Over vsock the host connects to the agent, and connects anew after a
// disconnect (a template is snapshotted with no connection open; each clone's
// shim then connects to its own copy). The agent serves one connection at a
// time, and the newest wins: a connection accepted while another is open
// replaces it. A host only connects anew when its old connection is gone,
// but the agent may not know yet: a clone restored from a snapshot taken
// before the guest saw its template's host close would otherwise keep
// waiting on a connection that no longer exists.
//
// Frames are written through a link that outlives the connections, as they
// outlive a virtio-serial port's host: a frame started while no host is
// connected waits for the next one, as a write to an unconnected port does.
// A frame is never split between two connections: what is left of a frame
// when its connection fails is dropped, and the next frame goes whole to the
// next connection.

// hostConn is one accepted connection.
type hostConn struct {
	rw   io.ReadWriteCloser
	once sync.Once
}

// link is the host end of the frames the agent writes (an io.Writer under
// a proto.Writer), switched from connection to connection.
type link struct {
	mu   sync.Mutex
	cond *sync.Cond
	cur  *hostConn // nil while no host is connected

	// Written only under wmu (Write is called for whole frames, header
	// then payload, by proto.Writer; these follow the frame boundaries
	// whatever the calls).
	wmu   sync.Mutex
	to    *hostConn // connection the current frame goes to; nil: dropping it
	hdr   [proto.HeaderSize]byte
	nhdr  int    // header bytes of the current frame seen
	left  uint32 // payload bytes of the current frame still to come
	inMid bool   // inside a frame
}

func newLink() *link {
	l := &link{}
	l.cond = sync.NewCond(&l.mu)
	return l
}

// attach makes c the connection frames go to, and returns the one it
// replaces (nil if none).
func (l *link) attach(c *hostConn) *hostConn {
	l.mu.Lock()
	old := l.cur
	l.cur = c
	l.mu.Unlock()
	l.cond.Broadcast()
	return old
}

// detach lets go of c, if it is still the current connection, and closes it.
func (l *link) detach(c *hostConn) {
	l.mu.Lock()
	if l.cur == c {
		l.cur = nil
	}
	l.mu.Unlock()
	c.once.Do(func() { c.rw.Close() })
}

// waitConn returns the current connection, waiting for one.
func (l *link) waitConn() *hostConn {
	l.mu.Lock()
	defer l.mu.Unlock()
	for l.cur == nil {
		l.cond.Wait()
	}
	return l.cur
}

// current reports whether c is still the current connection.
func (l *link) current(c *hostConn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.cur == c
}

// Write sends b, a part of the frame stream, to the connection its frame
// started on. It reports no errors: a frame that cannot be sent is dropped.
func (l *link) Write(b []byte) (int, error) {
	l.wmu.Lock()
	defer l.wmu.Unlock()
	n := len(b)
	for len(b) > 0 {
		if !l.inMid {
			l.to = l.waitConn()
			l.inMid = true
		}
		// The part of b that belongs to the current header or payload.
		k := len(b)
		if l.nhdr < proto.HeaderSize {
			k = min(k, proto.HeaderSize-l.nhdr)
		} else {
			k = min(k, int(l.left))
		}
		if l.to != nil {
			if !l.current(l.to) {
				l.to = nil // replaced mid-frame: drop the rest
			} else if _, err := l.to.rw.Write(b[:k]); err != nil {
				consolef("rund-agent: writing to the host: %v", err)
				l.detach(l.to)
				l.to = nil
			}
		}
		if l.nhdr < proto.HeaderSize {
			copy(l.hdr[l.nhdr:], b[:k])
			l.nhdr += k
			if l.nhdr == proto.HeaderSize {
				l.left = binary.BigEndian.Uint32(l.hdr[9:13])
			}
		} else {
			l.left -= uint32(k)
		}
		if l.nhdr == proto.HeaderSize && l.left == 0 {
			l.nhdr, l.inMid, l.to = 0, false, nil
		}
		b = b[k:]
	}
	return n, nil
}

// serveListener accepts the host's connections on the listening socket fd
// and serves each until the next one replaces it, forever.
func (a *agent) serveListener(fd int) {
	l := newLink()
	a.w = proto.NewWriter(l)
	for {
		f, err := acceptFile(fd)
		if err != nil {
			consolef("rund-agent: accepting the host: %v", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		a.serveNew(l, &hostConn{rw: f})
	}
}

// serveNew makes c the host's connection, closing the one it replaces, and
// reads it in its own goroutine (a reply written after c failed waits there
// for the next connection, accepted by the caller).
func (a *agent) serveNew(l *link, c *hostConn) {
	if old := l.attach(c); old != nil {
		consolef("rund-agent: a new host connection replaces the open one")
		l.detach(old)
	}
	go a.serveConn(l, c)
}

// acceptFile accepts one connection on the listening socket fd.
func acceptFile(fd int) (*os.File, error) {
	for {
		nfd, _, err := unix.Accept4(fd, unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK)
		if errors.Is(err, unix.EINTR) || errors.Is(err, unix.ECONNABORTED) {
			continue
		}
		if err != nil {
			return nil, err
		}
		// Non-blocking: the runtime poller serves it, and Close
		// interrupts a pending Read.
		return os.NewFile(uintptr(nfd), "host"), nil
	}
}

// serveConn reads frames from c until the host goes or the stream breaks
// (there is no resynchronising a byte stream; the host reconnects).
func (a *agent) serveConn(l *link, c *hostConn) {
	defer l.detach(c)
	r := proto.NewReader(c.rw)
	for {
		f, err := r.Read()
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, os.ErrClosed) {
				consolef("rund-agent: reading frame: %v", err)
			}
			return
		}
		a.dispatch(f)
	}
}
