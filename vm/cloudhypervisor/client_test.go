package cloudhypervisor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// testPayload is a VM config the fake can boot.
func testPayload(t *testing.T, dir string) VMConfig {
	t.Helper()
	kernel := filepath.Join(dir, "vmlinux")
	if err := os.WriteFile(kernel, []byte("kernel"), 0o600); err != nil {
		t.Fatal(err)
	}
	return VMConfig{
		Payload: &PayloadConfig{Kernel: kernel, Cmdline: "console=ttyS0"},
		CPUs:    &CPUsConfig{BootVCPUs: 1, MaxVCPUs: 1},
		Memory:  &MemoryConfig{Size: 128 << 20},
		Serial:  &ConsoleConfig{Mode: ConsoleNull},
		Console: &ConsoleConfig{Mode: ConsoleOff},
	}
}

func emptyFile(t *testing.T, path string, size int64) string {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestClientRequests checks the method, path, body and Content-Length of
// every call rund makes, in one legal sequence.
func TestClientRequests(t *testing.T) {
	f, c := startFake(t, fakeOptions{})
	dir := filepath.Dir(c.Socket())
	ctx := context.Background()
	cfg := testPayload(t, dir)
	disk := emptyFile(t, filepath.Join(dir, "disk.img"), 1<<20)
	pmem := emptyFile(t, filepath.Join(dir, "pmem.img"), 2<<20)
	steps := []struct {
		name     string
		call     func() error
		method   string
		endpoint string
		body     string
	}{
		{"ping", func() error { _, err := c.Ping(ctx); return err }, "GET", "vmm.ping", ""},
		{"create", func() error { return c.CreateVM(ctx, cfg) }, "PUT", "vm.create",
			`{"payload":{"kernel":"` + cfg.Payload.Kernel + `","cmdline":"console=ttyS0"},"cpus":{"boot_vcpus":1,"max_vcpus":1},"memory":{"size":134217728},"serial":{"mode":"Null"},"console":{"mode":"Off"}}`},
		{"boot", func() error { return c.BootVM(ctx) }, "PUT", "vm.boot", ""},
		{"add-disk", func() error {
			_, err := c.AddDisk(ctx, DiskConfig{Path: disk, ID: "rw", Serial: "rw", ImageType: "Raw"})
			return err
		}, "PUT", "vm.add-disk", `{"path":"` + disk + `","id":"rw","serial":"rw","image_type":"Raw"}`},
		{"add-pmem", func() error {
			_, err := c.AddPmem(ctx, PmemConfig{File: pmem, Size: 2 << 20, DiscardWrites: true, ID: "ro"})
			return err
		}, "PUT", "vm.add-pmem", `{"file":"` + pmem + `","size":2097152,"discard_writes":true,"id":"ro"}`},
		{"add-net", func() error { _, err := c.AddNet(ctx, NetConfig{Tap: "tap0", ID: "eth0"}); return err },
			"PUT", "vm.add-net", `{"tap":"tap0","id":"eth0"}`},
		{"remove-device", func() error { return c.RemoveDevice(ctx, "eth0") }, "PUT", "vm.remove-device", `{"id":"eth0"}`},
		{"info", func() error { _, err := c.Info(ctx); return err }, "GET", "vm.info", ""},
		{"pause", func() error { return c.PauseVM(ctx) }, "PUT", "vm.pause", ""},
		{"snapshot", func() error { return c.SnapshotVM(ctx, dir) }, "PUT", "vm.snapshot", `{"destination_url":"file://` + dir + `"}`},
		{"resume", func() error { return c.ResumeVM(ctx) }, "PUT", "vm.resume", ""},
		{"shutdown", func() error { return c.ShutdownVM(ctx) }, "PUT", "vm.shutdown", ""},
		{"delete", func() error { return c.DeleteVM(ctx) }, "PUT", "vm.delete", ""},
		{"vmm.shutdown", func() error { return c.ShutdownVMM(ctx) }, "PUT", "vmm.shutdown", ""},
	}
	for i, s := range steps {
		if err := s.call(); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		reqs := f.requestsSoFar()
		if len(reqs) != i+1 {
			t.Fatalf("%s: %d requests recorded, want %d", s.name, len(reqs), i+1)
		}
		got := reqs[i]
		if got.Method != s.method || got.Endpoint != s.endpoint || got.Body != s.body {
			t.Errorf("%s: got %s %s %s, want %s %s %s", s.name, got.Method, got.Endpoint, got.Body, s.method, s.endpoint, s.body)
		}
		if got.Chunked {
			t.Errorf("%s: body sent chunked", s.name)
		}
		wantLen := fmt.Sprint(len(s.body))
		if s.method == "GET" {
			wantLen = ""
		}
		if got.ContentLength != wantLen {
			t.Errorf("%s: Content-Length %q, want %q", s.name, got.ContentLength, wantLen)
		}
	}
}

func TestClientReplies(t *testing.T) {
	_, c := startFake(t, fakeOptions{version: "48.0.0"})
	dir := filepath.Dir(c.Socket())
	ctx := context.Background()
	p, err := c.Ping(ctx)
	if err != nil || p.Version != "48.0.0" || p.Pid != int64(os.Getpid()) {
		t.Fatalf("got %+v, %v, want version 48.0.0 and our pid", p, err)
	}
	if err := c.CreateVM(ctx, testPayload(t, dir)); err != nil {
		t.Fatal(err)
	}
	// Cold add on a created VM: 204, no device info.
	disk := emptyFile(t, filepath.Join(dir, "cold.img"), 1<<20)
	info, err := c.AddDisk(ctx, DiskConfig{Path: disk})
	if err != nil || info != (PciDeviceInfo{}) {
		t.Fatalf("cold add: got %+v, %v, want empty info", info, err)
	}
	if err := c.BootVM(ctx); err != nil {
		t.Fatal(err)
	}
	// Hot add: 200 with a generated id from the shared counter and a BDF.
	hot := emptyFile(t, filepath.Join(dir, "hot.img"), 1<<20)
	info, err = c.AddDisk(ctx, DiskConfig{Path: hot})
	if err != nil || info.ID != "_disk1" || !strings.HasPrefix(info.BDF, "0000:00:") {
		t.Fatalf("hot add: got %+v, %v, want id _disk1 and a BDF", info, err)
	}
	vi, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if vi.State != StateRunning || len(vi.Config.Disks) != 2 || vi.Config.Disks[0].ID != "_disk0" || vi.MemoryActualSize != 128<<20 {
		t.Errorf("info: got %+v, want Running with disks _disk0 and _disk1", vi)
	}
	if vi.Config.Console == nil || vi.Config.Console.Mode != ConsoleOff {
		t.Errorf("info: console %+v, want Off as sent", vi.Config.Console)
	}
}

// TestClientStateErrors covers the state machine's refusals and the error
// bodies of both API generations.
func TestClientStateErrors(t *testing.T) {
	tests := []struct {
		name       string
		version    string
		setup      func(ctx context.Context, c *Client, dir string) error
		call       func(ctx context.Context, c *Client, dir string) error
		wantStatus int
		wantMsg    []string
	}{
		{name: "boot before create (v52)", version: "52.0.0",
			call:       func(ctx context.Context, c *Client, _ string) error { return c.BootVM(ctx) },
			wantStatus: 500, wantMsg: []string{"Error from API", "The VM is not created"}},
		{name: "boot before create (v53)", version: "53.0.0",
			call:       func(ctx context.Context, c *Client, _ string) error { return c.BootVM(ctx) },
			wantStatus: 404, wantMsg: []string{"Error from API", "The VM is not created"}},
		{name: "plain-text body before v47", version: "46.0.0",
			call:       func(ctx context.Context, c *Client, _ string) error { return c.PauseVM(ctx) },
			wantStatus: 500, wantMsg: []string{"Error from API: The VM is not created"}},
		{name: "create twice",
			setup:      func(ctx context.Context, c *Client, dir string) error { return c.CreateVM(ctx, testPayload(t, dir)) },
			call:       func(ctx context.Context, c *Client, dir string) error { return c.CreateVM(ctx, testPayload(t, dir)) },
			wantStatus: 500, wantMsg: []string{"Error creating VM", "The VM is already created"}},
		{name: "snapshot while running",
			setup:      bootFake,
			call:       func(ctx context.Context, c *Client, dir string) error { return c.SnapshotVM(ctx, dir) },
			wantStatus: 500, wantMsg: []string{"Error snapshotting VM", "VM is not paused"}},
		{name: "snapshot into a missing directory",
			setup: func(ctx context.Context, c *Client, dir string) error {
				if err := bootFake(ctx, c, dir); err != nil {
					return err
				}
				return c.PauseVM(ctx)
			},
			call:       func(ctx context.Context, c *Client, dir string) error { return c.SnapshotVM(ctx, dir+"/nope") },
			wantStatus: 500},
		{name: "restore into a VMM with a VM",
			setup: bootFake,
			call: func(ctx context.Context, c *Client, dir string) error {
				return c.RestoreVM(ctx, RestoreConfig{SourceURL: "file://" + dir})
			},
			wantStatus: 500, wantMsg: []string{"Error restoring VM", "The VM is already created"}},
		{name: "resume a running VM",
			setup:      bootFake,
			call:       func(ctx context.Context, c *Client, _ string) error { return c.ResumeVM(ctx) },
			wantStatus: 500},
		{name: "duplicate device id",
			setup: bootFake,
			call: func(ctx context.Context, c *Client, dir string) error {
				_, err := c.AddPmem(ctx, PmemConfig{File: emptyFile(t, dir+"/p", 2<<20), ID: "vsock0"})
				return err
			},
			wantStatus: 500, wantMsg: []string{"Error adding device", "Duplicated device ID: vsock0"}},
		{name: "reserved device id",
			setup: bootFake,
			call: func(ctx context.Context, c *Client, dir string) error {
				_, err := c.AddDisk(ctx, DiskConfig{Path: emptyFile(t, dir+"/d", 1<<20), ID: "__x"})
				return err
			},
			wantStatus: 500, wantMsg: []string{"Error adding device", "Invalid identifier __x"}},
		{name: "remove an unknown device",
			setup:      bootFake,
			call:       func(ctx context.Context, c *Client, _ string) error { return c.RemoveDevice(ctx, "nope") },
			wantStatus: 500, wantMsg: []string{"Error removing device", "Unknown device identifier: nope"}},
		{name: "virtio-fs without shared memory",
			setup: bootFake,
			call: func(ctx context.Context, c *Client, dir string) error {
				_, err := c.AddFs(ctx, FsConfig{Tag: "t", Socket: dir + "/fs.sock"})
				return err
			},
			wantStatus: 500},
		{name: "second vsock",
			setup: bootFake,
			call: func(ctx context.Context, c *Client, dir string) error {
				_, err := c.AddVsock(ctx, VsockConfig{CID: 3, Socket: dir + "/v2.sock"})
				return err
			},
			wantStatus: 500, wantMsg: []string{"Error adding vsock", "Too many vsock devices"}},
		{name: "disk image missing at boot",
			setup: func(ctx context.Context, c *Client, dir string) error {
				cfg := testPayload(t, dir)
				cfg.Disks = []DiskConfig{{Path: dir + "/missing.img", ID: "rw"}}
				return c.CreateVM(ctx, cfg)
			},
			call:       func(ctx context.Context, c *Client, _ string) error { return c.BootVM(ctx) },
			wantStatus: 500},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, c := startFake(t, fakeOptions{version: tt.version})
			dir := filepath.Dir(c.Socket())
			ctx := context.Background()
			if tt.setup != nil {
				if err := tt.setup(ctx, c, dir); err != nil {
					t.Fatalf("setup: %v", err)
				}
			}
			err := tt.call(ctx, c, dir)
			var apiErr *APIError
			if !errors.As(err, &apiErr) {
				t.Fatalf("got %v, want an *APIError", err)
			}
			if apiErr.StatusCode != tt.wantStatus {
				t.Errorf("got status %d, want %d (%v)", apiErr.StatusCode, tt.wantStatus, err)
			}
			if tt.wantMsg != nil && !reflect.DeepEqual(apiErr.Messages, tt.wantMsg) {
				t.Errorf("got messages %q, want %q", apiErr.Messages, tt.wantMsg)
			}
			if !strings.Contains(err.Error(), "cloud-hypervisor PUT") && !strings.Contains(err.Error(), "cloud-hypervisor GET") {
				t.Errorf("error %q does not name the call", err)
			}
		})
	}
}

// bootFake creates and boots a small VM with a vsock device.
func bootFake(ctx context.Context, c *Client, dir string) error {
	kernel := filepath.Join(dir, "vmlinux")
	if err := os.WriteFile(kernel, []byte("kernel"), 0o600); err != nil {
		return err
	}
	cfg := VMConfig{
		Payload: &PayloadConfig{Kernel: kernel},
		Memory:  &MemoryConfig{Size: 64 << 20},
		Vsock:   &VsockConfig{CID: 3, Socket: filepath.Join(dir, "vsock.sock"), ID: "vsock0"},
		Console: &ConsoleConfig{Mode: ConsoleOff},
	}
	if err := c.CreateVM(ctx, cfg); err != nil {
		return err
	}
	return c.BootVM(ctx)
}

// TestFakeHTTPRules checks that the fake enforces the API's HTTP rules, so
// that the client's passing tests mean something.
func TestFakeHTTPRules(t *testing.T) {
	tests := []struct {
		name, method, path, body string
		chunked                  bool
		want                     int
	}{
		{"unknown path", "GET", "/api/v1/vm.nope", "", false, 404},
		{"outside the api", "GET", "/other", "", false, 404},
		{"wrong method", "PUT", "/api/v1/vmm.ping", "", false, 400},
		{"body on a no-body endpoint", "PUT", "/api/v1/vm.boot", "{}", false, 400},
		{"missing body", "PUT", "/api/v1/vm.create", "", false, 400},
		{"bad json", "PUT", "/api/v1/vm.create", "{", false, 400},
		{"chunked body arrives empty", "PUT", "/api/v1/vm.create", `{"payload":{"kernel":"/k"}}`, true, 400},
		{"unknown enum", "PUT", "/api/v1/vm.create", `{"payload":{"kernel":"/k"},"serial":{"mode":"Loud"}}`, false, 400},
		{"unknown keys ignored", "PUT", "/api/v1/vm.create", `{"payload":{"kernel":"/k"},"whatever":1}`, false, 204},
		{"zero queues taken literally", "PUT", "/api/v1/vm.create", `{"payload":{"kernel":"/k"},"disks":[{"path":"/d","num_queues":0}]}`, false, 500},
		{"delete without a VM is a no-op", "PUT", "/api/v1/vm.delete", "", false, 204},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, c := startFake(t, fakeOptions{})
			var body *strings.Reader
			if tt.body != "" {
				body = strings.NewReader(tt.body)
			}
			var req *http.Request
			var err error
			if body != nil {
				req, err = http.NewRequest(tt.method, "http://localhost"+tt.path, body)
			} else {
				req, err = http.NewRequest(tt.method, "http://localhost"+tt.path, http.NoBody)
			}
			if err != nil {
				t.Fatal(err)
			}
			if tt.chunked {
				req.ContentLength = -1
				req.Body = io.NopCloser(strings.NewReader(tt.body))
				req.GetBody = nil
			}
			resp, err := c.hc.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tt.want {
				t.Errorf("got %d, want %d", resp.StatusCode, tt.want)
			}
		})
	}
}

func TestClientTransportErrors(t *testing.T) {
	t.Run("socket missing", func(t *testing.T) {
		c := NewClient(filepath.Join(shortDir(t), "none.sock"))
		_, err := c.Ping(context.Background())
		if err == nil || !strings.Contains(err.Error(), "cloud-hypervisor GET vmm.ping") {
			t.Fatalf("got %v, want a dial error naming the call", err)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		_, c := startFake(t, fakeOptions{hangOn: "vm.boot"})
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		start := time.Now()
		err := c.BootVM(ctx)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("got %v, want context.DeadlineExceeded", err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("returned after %v", d)
		}
	})
	t.Run("connection dropped mid-call", func(t *testing.T) {
		_, c := startFake(t, fakeOptions{dieOn: "vm.pause"})
		err := c.PauseVM(context.Background())
		var apiErr *APIError
		if err == nil || errors.As(err, &apiErr) {
			t.Fatalf("got %v, want a transport error", err)
		}
	})
	t.Run("vmm.shutdown EOF is success", func(t *testing.T) {
		_, c := startFake(t, fakeOptions{dieOn: "vmm.shutdown"})
		if err := c.ShutdownVMM(context.Background()); err != nil {
			t.Fatalf("got %v, want nil", err)
		}
	})
	t.Run("injected 4xx with a body", func(t *testing.T) {
		_, c := startFake(t, fakeOptions{failOn: "vm.info", failStatus: 429})
		_, err := c.Info(context.Background())
		var apiErr *APIError
		if !errors.As(err, &apiErr) || apiErr.StatusCode != 429 || apiErr.Messages[1] != "injected failure of vm.info" {
			t.Fatalf("got %v, want a 429 APIError with the injected message", err)
		}
	})
}

func TestClientAddNetWithFds(t *testing.T) {
	f, c := startFake(t, fakeOptions{})
	dir := filepath.Dir(c.Socket())
	ctx := context.Background()
	if err := bootFake(ctx, c, dir); err != nil {
		t.Fatal(err)
	}
	r, w, err := os.Pipe() // stands in for two TAP queue fds
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	info, err := c.AddNet(ctx, NetConfig{MAC: "02:00:00:00:00:01", ID: "eth0"}, r, w)
	if err != nil || info.ID != "eth0" {
		t.Fatalf("got %+v, %v, want eth0", info, err)
	}
	reqs := f.requestsSoFar()
	last := reqs[len(reqs)-1]
	if last.Fds != 2 || last.Body != `{"mac":"02:00:00:00:00:01","id":"eth0"}` || last.ContentLength != "39" {
		t.Errorf("got %+v, want 2 fds and the exact body with its length", last)
	}
}

func TestParseErrorBody(t *testing.T) {
	tests := []struct {
		name string
		body string
		want []string
	}{
		{"json array", `["Error from API","The VM is not created"]`, []string{"Error from API", "The VM is not created"}},
		{"plain text", "Error from API: boom\n", []string{"Error from API: boom"}},
		{"bracketed text", "[not json", []string{"[not json"}},
		{"empty", "", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := parseErrorBody([]byte(tt.body)); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

// TestFakeGuestDial covers the guest-initiated direction of the fake's vsock.
func TestFakeGuestDial(t *testing.T) {
	f, c := startFake(t, fakeOptions{})
	dir := filepath.Dir(c.Socket())
	if err := bootFake(context.Background(), c, dir); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", filepath.Join(dir, "vsock.sock_52"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	conn, err := f.guestDial(52)
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
	if _, err := f.guestDial(53); err == nil {
		t.Error("guest dial to a port nobody listens on succeeded")
	}
}
