package guest

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/rund-dev/rund/vm/agent/proto"
	"golang.org/x/sys/unix"
)

// The agent's channel to the host is either QEMU's virtio-serial port named
// rund.agent or, when the VM has a virtio vsock device and no such port
// (Cloud Hypervisor), a listening AF_VSOCK socket on proto.VsockPort. Which
// one is decided by the devices the VM has, so that neither waits for the
// other: the virtio bus lists every device as soon as virtio_pci is loaded,
// before their drivers are.

// Virtio device ids (the virtio spec's, as /sys/bus/virtio/devices/*/device
// shows them).
const (
	virtioIDConsole = 3
	virtioIDVsock   = 19
)

// vsockDriver is the virtio vsock transport's driver name.
const vsockDriver = "vmw_vsock_virtio_transport"

// bothGrace is how long the agent waits for the virtio-serial port when the
// VM has both a virtio console and a vsock device, before it settles for
// vsock: a multiport console adds its ports shortly after its driver binds.
const bothGrace = 500 * time.Millisecond

// vsockModules are the modules of the vsock channel (hack/guest/fetch-kernel.sh
// lists them). They are loaded only in a VM that has a vsock device.
var vsockModules = map[string]bool{
	"vsock.ko":                             true,
	"vmw_vsock_virtio_transport_common.ko": true,
	"vmw_vsock_virtio_transport.ko":        true,
}

// channel is the opened channel: port for virtio-serial, else the listening
// vsock socket.
type channel struct {
	port   *os.File
	listen int
}

// virtioDevices is what the virtio bus holds.
type virtioDevices struct {
	console    bool // a virtio console (virtio-serial) device
	vsock      bool // a virtio vsock device
	vsockBound bool // and its driver is bound: AF_VSOCK sockets work
}

// scanVirtio lists the virtio devices under sys (the sysfs mount). ids, if
// not nil, caches the device ids by entry across calls.
func scanVirtio(sys string, ids map[string]uint64) virtioDevices {
	var d virtioDevices
	dir := filepath.Join(sys, "bus", "virtio", "devices")
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		id, ok := ids[e.Name()]
		if !ok {
			b, err := os.ReadFile(filepath.Join(dir, e.Name(), "device"))
			if err != nil {
				continue
			}
			if id, err = strconv.ParseUint(strings.TrimSpace(string(b)), 0, 32); err != nil {
				continue
			}
			if ids != nil {
				ids[e.Name()] = id
			}
		}
		switch id {
		case virtioIDConsole:
			d.console = true
		case virtioIDVsock:
			d.vsock = true
			if _, err := os.Stat(filepath.Join(dir, e.Name(), "driver")); err == nil {
				d.vsockBound = true
			}
		}
	}
	return d
}

// findPort returns the device of the virtio-serial port named rund.agent
// listed under sys, or "".
func findPort(sys string) string {
	names, _ := filepath.Glob(filepath.Join(sys, "class", "virtio-ports", "vport*", "name"))
	for _, n := range names {
		b, err := os.ReadFile(n)
		if err == nil && strings.TrimSpace(string(b)) == portName {
			return "/dev/" + filepath.Base(filepath.Dir(n))
		}
	}
	return ""
}

type channelKind int

const (
	chanWait   channelKind = iota // nothing to open yet
	chanSerial                    // the virtio-serial port
	chanVsock                     // a vsock listener
)

// chooser decides the channel from what sysfs shows, called until it
// returns something other than chanWait.
type chooser struct {
	sys   string
	grace time.Duration
	both  time.Time         // when a bound vsock device was first seen next to a console
	ids   map[string]uint64 // virtio device ids by entry, read once each
}

// choose returns the channel to open now (and the port's device for
// chanSerial). The virtio-serial port wins whenever it is there; a bound
// vsock device is used at once in a VM without a virtio console, and after
// the grace period in a VM with both.
func (c *chooser) choose(now time.Time) (channelKind, string) {
	if dev := findPort(c.sys); dev != "" {
		return chanSerial, dev
	}
	// One stat while the port is awaited: the transport's driver is
	// registered only once its module is loaded, which it never is in a
	// VM without a vsock device (see moduleFilter).
	if _, err := os.Stat(filepath.Join(c.sys, "bus", "virtio", "drivers", vsockDriver)); err != nil {
		return chanWait, ""
	}
	if c.ids == nil {
		c.ids = make(map[string]uint64)
	}
	d := scanVirtio(c.sys, c.ids)
	if !d.vsockBound {
		return chanWait, ""
	}
	if !d.console {
		return chanVsock, ""
	}
	if c.both.IsZero() {
		c.both = now
	}
	if now.Sub(c.both) >= c.grace {
		return chanVsock, ""
	}
	return chanWait, ""
}

// openChannel waits until the virtio-serial port or the vsock device is
// there and opens it.
func openChannel() (channel, error) {
	c := chooser{sys: "/sys", grace: bothGrace}
	deadline := time.Now().Add(30 * time.Second)
	warned := false
	for {
		switch kind, dev := c.choose(time.Now()); kind {
		case chanSerial:
			f, err := os.OpenFile(dev, os.O_RDWR|unix.O_CLOEXEC, 0)
			if err == nil {
				return channel{port: f, listen: -1}, nil
			}
			if !errors.Is(err, os.ErrNotExist) {
				return channel{}, fmt.Errorf("opening %s: %w", dev, err)
			}
		case chanVsock:
			fd, err := listenVsock(proto.VsockPort)
			if err != nil {
				return channel{}, err
			}
			return channel{listen: fd}, nil
		}
		if time.Now().After(deadline) && !warned {
			consolef("rund-agent: still waiting for virtio-serial port %q or a vsock device", portName)
			warned = true
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// listenVsock listens on port for connections from the host (any CID).
func listenVsock(port uint32) (int, error) {
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("vsock socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrVM{CID: unix.VMADDR_CID_ANY, Port: port}); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("binding vsock port %d: %w", port, err)
	}
	if err := unix.Listen(fd, 4); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("listening on vsock port %d: %w", port, err)
	}
	return fd, nil
}

// serveChannel serves the opened channel forever.
func (a *agent) serveChannel(ch channel) {
	if ch.port != nil {
		a.serve(ch.port)
		return
	}
	a.serveListener(ch.listen)
}

// moduleFilter returns whether a listed module is to be loaded: the vsock
// modules only when the VM has a vsock device. It looks at the devices once,
// at the first vsock module (virtio_pci, listed before, has enumerated them).
func moduleFilter(sys string) func(name string) bool {
	decided, want := false, false
	return func(name string) bool {
		if !vsockModules[name] {
			return true
		}
		if !decided {
			decided, want = true, scanVirtio(sys, nil).vsock
		}
		return want
	}
}
