package guest_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rund-dev/rund/vm/agent/client"
	"github.com/rund-dev/rund/vm/agent/proto"

	"github.com/rund-dev/rund/internal/config"
)

// These tests boot the real agent in QEMU (TCG) from an initramfs built
// with hack/guest/mkinitramfs.sh, with a busybox container image on
// virtio-blk (erofs) and a writable ext4 disk. They run one VM at a time.

const blobSize = 10 << 20

// kernelDir is the guest flavour the tests boot: RUND_TEST_GUEST (a
// directory like bin/guest/cloud), else rund's own kernel where built, else
// Debian's cloud kernel.
var kernelDir = func() string {
	if d := os.Getenv("RUND_TEST_GUEST"); d != "" {
		return d
	}
	k, _, _ := config.Guest([]string{filepath.Join("..", "..", "..", "bin", "guest")}, "auto")
	return filepath.Dir(k)
}()

// vmEnv is what every VM test shares: built once per test binary.
type vmEnv struct {
	dir       string
	initrd    string
	image     string // erofs image of the busybox rootfs
	imageSize int64
	blob      []byte // /blob in the image
	err       error
}

var (
	envOnce sync.Once
	env     vmEnv
)

func TestMain(m *testing.M) {
	code := m.Run()
	if env.dir != "" {
		os.RemoveAll(env.dir)
	}
	os.Exit(code)
}

// requireVM skips unless the tools and the kernel are there, and returns
// the shared environment.
func requireVM(t *testing.T) *vmEnv {
	t.Helper()
	if testing.Short() {
		t.Skip("boots VMs; skipped with -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	for _, tool := range []string{"qemu-system-x86_64", "mkfs.erofs", "mkfs.ext4", "busybox", "cpio", "go"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s", tool)
		}
	}
	for _, f := range []string{filepath.Join(kernelDir, "vmlinuz"), filepath.Join(kernelDir, "modules", "order"), "/usr/share/qemu/qboot.rom"} {
		if _, err := os.Stat(f); err != nil {
			t.Skipf("needs %s", f)
		}
	}
	envOnce.Do(func() { env.err = env.build() })
	if env.err != nil {
		t.Fatal(env.err)
	}
	return &env
}

func (e *vmEnv) build() error {
	dir, err := os.MkdirTemp("", "rund-agent-test-")
	if err != nil {
		return err
	}
	e.dir = dir
	bin := filepath.Join(dir, "rund")
	if err := buildRund(bin); err != nil {
		return err
	}
	e.initrd = filepath.Join(dir, "initrd")
	mk := exec.Command("sh", filepath.Join("..", "..", "..", "hack", "guest", "mkinitramfs.sh"), bin, kernelDir, e.initrd)
	if out, err := mk.CombinedOutput(); err != nil {
		return fmt.Errorf("mkinitramfs: %v: %s", err, out)
	}
	root := filepath.Join(dir, "rootfs")
	if err := makeRootfs(root); err != nil {
		return err
	}
	e.blob = make([]byte, blobSize)
	rand.Read(e.blob)
	if err := os.WriteFile(filepath.Join(root, "blob"), e.blob, 0o644); err != nil {
		return err
	}
	e.image = filepath.Join(dir, "image.erofs")
	if out, err := exec.Command("mkfs.erofs", e.image, root).CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs.erofs: %v: %s", err, out)
	}
	// virtio-pmem needs a multiple of 2 MiB.
	fi, err := os.Stat(e.image)
	if err != nil {
		return err
	}
	e.imageSize = (fi.Size() + 2<<20 - 1) / (2 << 20) * (2 << 20)
	if err := os.Truncate(e.image, e.imageSize); err != nil {
		return err
	}
	return os.RemoveAll(root)
}

// buildRund builds the static binary from the module root, or, when the
// tree does not build (other packages mid-edit), a main that is only the
// guest side.
func buildRund(out string) error {
	modRoot, _ := filepath.Abs(filepath.Join("..", "..", ".."))
	cmd := exec.Command("go", "build", "-o", out, ".")
	cmd.Dir = modRoot
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if _, err := cmd.CombinedOutput(); err == nil {
		return nil
	}
	tmp, err := os.MkdirTemp("", "rund-guest-main-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	src := `package main

import "github.com/rund-dev/rund/vm/agent/guest"

func main() {
	if guest.IsGuest() {
		guest.Main()
	}
}
`
	main := filepath.Join(tmp, "main.go")
	if err := os.WriteFile(main, []byte(src), 0o644); err != nil {
		return err
	}
	cmd = exec.Command("go", "build", "-o", out, main)
	cmd.Dir = modRoot
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("building the guest binary: %v: %s", err, b)
	}
	return nil
}

// makeRootfs lays out a busybox root: /bin with every applet, /etc with a
// user 1000, and the usual empty mount points.
func makeRootfs(root string) error {
	for _, d := range []string{"bin", "etc", "tmp", "proc", "sys", "dev", "root", "home/user"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return err
		}
	}
	if err := os.Chmod(filepath.Join(root, "tmp"), 0o1777); err != nil {
		return err
	}
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(root, "bin", "busybox"), bb, 0o755); err != nil {
		return err
	}
	list, err := exec.Command("busybox", "--list").Output()
	if err != nil {
		return fmt.Errorf("busybox --list: %w", err)
	}
	sc := bufio.NewScanner(bytes.NewReader(list))
	for sc.Scan() {
		if n := strings.TrimSpace(sc.Text()); n != "" && n != "busybox" {
			if err := os.Symlink("busybox", filepath.Join(root, "bin", n)); err != nil && !errors.Is(err, fs.ErrExist) {
				return err
			}
		}
	}
	files := map[string]string{
		"etc/passwd": "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
		"etc/group":  "root:x:0:\nuser:x:1000:\n",
		"noexec.sh":  "#!/bin/sh\necho no\n",
	}
	for n, c := range files {
		if err := os.WriteFile(filepath.Join(root, n), []byte(c), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// writableDisk makes a fresh 64 MiB ext4 image in dir.
func writableDisk(t *testing.T, dir string) string {
	t.Helper()
	rw := filepath.Join(dir, "rw.img")
	if err := os.WriteFile(rw, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(rw, 64<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", rw).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	return rw
}

// vm is one booted guest.
type vm struct {
	t       *testing.T
	c       *client.Client
	cmd     *exec.Cmd
	exited  chan struct{}
	console string
	boot    time.Duration // QEMU start to Hello answered
}

// bootVM starts QEMU with the image on /dev/vda and a fresh writable disk on
// /dev/vdb, plus extra arguments, and says Hello.
func bootVM(t *testing.T, e *vmEnv, extra ...string) *vm {
	t.Helper()
	dir := t.TempDir()
	rw := writableDisk(t, dir)
	sock := filepath.Join(dir, "agent.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	v := &vm{t: t, console: filepath.Join(dir, "console.log"), exited: make(chan struct{})}
	v.cmd = exec.Command("qemu-system-x86_64",
		"-machine", "q35", "-accel", "tcg", "-nodefaults", "-no-user-config", "-nographic", "-display", "none",
		"-bios", "/usr/share/qemu/qboot.rom", "-m", "256",
		"-kernel", filepath.Join(kernelDir, "vmlinuz"), "-initrd", e.initrd,
		"-append", "console=ttyS0 quiet",
		"-serial", "file:"+v.console,
		"-device", "virtio-serial-pci,addr=0x3",
		"-chardev", "socket,id=agent,path="+sock,
		"-device", "virtserialport,chardev=agent,name=rund.agent",
		"-drive", "if=none,id=ro,file="+e.image+",format=raw,readonly=on",
		"-device", "virtio-blk-pci,drive=ro,addr=0x4",
		"-drive", "if=none,id=rw,file="+rw+",format=raw",
		"-device", "virtio-blk-pci,drive=rw,addr=0x5",
	)
	v.cmd.Args = append(v.cmd.Args, extra...)
	var stderr bytes.Buffer
	v.cmd.Stderr = &stderr
	start := time.Now()
	if err := v.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { v.cmd.Wait(); close(v.exited) }()
	t.Cleanup(v.kill)

	type accepted struct {
		c   net.Conn
		err error
	}
	ach := make(chan accepted, 1)
	go func() { c, err := ln.Accept(); ach <- accepted{c, err} }()
	var conn net.Conn
	select {
	case a := <-ach:
		if a.err != nil {
			t.Fatal(a.err)
		}
		conn = a.c
	case <-v.exited:
		t.Fatalf("qemu exited: %s", stderr.String())
	case <-time.After(20 * time.Second):
		t.Fatal("qemu did not connect")
	}
	v.c = client.New(conn, client.WithLogs(func(m string) { t.Logf("agent: %s", m) }))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	seed := make([]byte, 32)
	rand.Read(seed)
	if err := v.c.Hello(ctx, proto.Hello{Version: proto.Version, TimeUnixNano: time.Now().UnixNano(), Seed: seed, Hostname: "guest"}); err != nil {
		t.Fatalf("hello: %v\nconsole:\n%s", err, v.consoleText())
	}
	v.boot = time.Since(start)
	t.Logf("boot to agent ready: %v", v.boot.Round(time.Millisecond))
	return v
}

func (v *vm) consoleText() string {
	b, _ := os.ReadFile(v.console)
	return string(b)
}

// kill stops the VM: a clean Shutdown first, then SIGKILL.
func (v *vm) kill() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if v.c != nil {
		_ = v.c.Shutdown(ctx)
	}
	select {
	case <-v.exited:
	case <-time.After(10 * time.Second):
		v.cmd.Process.Kill()
		<-v.exited
	}
	if v.c != nil {
		v.c.Close()
	}
	if v.t.Failed() {
		v.t.Logf("console:\n%s", v.consoleText())
	}
}

// shutdown asks the agent to power off and checks that QEMU exits.
func (v *vm) shutdown() {
	v.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := v.c.Shutdown(ctx); err != nil {
		v.t.Errorf("shutdown: %v", err)
	}
	select {
	case <-v.exited:
	case <-time.After(20 * time.Second):
		v.t.Errorf("qemu still running 20s after shutdown")
	}
}

// result is what a process produced.
type result struct {
	stdout, stderr bytes.Buffer
	status         int
}

// root is the image as the lower layer and the ext4 disk as the upper.
func root() proto.Root {
	return proto.Root{Lower: "/dev/vda", LowerType: "erofs", Upper: "/dev/vdb"}
}

// typicalMounts are what an OCI config usually asks for.
func typicalMounts() []proto.Mount {
	return []proto.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc"},
		{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
		{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"}},
		{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
		{Destination: "/dev/mqueue", Type: "mqueue", Source: "mqueue", Options: []string{"nosuid", "noexec", "nodev"}},
		{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
		{Destination: "/sys/fs/cgroup", Type: "cgroup", Source: "cgroup", Options: []string{"nosuid", "noexec", "nodev", "relatime", "ro"}},
		{Destination: "/etc/resolv.conf", Type: "bind", Source: "/host/resolv.conf", Options: []string{"rbind", "ro"}, Data: []byte("nameserver 10.0.2.3\n")},
		{Destination: "/etc/hosts", Type: "bind", Source: "/host/hosts", Options: []string{"rbind", "rw"}},
	}
}

func env0(extra ...string) []string {
	return append([]string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"}, extra...)
}
