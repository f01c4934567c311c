package qemu

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rund-dev/rund/vm"

	"github.com/rund-dev/rund/internal/config"
)

// Tests that boot the real guest kernel need root, QEMU, the kernel and its
// modules, and a static busybox for the test initramfs. They run under TCG
// whatever the host offers, and at most two VMs at a time.

// guestModules lists the modules the guest kernel in dir needs (its
// modules/order: virtio for Debian's cloud kernel, none for rund's own).
func guestModules(t *testing.T, dir string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "modules", "order"))
	if err != nil {
		t.Skipf("needs the guest kernel's modules/order next to it: %v", err)
	}
	return strings.Fields(string(b))
}

// testInit is the test initramfs's /init. It loads the virtio modules,
// finds the rund.agent port, says "ready" on it, then answers one line per
// command: "ping" gets "pong", "disk" gets the first line of /dev/vda read
// with O_DIRECT (the guest's page cache may hold a template's placeholder).
const testInit = `#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /mod/order); do insmod /mod/$m || echo "insmod $m failed"; done
port=
while [ -z "$port" ]; do
	for p in /sys/class/virtio-ports/*; do
		[ -e "$p/name" ] && [ "$(cat $p/name)" = rund.agent ] && port=/dev/${p##*/}
	done
	[ -z "$port" ] && sleep 0.02
done
while [ ! -e "$port" ]; do sleep 0.02; done
exec 3<>"$port"
echo ready >&3
while read -r cmd <&3; do
	case "$cmd" in
	ping) echo pong >&3 ;;
	disk) echo "disk:$(dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | head -n 1)" >&3 ;;
	*) echo "unknown:$cmd" >&3 ;;
	esac
done
echo "agent port closed"
`

// testKernel returns the guest kernel, or skips the test.
func testKernel(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("boots a VM; skipped in -short mode")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if _, err := exec.LookPath(DefaultBinary); err != nil {
		t.Skipf("needs %s: %v", DefaultBinary, err)
	}
	k := os.Getenv("RUND_TEST_KERNEL")
	if k == "" {
		k, _, _ = config.Guest([]string{"../../bin/guest"}, "auto")
	}
	k, err := filepath.Abs(k)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(k); err != nil {
		t.Skipf("needs the guest kernel (set RUND_TEST_KERNEL): %v", err)
	}
	for _, m := range guestModules(t, filepath.Dir(k)) {
		if _, err := os.Stat(filepath.Join(filepath.Dir(k), "modules", m)); err != nil {
			t.Skipf("needs the guest kernel's modules next to it: %v", err)
		}
	}
	return k
}

// testInitramfs builds the test initramfs into dir and returns its path.
func testInitramfs(t *testing.T, kernel, dir string) string {
	t.Helper()
	bb, err := exec.LookPath("busybox")
	if err != nil {
		t.Skipf("needs a static busybox: %v", err)
	}
	if f, err := elf.Open(bb); err != nil {
		t.Skipf("needs a static busybox: %v", err)
	} else {
		static := true
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				static = false
			}
		}
		f.Close()
		if !static {
			t.Skipf("needs a static busybox; %s is dynamic (install busybox-static)", bb)
		}
	}
	var w cpioWriter
	for _, d := range []string{"bin", "dev", "proc", "sys", "mod"} {
		w.dir(d)
	}
	w.charDev("dev/console", 5, 1)
	w.fileFrom(t, "bin/busybox", bb, 0o755)
	w.file("init", []byte(testInit), 0o755)
	mods := guestModules(t, filepath.Dir(kernel))
	w.file("mod/order", []byte(strings.Join(mods, "\n")+"\n"), 0o644)
	for _, m := range mods {
		w.fileFrom(t, "mod/"+m, filepath.Join(filepath.Dir(kernel), "modules", m), 0o644)
	}
	path := filepath.Join(dir, "initrd.cpio")
	if err := os.WriteFile(path, w.finish(), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// cpioWriter writes a newc cpio archive, the initramfs format.
type cpioWriter struct {
	buf bytes.Buffer
	ino int
}

func (w *cpioWriter) entry(name string, mode uint32, rdevMajor, rdevMinor int, data []byte) {
	w.ino++
	fmt.Fprintf(&w.buf, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		w.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	w.buf.WriteString(name)
	w.buf.WriteByte(0)
	w.pad()
	w.buf.Write(data)
	w.pad()
}

func (w *cpioWriter) pad() {
	for w.buf.Len()%4 != 0 {
		w.buf.WriteByte(0)
	}
}

func (w *cpioWriter) dir(name string) { w.entry(name, 0o040755, 0, 0, nil) }

func (w *cpioWriter) charDev(name string, major, minor int) {
	w.entry(name, 0o020600, major, minor, nil)
}

func (w *cpioWriter) file(name string, data []byte, perm uint32) {
	w.entry(name, 0o100000|perm, 0, 0, data)
}

func (w *cpioWriter) fileFrom(t *testing.T, name, src string, perm uint32) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	w.file(name, b, perm)
}

func (w *cpioWriter) finish() []byte {
	w.entry("TRAILER!!!", 0, 0, 0, nil)
	return w.buf.Bytes()
}

// testGuest is what the tests boot.
type testGuest struct {
	kernel, initrd string
	cmdline        string // added to the kernel command line
}

func newTestGuest(t *testing.T) *testGuest {
	t.Helper()
	k := testKernel(t)
	return &testGuest{kernel: k, initrd: testInitramfs(t, k, t.TempDir())}
}

// config returns a TCG VM config with its runtime directory in dir.
func (g *testGuest) config(dir string) vm.Config {
	return vm.Config{
		Name:       "test",
		Dir:        dir,
		Kernel:     g.kernel,
		Initrd:     g.initrd,
		Cmdline:    strings.TrimSpace("console=ttyS0 quiet panic=-1 " + g.cmdline),
		VCPUs:      1,
		MemoryMiB:  256,
		Accel:      "tcg",
		TBSizeMiB:  32,
		ConsoleLog: filepath.Join(dir, "console.log"),
	}
}

// bootTimeout bounds waits on a guest under TCG; it only stops hung tests.
const bootTimeout = 2 * time.Minute

// shutdownOnCleanup makes sure m is gone when the test ends, and shows the
// guest console if the test failed.
func shutdownOnCleanup(t *testing.T, m vm.Machine, cfg vm.Config) {
	t.Helper()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := m.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if t.Failed() && cfg.ConsoleLog != "" {
			b, _ := os.ReadFile(cfg.ConsoleLog)
			t.Logf("console of %s:\n%s", cfg.Dir, b)
		}
	})
}

// channel is the host end of the test agent's line protocol.
type channel struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

func dialGuest(t *testing.T, m vm.Machine) *channel {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	c, err := m.Dial(ctx)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return &channel{t: t, conn: c, r: bufio.NewReader(c)}
}

// line reads one line from the guest.
func (c *channel) line() string {
	c.t.Helper()
	c.conn.SetReadDeadline(time.Now().Add(bootTimeout))
	s, err := c.r.ReadString('\n')
	if err != nil {
		c.t.Fatalf("reading from the guest: %v (got %q)", err, s)
	}
	return strings.TrimSuffix(s, "\n")
}

// call sends cmd and returns the guest's answer.
func (c *channel) call(cmd string) string {
	c.t.Helper()
	c.conn.SetWriteDeadline(time.Now().Add(bootTimeout))
	if _, err := fmt.Fprintf(c.conn, "%s\n", cmd); err != nil {
		c.t.Fatalf("writing to the guest: %v", err)
	}
	return c.line()
}

// shmDir returns a fresh directory on /dev/shm, removed after the test.
func shmDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("/dev/shm", "rund-qemu-test-")
	if err != nil {
		t.Skipf("needs /dev/shm: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// diskFile writes a 1 MiB disk image whose first line is content.
func diskFile(t *testing.T, path, content string) {
	t.Helper()
	b := make([]byte, 1<<20)
	copy(b, content+"\n")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// qemuRunningIn reports whether any process's command line mentions dir.
func qemuRunningIn(t *testing.T, dir string) bool {
	t.Helper()
	procs, err := filepath.Glob("/proc/[0-9]*/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && bytes.Contains(b, []byte(dir)) {
			return true
		}
	}
	return false
}
