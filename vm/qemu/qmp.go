package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// errQMPClosed means the QMP connection is gone (usually: QEMU exited).
var errQMPClosed = errors.New("qmp connection closed")

// QMPError is an error QEMU returned for a QMP command.
type QMPError struct {
	Command string `json:"-"`
	Class   string `json:"class"`
	Desc    string `json:"desc"`
}

func (e *QMPError) Error() string {
	return fmt.Sprintf("qmp %s: %s: %s", e.Command, e.Class, e.Desc)
}

// qmpMessage is any message QEMU sends: a greeting, a command's return or
// error, or an event.
type qmpMessage struct {
	QMP    *qmpGreeting    `json:"QMP,omitempty"`
	ID     string          `json:"id,omitempty"`
	Return json.RawMessage `json:"return,omitempty"`
	Error  *QMPError       `json:"error,omitempty"`
	Event  string          `json:"event,omitempty"`
	Data   json.RawMessage `json:"data,omitempty"`
}

type qmpGreeting struct {
	Version struct {
		QEMU struct {
			Major int `json:"major"`
			Minor int `json:"minor"`
			Micro int `json:"micro"`
		} `json:"qemu"`
		Package string `json:"package"`
	} `json:"version"`
}

// qmpEvent is an asynchronous QMP event.
type qmpEvent struct {
	Name string
	Data json.RawMessage
}

// qmpClient is a minimal QMP client: one connection, commands matched to
// replies by id, events fanned out to subscribers. Every call takes a ctx.
type qmpClient struct {
	conn *net.UnixConn
	wmu  sync.Mutex // serialises writes

	mu      sync.Mutex
	nextID  uint64
	pending map[string]chan qmpMessage
	subs    map[*qmpSub]struct{}
	err     error         // why the reader stopped
	done    chan struct{} // closed when the reader stops

	greeting qmpGreeting
}

// newQMP reads QEMU's greeting on conn and negotiates capabilities. On error
// it closes conn.
func newQMP(ctx context.Context, conn *net.UnixConn) (*qmpClient, error) {
	c := &qmpClient{
		conn:    conn,
		pending: make(map[string]chan qmpMessage),
		subs:    make(map[*qmpSub]struct{}),
		done:    make(chan struct{}),
	}
	dec := json.NewDecoder(conn)
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Unix(1, 0)) })
	var g qmpMessage
	err := dec.Decode(&g)
	if !stop() {
		err = errors.Join(ctx.Err(), err)
	} else if err != nil {
		err = fmt.Errorf("%w: %w", errQMPClosed, err)
	}
	if err == nil && g.QMP == nil {
		err = fmt.Errorf("unexpected first message %+v", g)
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("reading qmp greeting: %w", err)
	}
	conn.SetReadDeadline(time.Time{})
	c.greeting = *g.QMP
	go c.read(dec)
	if err := c.execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// read dispatches QEMU's messages until the connection fails.
func (c *qmpClient) read(dec *json.Decoder) {
	var err error
	for {
		var m qmpMessage
		if err = dec.Decode(&m); err != nil {
			break
		}
		c.mu.Lock()
		switch {
		case m.Event != "":
			for s := range c.subs {
				s.deliver(qmpEvent{Name: m.Event, Data: m.Data})
			}
		case m.ID != "":
			if ch, ok := c.pending[m.ID]; ok {
				delete(c.pending, m.ID)
				ch <- m
			}
		}
		c.mu.Unlock()
	}
	c.mu.Lock()
	c.err = fmt.Errorf("%w: %w", errQMPClosed, err)
	close(c.done)
	c.mu.Unlock()
}

// Close closes the connection.
func (c *qmpClient) Close() error {
	return c.conn.Close()
}

// closedErr returns why the reader stopped.
func (c *qmpClient) closedErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// execute runs cmd with args (nil: none) and decodes its return value into
// result (nil: ignored).
func (c *qmpClient) execute(ctx context.Context, cmd string, args, result any) error {
	return c.executeWithFile(ctx, cmd, args, result, nil)
}

// executeWithFile is execute passing f to QEMU with the command (SCM_RIGHTS),
// as getfd and add-fd expect.
func (c *qmpClient) executeWithFile(ctx context.Context, cmd string, args, result any, f *os.File) error {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return fmt.Errorf("qmp %s: %w", cmd, c.err)
	}
	c.nextID++
	id := strconv.FormatUint(c.nextID, 10)
	ch := make(chan qmpMessage, 1)
	c.pending[id] = ch
	c.mu.Unlock()
	forget := func() {
		c.mu.Lock()
		delete(c.pending, id)
		c.mu.Unlock()
	}

	req := struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        string `json:"id"`
	}{cmd, args, id}
	b, err := json.Marshal(req)
	if err != nil {
		forget()
		return fmt.Errorf("qmp %s: encoding arguments: %w", cmd, err)
	}
	if err := c.write(ctx, b, f); err != nil {
		forget()
		if ctx.Err() != nil {
			return fmt.Errorf("qmp %s: %w", cmd, ctx.Err())
		}
		// A socket that cannot be written to is as good as closed.
		return fmt.Errorf("qmp %s: %w: %w", cmd, errQMPClosed, err)
	}
	select {
	case m := <-ch:
		if m.Error != nil {
			m.Error.Command = cmd
			return m.Error
		}
		if result != nil {
			if err := json.Unmarshal(m.Return, result); err != nil {
				return fmt.Errorf("qmp %s: decoding reply: %w", cmd, err)
			}
		}
		return nil
	case <-ctx.Done():
		forget()
		return fmt.Errorf("qmp %s: %w", cmd, ctx.Err())
	case <-c.done:
		return fmt.Errorf("qmp %s: %w", cmd, c.closedErr())
	}
}

// write sends one command line, with f's descriptor attached when f is set.
func (c *qmpClient) write(ctx context.Context, b []byte, f *os.File) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	stop := context.AfterFunc(ctx, func() { c.conn.SetWriteDeadline(time.Unix(1, 0)) })
	defer func() {
		if stop() {
			c.conn.SetWriteDeadline(time.Time{})
		}
	}()
	b = append(b, '\n')
	if f != nil {
		// The descriptor travels with the first byte of the command, so
		// QEMU sees it when it parses this command.
		n, _, err := c.conn.WriteMsgUnix(b, unix.UnixRights(int(f.Fd())), nil)
		if err != nil {
			return err
		}
		b = b[n:]
	}
	_, err := c.conn.Write(b)
	return err
}

// qmpSub receives the events QEMU sends after subscribe. Subscribe before
// issuing the command whose event you wait for.
type qmpSub struct {
	c  *qmpClient
	ch chan qmpEvent
}

// subscribe starts collecting events. The caller must call cancel.
func (c *qmpClient) subscribe() *qmpSub {
	s := &qmpSub{c: c, ch: make(chan qmpEvent, 64)}
	c.mu.Lock()
	c.subs[s] = struct{}{}
	c.mu.Unlock()
	return s
}

// deliver queues e without blocking the reader; a subscriber that lets 64
// events pile up loses the newest ones.
//
// Preconditions: c.mu is held.
func (s *qmpSub) deliver(e qmpEvent) {
	select {
	case s.ch <- e:
	default:
	}
}

func (s *qmpSub) cancel() {
	s.c.mu.Lock()
	delete(s.c.subs, s)
	s.c.mu.Unlock()
}

// wait returns the first event for which match returns true.
func (s *qmpSub) wait(ctx context.Context, match func(qmpEvent) bool) (qmpEvent, error) {
	for {
		select {
		case e := <-s.ch:
			if match(e) {
				return e, nil
			}
		case <-ctx.Done():
			return qmpEvent{}, ctx.Err()
		case <-s.c.done:
			// Events that arrived before the connection closed count.
			select {
			case e := <-s.ch:
				if match(e) {
					return e, nil
				}
				continue
			default:
			}
			return qmpEvent{}, s.c.closedErr()
		}
	}
}

// eventNamed matches events called name.
func eventNamed(name string) func(qmpEvent) bool {
	return func(e qmpEvent) bool { return e.Name == name }
}

// The typed commands rund uses.

type qmpStatus struct {
	Running bool   `json:"running"`
	Status  string `json:"status"`
}

func (c *qmpClient) queryStatus(ctx context.Context) (qmpStatus, error) {
	var s qmpStatus
	err := c.execute(ctx, "query-status", nil, &s)
	return s, err
}

type migrationCapability struct {
	Capability string `json:"capability"`
	State      bool   `json:"state"`
}

// setMigrationCapabilities turns on each named capability.
func (c *qmpClient) setMigrationCapabilities(ctx context.Context, names ...string) error {
	caps := make([]migrationCapability, len(names))
	for i, n := range names {
		caps[i] = migrationCapability{Capability: n, State: true}
	}
	return c.execute(ctx, "migrate-set-capabilities",
		map[string]any{"capabilities": caps}, nil)
}

type migrationInfo struct {
	Status    string `json:"status"`
	ErrorDesc string `json:"error-desc"`
}

func (c *qmpClient) queryMigrate(ctx context.Context) (migrationInfo, error) {
	var mi migrationInfo
	err := c.execute(ctx, "query-migrate", nil, &mi)
	return mi, err
}

// migrationStatus decodes a MIGRATION event's status.
func migrationStatus(e qmpEvent) string {
	var d struct {
		Status string `json:"status"`
	}
	if e.Name != "MIGRATION" || json.Unmarshal(e.Data, &d) != nil {
		return ""
	}
	return d.Status
}

// migrationEnded matches the MIGRATION events after which nothing more
// happens: completed, failed or cancelled.
func migrationEnded(e qmpEvent) bool {
	switch migrationStatus(e) {
	case "completed", "failed", "cancelled":
		return true
	}
	return false
}
