package cloudhypervisor

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/rund-dev/rund/vm/agent/proto"
)

// AgentPort is the guest vsock port the rund agent listens on for the host's
// channel (vm/agent/proto frames). The host connects to it; the guest never
// dials out.
const AgentPort = proto.VsockPort

// vsockCID is the guest's vsock context id. Cloud Hypervisor's vsock is a
// per-VMM userspace bridge, so every VM can use the lowest guest CID.
const vsockCID = 3

// handshakeTimeout bounds one CONNECT attempt. The VMM itself gives up on a
// guest that does not answer after 2 s.
const handshakeTimeout = 3 * time.Second

// maxReplyLine bounds the VMM's "OK <port>\n" reply.
const maxReplyLine = 32

// DialVsock opens a host-initiated hybrid vsock connection to port in the
// guest behind socket (the vsock device's unix socket): it sends
// "CONNECT <port>\n" and expects "OK <host port>\n", after which the
// connection carries raw bytes. Until the guest listens, the VMM closes the
// connection without an OK; DialVsock retries with backoff until ctx is done.
func DialVsock(ctx context.Context, socket string, port uint32) (net.Conn, error) {
	backoff := 5 * time.Millisecond
	var last error
	for {
		conn, err := connectVsock(ctx, socket, port)
		if err == nil {
			return conn, nil
		}
		last = err
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("dialing guest vsock port %d on %s: %w: %w", port, socket, ctx.Err(), last)
		case <-time.After(backoff):
		}
		if backoff < 200*time.Millisecond {
			backoff *= 2
		}
	}
}

// connectVsock makes one attempt.
func connectVsock(ctx context.Context, socket string, port uint32) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(handshakeTimeout)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	_ = conn.SetDeadline(deadline)
	if _, err := fmt.Fprintf(conn, "CONNECT %d\n", port); err != nil {
		conn.Close()
		return nil, fmt.Errorf("sending CONNECT: %w", err)
	}
	line, err := readLine(conn)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("reading CONNECT reply: %w", err)
	}
	if err := parseOK(line); err != nil {
		conn.Close()
		return nil, err
	}
	_ = conn.SetDeadline(time.Time{})
	return conn, nil
}

// readLine reads up to '\n' one byte at a time, so that no byte of the guest's
// stream that follows the reply is consumed.
func readLine(conn net.Conn) (string, error) {
	var b [1]byte
	var line []byte
	for len(line) < maxReplyLine {
		if _, err := conn.Read(b[:]); err != nil {
			return "", err
		}
		if b[0] == '\n' {
			return string(line), nil
		}
		line = append(line, b[0])
	}
	return "", errors.New("reply line too long")
}

func parseOK(line string) error {
	f := strings.Fields(line)
	if len(f) != 2 || !strings.EqualFold(f[0], "OK") {
		return fmt.Errorf("unexpected CONNECT reply %q", line)
	}
	if _, err := strconv.ParseUint(f[1], 10, 32); err != nil {
		return fmt.Errorf("unexpected CONNECT reply %q", line)
	}
	return nil
}
