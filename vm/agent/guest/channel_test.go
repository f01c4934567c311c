package guest

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// fakeSys builds a sysfs tree under a temporary directory.
type fakeSys struct {
	t    *testing.T
	root string
}

func newFakeSys(t *testing.T) *fakeSys {
	return &fakeSys{t: t, root: t.TempDir()}
}

func (s *fakeSys) write(rel, content string) {
	s.t.Helper()
	p := filepath.Join(s.root, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		s.t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		s.t.Fatal(err)
	}
}

// device adds virtio device dev with id (as the kernel prints it), bound to
// driver unless driver is "".
func (s *fakeSys) device(dev, id, driver string) {
	s.t.Helper()
	s.write(filepath.Join("bus/virtio/devices", dev, "device"), id+"\n")
	if driver == "" {
		return
	}
	drv := filepath.Join(s.root, "bus/virtio/drivers", driver)
	if err := os.MkdirAll(drv, 0o755); err != nil {
		s.t.Fatal(err)
	}
	if err := os.Symlink(drv, filepath.Join(s.root, "bus/virtio/devices", dev, "driver")); err != nil {
		s.t.Fatal(err)
	}
}

func (s *fakeSys) port(vport, name string) {
	s.t.Helper()
	s.write(filepath.Join("class/virtio-ports", vport, "name"), name+"\n")
}

func TestChooseChannel(t *testing.T) {
	const grace = 100 * time.Millisecond
	t0 := time.Unix(1000, 0)
	tests := []struct {
		name  string
		setup func(s *fakeSys)
		kind  channelKind
		dev   string
	}{
		{name: "nothing yet", setup: func(*fakeSys) {}, kind: chanWait},
		{name: "console without its port yet", setup: func(s *fakeSys) {
			s.device("virtio0", "0x0003", "virtio_console")
			s.device("virtio1", "0x0002", "virtio_blk")
		}, kind: chanWait},
		{name: "qemu port", setup: func(s *fakeSys) {
			s.device("virtio0", "0x0003", "virtio_console")
			s.port("vport0p1", "rund.agent")
		}, kind: chanSerial, dev: "/dev/vport0p1"},
		{name: "other ports only", setup: func(s *fakeSys) {
			s.device("virtio0", "0x0003", "virtio_console")
			s.port("vport0p1", "org.qemu.guest_agent.0")
		}, kind: chanWait},
		{name: "port among others", setup: func(s *fakeSys) {
			s.port("vport0p1", "org.qemu.guest_agent.0")
			s.port("vport0p2", "rund.agent")
		}, kind: chanSerial, dev: "/dev/vport0p2"},
		{name: "vsock without its driver", setup: func(s *fakeSys) {
			s.device("virtio0", "0x0002", "virtio_blk")
			s.device("virtio1", "0x0013", "")
		}, kind: chanWait},
		{name: "vsock", setup: func(s *fakeSys) {
			s.device("virtio0", "0x0002", "virtio_blk")
			s.device("virtio1", "0x0013", "vmw_vsock_virtio_transport")
		}, kind: chanVsock},
		{name: "vsock and the port", setup: func(s *fakeSys) {
			s.device("virtio0", "0x0003", "virtio_console")
			s.device("virtio1", "0x0013", "vmw_vsock_virtio_transport")
			s.port("vport0p1", "rund.agent")
		}, kind: chanSerial, dev: "/dev/vport0p1"},
		{name: "vsock and a console, in grace", setup: func(s *fakeSys) {
			s.device("virtio0", "0x0003", "virtio_console")
			s.device("virtio1", "0x0013", "vmw_vsock_virtio_transport")
		}, kind: chanWait},
		{name: "malformed id", setup: func(s *fakeSys) {
			s.device("virtio0", "vsock", "vmw_vsock_virtio_transport")
		}, kind: chanWait},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newFakeSys(t)
			tt.setup(s)
			c := chooser{sys: s.root, grace: grace}
			kind, dev := c.choose(t0)
			if kind != tt.kind || dev != tt.dev {
				t.Errorf("choose = %v %q, want %v %q", kind, dev, tt.kind, tt.dev)
			}
		})
	}
}

// TestChooseSequence follows one boot: devices, then drivers, then ports.
func TestChooseSequence(t *testing.T) {
	const grace = 100 * time.Millisecond
	t0 := time.Unix(1000, 0)

	t.Run("vsock only", func(t *testing.T) {
		s := newFakeSys(t)
		c := chooser{sys: s.root, grace: grace}
		if k, _ := c.choose(t0); k != chanWait {
			t.Fatalf("empty: %v", k)
		}
		s.device("virtio0", "0x0013", "")
		if k, _ := c.choose(t0); k != chanWait {
			t.Fatalf("unbound vsock: %v", k)
		}
		drv := filepath.Join(s.root, "bus/virtio/drivers/vmw_vsock_virtio_transport")
		if err := os.MkdirAll(drv, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(drv, filepath.Join(s.root, "bus/virtio/devices/virtio0/driver")); err != nil {
			t.Fatal(err)
		}
		// Without a console there is no grace period.
		if k, _ := c.choose(t0); k != chanVsock {
			t.Fatalf("bound vsock: %v", k)
		}
	})

	t.Run("both, port in time", func(t *testing.T) {
		s := newFakeSys(t)
		s.device("virtio0", "0x0003", "virtio_console")
		s.device("virtio1", "0x0013", "vmw_vsock_virtio_transport")
		c := chooser{sys: s.root, grace: grace}
		if k, _ := c.choose(t0); k != chanWait {
			t.Fatalf("start: %v", k)
		}
		if k, _ := c.choose(t0.Add(grace / 2)); k != chanWait {
			t.Fatalf("in grace: %v", k)
		}
		s.port("vport0p1", "rund.agent")
		if k, dev := c.choose(t0.Add(grace / 2)); k != chanSerial || dev != "/dev/vport0p1" {
			t.Fatalf("port: %v %q", k, dev)
		}
	})

	t.Run("both, no port", func(t *testing.T) {
		s := newFakeSys(t)
		s.device("virtio0", "0x0003", "virtio_console")
		s.device("virtio1", "0x0013", "vmw_vsock_virtio_transport")
		c := chooser{sys: s.root, grace: grace}
		// The grace period starts when both are first seen.
		if k, _ := c.choose(t0.Add(time.Hour)); k != chanWait {
			t.Fatalf("start: %v", k)
		}
		if k, _ := c.choose(t0.Add(time.Hour + grace - 1)); k != chanWait {
			t.Fatalf("in grace: %v", k)
		}
		if k, _ := c.choose(t0.Add(time.Hour + grace)); k != chanVsock {
			t.Fatalf("after grace: %v", k)
		}
	})

	t.Run("console only waits", func(t *testing.T) {
		s := newFakeSys(t)
		s.device("virtio0", "0x0003", "virtio_console")
		c := chooser{sys: s.root, grace: grace}
		for _, d := range []time.Duration{0, grace, time.Minute} {
			if k, _ := c.choose(t0.Add(d)); k != chanWait {
				t.Fatalf("at %v: %v", d, k)
			}
		}
	})
}

func TestModuleFilter(t *testing.T) {
	all := []string{"virtio.ko", "virtio_pci.ko", "virtio_console.ko", "vsock.ko",
		"vmw_vsock_virtio_transport_common.ko", "vmw_vsock_virtio_transport.ko", "virtio_blk.ko"}
	count := func(want func(string) bool) (n int) {
		for _, m := range all {
			if want(m) {
				n++
			}
		}
		return n
	}

	s := newFakeSys(t)
	s.device("virtio0", "0x0003", "virtio_console")
	s.device("virtio1", "0x0002", "virtio_blk")
	if n := count(moduleFilter(s.root)); n != len(all)-3 {
		t.Errorf("without a vsock device: %d modules wanted, want %d", n, len(all)-3)
	}

	s = newFakeSys(t)
	s.device("virtio0", "0x0013", "")
	want := moduleFilter(s.root)
	if n := count(want); n != len(all) {
		t.Errorf("with a vsock device: %d modules wanted, want %d", n, len(all))
	}
	// Decided once: the devices are all there by the first vsock module.
	if err := os.RemoveAll(filepath.Join(s.root, "bus")); err != nil {
		t.Fatal(err)
	}
	if !want("vmw_vsock_virtio_transport.ko") {
		t.Error("decision changed after the first vsock module")
	}
}
