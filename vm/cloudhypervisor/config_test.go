package cloudhypervisor

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rund-dev/rund/vm"
)

func TestVMConfigErrors(t *testing.T) {
	tests := []struct {
		name   string
		edit   func(c *vm.Config)
		wantIs error
		want   string
	}{
		{"no kernel", func(c *vm.Config) { c.Kernel = "" }, nil, "no kernel"},
		{"tcg", func(c *vm.Config) { c.Accel = "tcg" }, vm.ErrUnavailable, `not "tcg"`},
		{"no memory", func(c *vm.Config) { c.MemoryMiB = 0 }, nil, "memory 0 MiB"},
		{"reserved id", func(c *vm.Config) { c.Disks = []vm.Disk{{ID: "__a", Path: "/x"}} }, nil, "reserved"},
		{"duplicate id", func(c *vm.Config) {
			c.Disks = []vm.Disk{{ID: "a", Path: "/x"}}
			c.Pmems = []vm.Pmem{{ID: "a", Path: "/y", Size: 2 << 20}}
		}, nil, `"a" is used twice`},
		{"id clashes with rund's own", func(c *vm.Config) { c.Disks = []vm.Disk{{ID: vsockID, Path: "/x"}} }, nil, "used twice"},
		{"missing id", func(c *vm.Config) { c.Disks = []vm.Disk{{Path: "/x"}} }, nil, "has no id"},
		{"read-only share", func(c *vm.Config) { c.Shares = []vm.Share{{Tag: "t", Path: "/", ReadOnly: true}} }, nil, "read-only virtio-fs"},
		{"share with private memory file", func(c *vm.Config) {
			c.MemPath = "/dev/shm/x"
			c.Shares = []vm.Share{{Tag: "t", Path: "/"}}
		}, nil, "need shared guest memory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := vm.Config{Kernel: "/k", MemoryMiB: 64, Dir: "/run/rund/x"}
			tt.edit(&c)
			p, err := vmmPaths(c.Dir)
			if err != nil {
				t.Fatal(err)
			}
			_, err = vmConfig(c, p)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want it to contain %q", err, tt.want)
			}
			if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
				t.Errorf("got %v, want it to match %v", err, tt.wantIs)
			}
		})
	}
}

func TestVMMPaths(t *testing.T) {
	if _, err := vmmPaths(""); err == nil {
		t.Error("empty dir accepted")
	}
	long := "/run/" + strings.Repeat("d", 90)
	if _, err := vmmPaths(long); err == nil || !strings.Contains(err.Error(), "limit is 107") {
		t.Errorf("got %v for a %d-byte dir, want the socket path limit", err, len(long))
	}
	p, err := vmmPaths("/run/rund/c1")
	if err != nil || p.api != "/run/rund/c1/ch.sock" || p.vsock != "/run/rund/c1/vsock.sock" {
		t.Errorf("got %+v, %v", p, err)
	}
}

// TestStartWithShare boots with a virtio-fs share: a virtiofsd (here the
// fake) is started first, and guest memory is made shared.
func TestStartWithShare(t *testing.T) {
	cfg := testConfig(t)
	cfg.Shares = []vm.Share{{Tag: "bundle", Path: shortDir(t)}}
	m := startMachine(t, fakeBackend(t), cfg)
	info, err := m.API().Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !info.Config.Memory.Shared || len(info.Config.Fs) != 1 || info.Config.Fs[0].Tag != "bundle" ||
		info.Config.Fs[0].Socket != filepath.Join(cfg.Dir, "fs0.sock") {
		t.Errorf("got memory %+v, fs %+v", info.Config.Memory, info.Config.Fs)
	}
	if err := m.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, h := range m.helpers {
		select {
		case <-h.done:
		case <-time.After(2 * time.Second):
			t.Error("virtiofsd outlived the VMM")
		}
	}
}

// vsockServer answers each connection with reply, then sends after.
func vsockServer(t *testing.T, reply, after string) string {
	t.Helper()
	path := filepath.Join(shortDir(t), "v.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				line := make([]byte, 0, 32)
				b := make([]byte, 1)
				for {
					if _, err := c.Read(b); err != nil {
						return
					}
					if b[0] == '\n' {
						break
					}
					line = append(line, b[0])
				}
				if string(line) != "CONNECT 1024" {
					return
				}
				// The reply and the first guest bytes in one write.
				_, _ = c.Write([]byte(reply + after))
				_, _ = c.Read(b)
			}()
		}
	}()
	return path
}

func TestDialVsock(t *testing.T) {
	t.Run("bytes after OK are not lost", func(t *testing.T) {
		path := vsockServer(t, "OK 1073741824\n", "hello")
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		conn, err := DialVsock(ctx, path, AgentPort)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		buf := make([]byte, 5)
		if _, err := conn.Read(buf); err != nil || string(buf) != "hello" {
			t.Errorf("got %q, %v, want hello", buf, err)
		}
	})
	for _, reply := range []string{"ERR nope\n", "OK\n", "OK notanumber\n", strings.Repeat("x", 64)} {
		t.Run("rejects "+strings.TrimSpace(reply)[:min(8, len(strings.TrimSpace(reply)))], func(t *testing.T) {
			path := vsockServer(t, reply, "")
			ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
			defer cancel()
			if conn, err := DialVsock(ctx, path, AgentPort); err == nil {
				conn.Close()
				t.Fatal("accepted a bad reply")
			}
		})
	}
	t.Run("no socket yet", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		_, err := DialVsock(ctx, filepath.Join(shortDir(t), "none"), AgentPort)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("got %v, want the deadline", err)
		}
	})
}

func TestDecodeEvents(t *testing.T) {
	in := `{
  "timestamp": {"secs": 1, "nanos": 2},
  "source": "virtio-device",
  "event": "activated",
  "properties": {"id": "_disk0"}
}

{
  "timestamp": {"secs": 3, "nanos": 4},
  "source": "vm",
  "event": "booted",
  "properties": null
}

{ "timestamp": {"se`
	events, err := DecodeEvents(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	if len(events) != 2 || events[0].Properties["id"] != "_disk0" || events[1].Event != "booted" || events[1].Timestamp.Secs != 3 {
		t.Errorf("got %+v", events)
	}
}
