package guest_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	rundvm "github.com/rund-dev/rund/vm"
	"github.com/rund-dev/rund/vm/agent/client"
	"github.com/rund-dev/rund/vm/agent/proto"
	"github.com/rund-dev/rund/vm/qemu"
)

// sparePids returns the pids of the spare helpers a warm-up reports
// ("...; spare helpers: pid 40, pid 41; ...").
func sparePids(t *testing.T, info string) []int {
	t.Helper()
	_, rest, ok := strings.Cut(info, "spare helpers: ")
	if !ok {
		t.Fatalf("warm-up info lists no spare helpers: %s", info)
	}
	rest, _, _ = strings.Cut(rest, ";")
	var pids []int
	for _, m := range regexp.MustCompile(`pid (\d+)`).FindAllStringSubmatch(rest, -1) {
		n, _ := strconv.Atoi(m[1])
		pids = append(pids, n)
	}
	if len(pids) == 0 {
		t.Fatalf("no spare helper pids in %q", info)
	}
	return pids
}

// processState is the part of /proc/self/status (and stat) that a process
// must not inherit from the helper that became it.
const processState = `grep -E '^(SigBlk|SigIgn|NoNewPrivs)' /proc/self/status; echo "nice $(cut -d' ' -f19 /proc/self/stat)"`

// wantFreshState checks the output of processState: no signal blocked or
// ignored, no no_new_privs, nice 0.
func wantFreshState(t *testing.T, what, out string) {
	t.Helper()
	for _, w := range []string{"SigBlk:\t0000000000000000", "SigIgn:\t0000000000000000", "NoNewPrivs:\t0", "nice 0\n"} {
		if !strings.Contains(out, w) {
			t.Errorf("%s: missing %q in\n%s", what, w, out)
		}
	}
}

// TestAgentZygotes boots one VM, warms it up as a template build does, and
// checks that ps does not show the spare helpers it left, that Create and
// the first Exec are served by them, and that later execs still work once the
// pool ran dry.
func TestAgentZygotes(t *testing.T) {
	e := requireVM(t)
	v := bootVM(t, e)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	info, err := v.c.Warmup(ctx, proto.WarmupRequest{Root: root()})
	if err != nil {
		t.Fatalf("warmup: %v", err)
	}
	spares := sparePids(t, info)
	if len(spares) < 2 {
		t.Fatalf("got spare helpers %v, want 2", spares)
	}
	if pids, err := v.c.Ps(ctx); err != nil || len(pids) != 0 {
		t.Errorf("ps before create: got %v %v, want none (idle helpers are not container processes)", pids, err)
	}
	var initOut bytes.Buffer
	req := proto.CreateRequest{ID: "z", Root: root(), Mounts: typicalMounts(),
		Process: sh(processState + "; exec sleep 1000")}
	pid, err := v.c.Create(ctx, req, client.Stdio{Stdout: &initOut})
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	if pid != spares[0] {
		t.Errorf("create: init pid %d, want the first spare helper %d", pid, spares[0])
	}
	if pids, err := v.c.Ps(ctx); err != nil || !slices.Equal(pids, []int{pid}) {
		t.Errorf("ps before start: got %v %v, want [%d] (idle helpers are not container processes)", pids, err, pid)
	}
	if err := v.c.Start(ctx); err != nil {
		t.Fatalf("start: %v", err)
	}
	r := v.mustRun(2, sh(processState+"; echo pid $$"), nil)
	wantFreshState(t, "first exec", r.stdout.String())
	// The exec's helper forks the program into the container's PID
	// namespace and exits: the second spare is gone.
	if pids, err := v.c.Ps(ctx); err != nil || slices.Contains(pids, spares[1]) || !slices.Contains(pids, pid) {
		t.Errorf("ps after the first exec: got %v %v, want the init %d and not the second spare helper %d", pids, err, pid, spares[1])
	}
	// The pool is empty now: these are served by a helper started then, or
	// by the spare started in the background (niced until taken).
	for stream := uint32(3); stream <= 5; stream++ {
		r := v.mustRun(stream, sh(processState+"; ls /; test -e /rund && echo SEES-RUND"), nil)
		wantFreshState(t, fmt.Sprintf("exec %d", stream), r.stdout.String())
		if strings.Contains(r.stdout.String(), "SEES-RUND") || !strings.Contains(r.stdout.String(), "blob") {
			t.Errorf("exec %d: container view:\n%s", stream, r.stdout.String())
		}
	}
	if err := v.c.Signal(ctx, proto.InitStream, 9, false); err != nil {
		t.Fatalf("kill: %v", err)
	}
	if st, err := v.c.Wait(ctx, proto.InitStream); err != nil || st != 137 {
		t.Errorf("init: status %d %v, want 137", st, err)
	}
	wantFreshState(t, "init", initOut.String())
	if pids, err := v.c.Ps(ctx); err != nil || len(pids) != 0 {
		t.Errorf("ps after init exit: %v %v", pids, err)
	}
	v.shutdown()
}

// TestAgentTemplateClone builds a template as rund does (boot on
// placeholder disks, Hello, Warmup, pause, snapshot) through the QEMU
// backend, then restores two clones, each with its own image and writable
// disk, and runs a container in each: Create must be served by a helper the
// template holds, and the clones must not share their RNG output.
func TestAgentTemplateClone(t *testing.T) {
	e := requireVM(t)
	shm, err := os.MkdirTemp("/dev/shm", "rund-agent-test-")
	if err != nil {
		t.Skipf("needs /dev/shm: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(shm) })
	b := qemu.New(qemu.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	// The template: an empty erofs image as large as the real one, and a
	// blank writable disk.
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	if err := os.Mkdir(empty, 0o755); err != nil {
		t.Fatal(err)
	}
	ro := filepath.Join(dir, "ro.img")
	if out, err := exec.Command("mkfs.erofs", ro, empty).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.erofs: %v: %s", err, out)
	}
	if err := os.Truncate(ro, e.imageSize); err != nil {
		t.Fatal(err)
	}
	tcfg := rundvm.Config{
		Name: "template", Dir: t.TempDir(), Kernel: filepath.Join(kernelDir, "vmlinuz"), Initrd: e.initrd,
		Cmdline: "console=ttyS0 quiet panic=-1", VCPUs: 1, MemoryMiB: 256, Accel: "tcg",
		MemPath: filepath.Join(shm, "mem"), MemShared: true,
		Disks: []rundvm.Disk{{ID: "rootro", Path: ro, ReadOnly: true}, {ID: "rootrw", Path: writableDisk(t, dir)}},
	}
	tcfg.ConsoleLog = filepath.Join(tcfg.Dir, "console.log")
	snap := t.TempDir()
	spares := buildTemplate(ctx, t, b, tcfg, snap)

	var seen []string
	for i := range 2 {
		cfg := tcfg
		cfg.Name, cfg.Dir, cfg.MemShared = fmt.Sprintf("clone-%d", i), t.TempDir(), false
		cfg.ConsoleLog = filepath.Join(cfg.Dir, "console.log")
		cfg.Disks = []rundvm.Disk{{ID: "rootro", Path: e.image, ReadOnly: true}, {ID: "rootrw", Path: writableDisk(t, cfg.Dir)}}
		// The first clone asks for the usual mounts (the warm-up staged
		// them), the second for others.
		out := runClone(ctx, t, b, cfg, snap, spares, i == 0)
		random, _, _ := strings.Cut(out, "\n")
		if slices.Contains(seen, random) {
			t.Errorf("clone %d read the same random bytes as an earlier clone: %s", i, random)
		}
		seen = append(seen, random)
	}
}

// buildTemplate boots cfg, warms it up, pauses it and snapshots it into
// snap. It returns the pids of the spare helpers the template holds.
func buildTemplate(ctx context.Context, t *testing.T, b *qemu.Backend, cfg rundvm.Config, snap string) []int {
	t.Helper()
	m, err := b.Start(ctx, cfg)
	if err != nil {
		t.Fatalf("starting the template: %v", err)
	}
	defer m.Shutdown(ctx)
	c := dialAgent(ctx, t, m, cfg, nil)
	defer c.Close()
	if err := c.Hello(ctx, proto.Hello{Version: proto.Version, TimeUnixNano: time.Now().UnixNano()}); err != nil {
		t.Fatalf("template hello: %v", err)
	}
	info, err := c.Warmup(ctx, proto.WarmupRequest{Root: root()})
	if err != nil {
		t.Fatalf("warmup: %v", err)
	}
	t.Logf("warm-up: %s", info)
	if err := m.Pause(ctx); err != nil {
		t.Fatalf("pausing the template: %v", err)
	}
	if err := m.Snapshot(ctx, snap); err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	return sparePids(t, info)
}

// runClone restores a clone, runs a container whose init reports its random
// bytes, clock and signal state, and returns its output.
func runClone(ctx context.Context, t *testing.T, b *qemu.Backend, cfg rundvm.Config, snap string, spares []int, usual bool) string {
	t.Helper()
	start := time.Now()
	m, err := b.Restore(ctx, cfg, snap)
	if err != nil {
		t.Fatalf("restore: %v", err)
	}
	defer m.Shutdown(ctx)
	logs := make(chan string, 16)
	c := dialAgent(ctx, t, m, cfg, logs)
	defer c.Close()
	seed := make([]byte, 64)
	rand.Read(seed)
	if err := c.Hello(ctx, proto.Hello{Version: proto.Version, TimeUnixNano: time.Now().UnixNano(), Seed: seed}); err != nil {
		t.Fatalf("clone hello: %v", err)
	}
	ready := time.Since(start)
	var out, errb bytes.Buffer
	req := proto.CreateRequest{ID: cfg.Name, Root: root(), Mounts: typicalMounts(),
		Process: sh(`head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; echo; date +%s; ` + processState + `; cat /blob | wc -c; ` + isolationCheck)}
	if usual {
		req.Mounts, req.MaskedPaths, req.ReadonlyPaths = usualMounts(), usualMasked(), usualReadonly()
	}
	pid, err := c.Create(ctx, req, client.Stdio{Stdout: &out, Stderr: &errb})
	if err != nil {
		t.Fatalf("create in the clone: %v", err)
	}
	created := time.Since(start)
	if !slices.Contains(spares, pid) {
		t.Errorf("create in the clone: init pid %d is not one of the template's spare helpers %v", pid, spares)
	}
	if err := c.Start(ctx); err != nil {
		t.Fatalf("start in the clone: %v", err)
	}
	started := time.Since(start)
	if st, err := c.Wait(ctx, proto.InitStream); err != nil || st != 0 {
		t.Fatalf("init in the clone: status %d %v; stderr %s", st, err, errb.String())
	}
	t.Logf("%s: agent ready %v, created %v, started %v after restore", cfg.Name, ready.Round(time.Millisecond), created.Round(time.Millisecond), started.Round(time.Millisecond))
	s := out.String()
	wantFreshState(t, cfg.Name, s)
	lines := strings.Split(s, "\n")
	if len(lines) < 2 {
		t.Fatalf("output: %q", s)
	}
	if sec, err := strconv.ParseInt(lines[1], 10, 64); err != nil || time.Since(time.Unix(sec, 0)).Abs() > time.Minute {
		t.Errorf("clock in the clone: %q, host %d", lines[1], time.Now().Unix())
	}
	if !strings.Contains(s, fmt.Sprintf("%d\n", blobSize)) {
		t.Errorf("the clone does not read its own image: %q", s)
	}
	wantIsolated(t, cfg.Name, s, usual)
	staged := false
	for len(logs) > 0 {
		if l := <-logs; strings.HasPrefix(l, "create: ") && strings.Contains(l, "3 staged mount groups") {
			staged = true
		}
	}
	if staged != usual {
		t.Errorf("%s: staged mounts used: %v, want %v", cfg.Name, staged, usual)
	}
	return s
}

// dialAgent connects to the VM's agent channel.
// dialAgent connects to the VM's agent channel; the agent's log messages go
// to the test log and, when logs is not nil, to logs (if it has room).
func dialAgent(ctx context.Context, t *testing.T, m rundvm.Machine, cfg rundvm.Config, logs chan<- string) *client.Client {
	t.Helper()
	conn, err := m.Dial(ctx)
	if err != nil {
		b, _ := os.ReadFile(cfg.ConsoleLog)
		t.Fatalf("dial: %v\nconsole:\n%s", err, b)
	}
	return client.New(conn, client.WithLogs(func(s string) {
		t.Logf("agent: %s", s)
		if logs != nil {
			select {
			case logs <- s:
			default:
			}
		}
	}))
}

// isolationCheck prints what a container must (not) see of the VM.
const isolationCheck = `test -e /rund && echo SEES-RUND; test -e /init && echo SEES-INIT; cut -d' ' -f4,5 /proc/self/mountinfo | grep rund | sed 's/^/SEES-MOUNT /'; echo "kcore $(head -c 16 /proc/kcore | wc -c)"; (echo 1 > /proc/sys/kernel/domainname) 2>&1 | grep -q Read-only && echo ro-proc-sys; ls /dev | tr '\n' ' '; echo`

// wantIsolated checks the output of isolationCheck; masked selects the
// usual masked and read-only paths.
func wantIsolated(t *testing.T, what, out string, masked bool) {
	t.Helper()
	if strings.Contains(out, "SEES-") {
		t.Errorf("%s: the container sees the agent:\n%s", what, out)
	}
	for _, d := range []string{"null", "zero", "urandom", "ptmx", "pts", "shm", "mqueue", "fd"} {
		if !strings.Contains(out, " "+d+" ") && !strings.Contains(out, "\n"+d+" ") {
			t.Errorf("%s: /dev lacks %s:\n%s", what, d, out)
		}
	}
	if masked && (!strings.Contains(out, "kcore 0\n") || !strings.Contains(out, "ro-proc-sys")) {
		t.Errorf("%s: /proc/kcore not masked or /proc/sys writable:\n%s", what, out)
	}
}

// usualMounts, usualMasked and usualReadonly are those of `rund spec`.
func usualMounts() []proto.Mount {
	return []proto.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc"},
		{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
		{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"}},
		{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
		{Destination: "/dev/mqueue", Type: "mqueue", Source: "mqueue", Options: []string{"nosuid", "noexec", "nodev"}},
		{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
	}
}

func usualMasked() []string {
	return []string{"/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
		"/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"}
}

func usualReadonly() []string {
	return []string{"/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"}
}
