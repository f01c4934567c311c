package container

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"time"

	"github.com/rund-dev/rund/internal/shimapi"
)

// dialShim connects to a container's shim control socket.
func dialShim(ctx context.Context, root, id string) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", filepath.Join(vmDirOf(root, id), shimapi.SocketFile))
	if err != nil {
		return nil, fmt.Errorf("connecting to shim of %s: %w", id, err)
	}
	return c, nil
}

// callShim sends one request and reads its response.
func callShim(ctx context.Context, root, id string, req shimapi.Request) (shimapi.Response, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	c, err := dialShim(ctx, root, id)
	if err != nil {
		return shimapi.Response{}, err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	resp, _, err := roundTrip(c, req)
	return resp, err
}

// roundTrip writes req on c and reads the response line; the returned reader
// holds whatever followed it.
func roundTrip(c net.Conn, req shimapi.Request) (shimapi.Response, *bufio.Reader, error) {
	b, err := json.Marshal(req)
	if err != nil {
		return shimapi.Response{}, nil, fmt.Errorf("encoding %s request: %w", req.Op, err)
	}
	if _, err := c.Write(append(b, '\n')); err != nil {
		return shimapi.Response{}, nil, fmt.Errorf("sending %s to shim: %w", req.Op, err)
	}
	br := bufio.NewReader(c)
	line, err := br.ReadBytes('\n')
	if err != nil {
		return shimapi.Response{}, nil, fmt.Errorf("reading shim's answer to %s: %w", req.Op, err)
	}
	var resp shimapi.Response
	if err := json.Unmarshal(line, &resp); err != nil {
		return resp, nil, fmt.Errorf("decoding shim's answer to %s: %w", req.Op, err)
	}
	if resp.Error != "" {
		return resp, br, errors.New(resp.Error)
	}
	return resp, br, nil
}
