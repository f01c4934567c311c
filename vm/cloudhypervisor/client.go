package cloudhypervisor

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/rund-dev/rund/vm"
)

// Default per-call deadlines, applied on top of the caller's context (the
// earlier of the two wins). Cloud Hypervisor serves one request at a time, so
// a slow call also delays the ones queued behind it.
const (
	quickTimeout    = 2 * time.Second  // ping, info, pause, resume, delete, shutdown
	bootTimeout     = 30 * time.Second // create, boot
	hotplugTimeout  = 5 * time.Second  // add-*, remove-device
	snapshotTimeout = 60 * time.Second // snapshot, restore (may copy all of RAM)
)

// maxErrorBody bounds how much of an error response is read.
const maxErrorBody = 64 << 10

// APIError is a non-2xx answer from the Cloud Hypervisor API. Messages is the
// error chain from outermost to root cause (a JSON array of strings since
// v47), or the plain-text body as a single entry on older versions.
type APIError struct {
	Method     string
	Endpoint   string
	StatusCode int
	Messages   []string
}

func (e *APIError) Error() string {
	msg := fmt.Sprintf("cloud-hypervisor %s %s: %d %s", e.Method, e.Endpoint, e.StatusCode, http.StatusText(e.StatusCode))
	if len(e.Messages) > 0 {
		msg += ": " + strings.Join(e.Messages, ": ")
	}
	return msg
}

// Client is a minimal typed client of the Cloud Hypervisor REST API on a unix
// socket. Every call carries a deadline. It is safe for concurrent use; the
// VMM serialises requests itself.
type Client struct {
	socket string
	hc     *http.Client
	// exited, when set, is closed once the VMM process is gone; transport
	// errors seen after that are reported as vm.ErrExited.
	exited <-chan struct{}
}

// NewClient returns a client of the API socket at path.
func NewClient(path string) *Client {
	c := &Client{socket: path}
	c.hc = &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", c.socket)
		},
		// One connection per call: a VMM that died leaves no stale idle
		// connection behind, and the VMM's limit of 10 is never reached.
		DisableKeepAlives: true,
	}}
	return c
}

// Socket is the API socket's path.
func (c *Client) Socket() string { return c.socket }

// Ping asks the VMM for its version; it answers as soon as the API is up.
func (c *Client) Ping(ctx context.Context) (PingResponse, error) {
	var p PingResponse
	err := c.do(ctx, quickTimeout, http.MethodGet, "vmm.ping", nil, &p)
	return p, err
}

// CreateVM stores the VM's configuration; nothing runs until BootVM.
func (c *Client) CreateVM(ctx context.Context, cfg VMConfig) error {
	return c.do(ctx, bootTimeout, http.MethodPut, "vm.create", &cfg, nil)
}

// BootVM starts a created VM's vCPUs.
func (c *Client) BootVM(ctx context.Context) error {
	return c.do(ctx, bootTimeout, http.MethodPut, "vm.boot", nil, nil)
}

// PauseVM stops the vCPUs.
func (c *Client) PauseVM(ctx context.Context) error {
	return c.do(ctx, quickTimeout, http.MethodPut, "vm.pause", nil, nil)
}

// ResumeVM restarts the vCPUs of a paused (or freshly restored) VM.
func (c *Client) ResumeVM(ctx context.Context) error {
	return c.do(ctx, quickTimeout, http.MethodPut, "vm.resume", nil, nil)
}

// SnapshotVM saves a paused VM into dir, which must exist and be empty.
func (c *Client) SnapshotVM(ctx context.Context, dir string) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("snapshot directory %s: %w", dir, err)
	}
	body := SnapshotConfig{DestinationURL: "file://" + abs}
	return c.do(ctx, snapshotTimeout, http.MethodPut, "vm.snapshot", &body, nil)
}

// RestoreVM loads a snapshot into a fresh VMM; the VM ends Paused.
func (c *Client) RestoreVM(ctx context.Context, rc RestoreConfig) error {
	return c.do(ctx, snapshotTimeout, http.MethodPut, "vm.restore", &rc, nil)
}

// ShutdownVM stops the VM; the VMM keeps its configuration (state Created).
func (c *Client) ShutdownVM(ctx context.Context) error {
	return c.do(ctx, quickTimeout, http.MethodPut, "vm.shutdown", nil, nil)
}

// DeleteVM drops the VM's configuration; a no-op when there is none.
func (c *Client) DeleteVM(ctx context.Context) error {
	return c.do(ctx, quickTimeout, http.MethodPut, "vm.delete", nil, nil)
}

// ShutdownVMM makes the VMM process exit. The connection closing before an
// answer arrives counts as success: the process may be gone already.
func (c *Client) ShutdownVMM(ctx context.Context) error {
	err := c.do(ctx, quickTimeout, http.MethodPut, "vmm.shutdown", nil, nil)
	var apiErr *APIError
	if err == nil || errors.As(err, &apiErr) {
		return err
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) {
		return nil
	}
	return err
}

// Info returns the VM's configuration (with the VMM's defaults filled in)
// and state.
func (c *Client) Info(ctx context.Context) (VMInfo, error) {
	var info VMInfo
	err := c.do(ctx, quickTimeout, http.MethodGet, "vm.info", nil, &info)
	return info, err
}

// AddDisk hot-adds a disk. On a VM that is only created the VMM answers with
// no body and the returned info is empty.
func (c *Client) AddDisk(ctx context.Context, d DiskConfig) (PciDeviceInfo, error) {
	var info PciDeviceInfo
	err := c.do(ctx, hotplugTimeout, http.MethodPut, "vm.add-disk", &d, &info)
	return info, err
}

// AddPmem hot-adds a virtio-pmem device.
func (c *Client) AddPmem(ctx context.Context, p PmemConfig) (PciDeviceInfo, error) {
	var info PciDeviceInfo
	err := c.do(ctx, hotplugTimeout, http.MethodPut, "vm.add-pmem", &p, &info)
	return info, err
}

// AddFs hot-adds a virtio-fs device (the VM's memory must be shared).
func (c *Client) AddFs(ctx context.Context, f FsConfig) (PciDeviceInfo, error) {
	var info PciDeviceInfo
	err := c.do(ctx, hotplugTimeout, http.MethodPut, "vm.add-fs", &f, &info)
	return info, err
}

// AddVsock hot-adds the VM's vsock device.
func (c *Client) AddVsock(ctx context.Context, v VsockConfig) (PciDeviceInfo, error) {
	var info PciDeviceInfo
	err := c.do(ctx, hotplugTimeout, http.MethodPut, "vm.add-vsock", &v, &info)
	return info, err
}

// AddNet hot-adds a NIC. With taps (open TAP queue fds), the fds travel with
// the request as SCM_RIGHTS and n's Tap is left unset.
func (c *Client) AddNet(ctx context.Context, n NetConfig, taps ...*os.File) (PciDeviceInfo, error) {
	var info PciDeviceInfo
	if len(taps) == 0 {
		err := c.do(ctx, hotplugTimeout, http.MethodPut, "vm.add-net", &n, &info)
		return info, err
	}
	err := c.doWithFiles(ctx, hotplugTimeout, "vm.add-net", &n, taps, &info)
	return info, err
}

// RemoveDevice asks the guest to eject a device. It is asynchronous: the
// device and its host file go only when the guest acknowledges.
func (c *Client) RemoveDevice(ctx context.Context, id string) error {
	body := RemoveDeviceRequest{ID: id}
	return c.do(ctx, hotplugTimeout, http.MethodPut, "vm.remove-device", &body, nil)
}

// do sends one request and decodes a 200 body into out (when out is set).
func (c *Client) do(ctx context.Context, timeout time.Duration, method, endpoint string, in, out any) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	// A bytes.Reader gives the request a Content-Length: the VMM reads a
	// chunked body as empty. No body at all is sent as Content-Length: 0.
	var body io.Reader = http.NoBody
	if in != nil {
		payload, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("encoding %s request: %w", endpoint, err)
		}
		body = bytes.NewReader(payload)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost/api/v1/"+endpoint, body)
	if err != nil {
		return fmt.Errorf("cloud-hypervisor %s %s: %w", method, endpoint, err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.hc.Do(req)
	if err != nil {
		return c.transportError(method, endpoint, err)
	}
	defer resp.Body.Close()
	return readResponse(resp, method, endpoint, out)
}

// doWithFiles sends a PUT whose bytes and fds go in one sendmsg, as the VMM
// takes SCM_RIGHTS only from the message carrying the request.
func (c *Client) doWithFiles(ctx context.Context, timeout time.Duration, endpoint string, in any, files []*os.File, out any) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	payload, err := json.Marshal(in)
	if err != nil {
		return fmt.Errorf("encoding %s request: %w", endpoint, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, "http://localhost/api/v1/"+endpoint, bytes.NewReader(payload))
	if err != nil {
		return fmt.Errorf("cloud-hypervisor PUT %s: %w", endpoint, err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	req.Close = true
	var raw bytes.Buffer
	if err := req.Write(&raw); err != nil {
		return fmt.Errorf("cloud-hypervisor PUT %s: %w", endpoint, err)
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.socket)
	if err != nil {
		return c.transportError(http.MethodPut, endpoint, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	fds := make([]int, len(files))
	for i, f := range files {
		fds[i] = int(f.Fd())
	}
	uc := conn.(*net.UnixConn)
	if _, _, err := uc.WriteMsgUnix(raw.Bytes(), syscall.UnixRights(fds...), nil); err != nil {
		return c.transportError(http.MethodPut, endpoint, err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(uc), req)
	if err != nil {
		return c.transportError(http.MethodPut, endpoint, err)
	}
	defer resp.Body.Close()
	return readResponse(resp, http.MethodPut, endpoint, out)
}

// transportError wraps an error below HTTP (socket gone, connection reset,
// deadline). If the VMM process has exited, the error also matches
// vm.ErrExited.
func (c *Client) transportError(method, endpoint string, err error) error {
	// net/http wraps errors in a *url.Error that repeats the method and
	// URL; the context added below already names the call.
	var urlErr *url.Error
	if errors.As(err, &urlErr) {
		err = urlErr.Err
	}
	if c.exited != nil {
		select {
		case <-c.exited:
		case <-time.After(50 * time.Millisecond):
			// Give the reaper a moment: the connection usually
			// breaks just before the process is reaped.
		}
		select {
		case <-c.exited:
			return fmt.Errorf("cloud-hypervisor %s %s: %w: %w", method, endpoint, vm.ErrExited, err)
		default:
		}
	}
	return fmt.Errorf("cloud-hypervisor %s %s: %w", method, endpoint, err)
}

func readResponse(resp *http.Response, method, endpoint string, out any) error {
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		if out == nil || resp.StatusCode == http.StatusNoContent {
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxErrorBody))
			return nil
		}
		if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
			return fmt.Errorf("decoding cloud-hypervisor %s reply: %w", endpoint, err)
		}
		return nil
	}
	b, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	return &APIError{Method: method, Endpoint: endpoint, StatusCode: resp.StatusCode, Messages: parseErrorBody(b)}
}

// parseErrorBody reads the VMM's error text: a JSON array of strings (v47+)
// or plain text.
func parseErrorBody(b []byte) []string {
	b = bytes.TrimSpace(b)
	if len(b) == 0 {
		return nil
	}
	var chain []string
	if b[0] == '[' && json.Unmarshal(b, &chain) == nil {
		return chain
	}
	return []string{string(b)}
}
