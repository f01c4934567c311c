//go:build integration

package integration

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The podman tests drive real podman, through conmon, once with runc and once
// with rund, so that any difference between the two shows as a failure of one
// subtest: TestPodman/<runtime>/<scenario>.
//
// Each runtime gets a private podman (storage, run root, tmp dir, locks,
// events, network config: CONTAINERS_CONF plus --root/--runroot) and a
// private runtime state root. podman 4.3 does not pass --runtime-flag on to
// the exit command (`podman container cleanup` then runs `delete --force`
// with the default root), so the runtime podman runs is a two-line wrapper,
// named like the runtime, that adds --root (and, for rund, --config).

// podmanImage is the busybox image every scenario runs, imported from a
// local rootfs tarball (no registry is reachable).
const podmanImage = "localhost/rund-busybox"

// podman is one runtime's private podman.
type podman struct {
	t       testing.TB
	name    string   // runc or rund
	dir     string   // everything podman and the runtime keep
	runtime string   // the wrapper podman runs
	state   string   // the runtime's --root
	global  []string // podman's global flags
	env     []string
}

// podmanRuntimes are the runtimes the scenarios run on: runc, the reference,
// and rund.
func podmanRuntimes(t testing.TB) map[string]string {
	t.Helper()
	runc, err := exec.LookPath("runc")
	if err != nil {
		t.Skip("needs runc")
	}
	return map[string]string{"runc": runc, "rund": rund(t)}
}

// newPodman sets up a private podman whose runtime is bin (runc or rund),
// with the busybox image imported.
func newPodman(t testing.TB, name, bin string) *podman {
	t.Helper()
	dir, err := os.MkdirTemp("", "rund-podman-"+name+"-")
	if err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "containers.conf")
	p := &podman{
		t: t, name: name, dir: dir, state: filepath.Join(dir, "state"),
		runtime: filepath.Join(dir, "bin", name),
		env:     append(os.Environ(), "CONTAINERS_CONF="+conf),
	}
	p.global = []string{"--root", filepath.Join(dir, "storage"), "--runroot", filepath.Join(dir, "runroot"), "--runtime", p.runtime}
	t.Cleanup(p.destroy)
	for _, d := range []string{"bin", "tmp", "cni", "image"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	args := fmt.Sprintf("--root %q", p.state)
	if name == "rund" {
		cfg := filepath.Join(dir, "rund.toml")
		if err := os.WriteFile(cfg, []byte(strings.Join(baseConfig(), "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		args += fmt.Sprintf(" --config %q", cfg)
	}
	wrapper := fmt.Sprintf("#!/bin/sh\nexec %q %s \"$@\"\n", bin, args)
	if err := os.WriteFile(p.runtime, []byte(wrapper), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(conf, []byte(containersConf(dir, name, p.runtime)), 0o644); err != nil {
		t.Fatal(err)
	}

	rootfs := filepath.Join(dir, "image", "rootfs")
	makeBusybox(t, rootfs)
	tarball := filepath.Join(dir, "image", "busybox.tar")
	if out, err := exec.Command("tar", "-C", rootfs, "-cf", tarball, ".").CombinedOutput(); err != nil {
		t.Fatalf("tar: %v: %s", err, out)
	}
	p.ok("import", tarball, podmanImage)
	os.RemoveAll(filepath.Join(dir, "image"))
	return p
}

// containersConf is the private podman configuration: its own tmp dir,
// locks and events log; cgroupfs (there is no systemd here); no network
// (the networking issue is open); the ulimits runc needs in this sandbox.
func containersConf(dir, name, runtime string) string {
	return fmt.Sprintf(`[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "none"

[network]
network_config_dir = %q

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = %q
tmp_dir = %q
lock_type = "file"
runtime = %q
runtime_supports_json = [%q]

[engine.runtimes]
%s = [%q]
`, filepath.Join(dir, "cni"), filepath.Join(dir, "events.log"), filepath.Join(dir, "tmp"), name, name, name, runtime)
}

// destroy removes every container and image, checks the runtime left
// nothing behind, unmounts what podman's storage still has mounted and
// removes the whole directory.
func (p *podman) destroy() {
	t := p.t
	// Only ever against the private storage: without its configuration
	// (set-up failed early) there is nothing of podman's to remove.
	if _, err := os.Stat(filepath.Join(p.dir, "containers.conf")); err == nil {
		p.run("", "rm", "--all", "--force", "--time", "0")
		p.run("", "rmi", "--all", "--force")
		p.checkNoLeaks()
	}
	unmountUnder(p.dir)
	if err := os.RemoveAll(p.dir); err != nil {
		t.Errorf("removing %s: %v", p.dir, err)
	}
}

// unmountUnder lazily unmounts every mount at or below dir, deepest first.
func unmountUnder(dir string) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var points []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
			points = append(points, f[4])
		}
	}
	sort.Sort(sort.Reverse(sort.StringSlice(points)))
	for _, m := range points {
		unix.Unmount(m, unix.MNT_DETACH)
	}
}

// checkNoLeaks waits for podman's asynchronous cleanup, then fails the test
// if any container, runtime state, runtime process (shim, VMM, exec relay)
// or container cgroup is left.
func (p *podman) checkNoLeaks() {
	t := p.t
	t.Helper()
	var leaks []string
	deadline := time.Now().Add(30 * time.Second)
	for {
		leaks = nil
		if r := p.run("", "ps", "--all", "--quiet"); strings.TrimSpace(r.stdout) != "" {
			leaks = append(leaks, "podman containers: "+strings.Join(strings.Fields(r.stdout), " "))
		}
		if ents, err := os.ReadDir(p.state); err == nil {
			for _, e := range ents {
				if e.Name() == ".vm" {
					if sub, _ := os.ReadDir(filepath.Join(p.state, ".vm")); len(sub) > 0 {
						leaks = append(leaks, fmt.Sprintf("%d vm directories under %s/.vm", len(sub), p.state))
					}
					continue
				}
				leaks = append(leaks, "runtime state "+e.Name())
			}
		}
		for _, proc := range processesMentioning(p.state) {
			leaks = append(leaks, "process "+proc)
		}
		cgs, _ := filepath.Glob("/sys/fs/cgroup/*/libpod_parent/libpod-*")
		for _, cg := range cgs {
			if !strings.HasSuffix(cg, "conmon") {
				leaks = append(leaks, "cgroup "+cg)
			}
		}
		if len(leaks) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, l := range leaks {
		t.Errorf("%s: leaked %s", p.name, l)
	}
}

// command returns podman with the private configuration and args.
func (p *podman) command(ctx context.Context, args ...string) *exec.Cmd {
	c := exec.CommandContext(ctx, "podman", append(append([]string{}, p.global...), args...)...)
	c.Env = p.env
	return c
}

// run runs podman with args and stdin and returns what it printed and its
// exit code.
func (p *podman) run(stdin string, args ...string) result {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c := p.command(ctx, args...)
	var out, errb bytes.Buffer
	c.Stdout, c.Stderr = &out, &errb
	if stdin != "" {
		c.Stdin = strings.NewReader(stdin)
	}
	err := c.Run()
	r := result{stdout: out.String(), stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	case err != nil:
		p.t.Fatalf("podman %v: %v", args, err)
	}
	return r
}

// ok runs podman and fails the test unless it exits 0.
func (p *podman) ok(args ...string) string {
	p.t.Helper()
	r := p.run("", args...)
	if r.code != 0 {
		p.t.Fatalf("podman %v: exit %d\nstdout: %s\nstderr: %s", args, r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// waitLogs polls `podman logs name` until it contains want.
func (p *podman) waitLogs(name, want string) string {
	p.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		r := p.run("", "logs", name)
		if strings.Contains(r.stdout, want) {
			return r.stdout
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("logs of %s: %q (stderr %q), want %q", name, r.stdout, r.stderr, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitRunning polls until the container exists and runs.
func (p *podman) waitRunning(name string) {
	p.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		r := p.run("", "inspect", "--format", "{{.State.Status}}", name)
		if strings.TrimSpace(r.stdout) == "running" {
			return
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("container %s: status %q (stderr %q), want running", name, r.stdout, r.stderr)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// inspect returns one field of `podman inspect`, e.g. "{{.State.ExitCode}}".
func (p *podman) inspect(name, format string) string {
	p.t.Helper()
	return strings.TrimSpace(p.ok("inspect", "--format", format, name))
}

// trapLoop is a shell script that prints started, runs traps, and loops.
func trapLoop(traps string) string {
	return traps + "; echo started; while :; do sleep 0.1; done"
}

// podmanScenarios is the scenario set every runtime must pass.
var podmanScenarios = []struct {
	name string
	run  func(t *testing.T, p *podman)
}{
	{"RunEcho", func(t *testing.T, p *podman) {
		if out := p.ok("run", "--rm", podmanImage, "echo", "hi"); out != "hi\n" {
			t.Errorf("stdout %q, want %q", out, "hi\n")
		}
	}},
	{"ExitCodes", func(t *testing.T, p *podman) {
		for _, code := range []int{0, 3} {
			r := p.run("", "run", "--rm", podmanImage, "sh", "-c", fmt.Sprintf("echo out; echo err >&2; exit %d", code))
			if r.code != code || r.stdout != "out\n" || !strings.Contains(r.stderr, "err\n") {
				t.Errorf("exit %d: got code %d stdout %q stderr %q", code, r.code, r.stdout, r.stderr)
			}
		}
	}},
	{"Volume", func(t *testing.T, p *podman) {
		// -v host:ctr and -v host:ctr:ro: reads and writes reach the host.
		vol, ro := t.TempDir(), t.TempDir()
		os.WriteFile(filepath.Join(vol, "in"), []byte("host-data\n"), 0o644)
		os.WriteFile(filepath.Join(ro, "in"), []byte("ro-data\n"), 0o644)
		r := p.run("", "run", "--rm", "-v", vol+":/vol", "-v", ro+":/ro:ro", podmanImage, "sh", "-c",
			"cat /vol/in /ro/in; echo guest-data > /vol/out; (echo x > /ro/out) 2>/dev/null || echo ro-refused")
		if r.code != 0 || r.stdout != "host-data\nro-data\nro-refused\n" {
			t.Errorf("volumes: code %d stdout %q stderr %q", r.code, r.stdout, r.stderr)
		}
		if got, _ := os.ReadFile(filepath.Join(vol, "out")); string(got) != "guest-data\n" {
			t.Errorf("the host sees %q", got)
		}
	}},
	{"RunStdin", func(t *testing.T, p *podman) {
		r := p.run("line one\nline two\n", "run", "--rm", "-i", podmanImage, "sh", "-c", "cat; echo done")
		if r.code != 0 || r.stdout != "line one\nline two\ndone\n" {
			t.Errorf("run -i: code %d stdout %q stderr %q", r.code, r.stdout, r.stderr)
		}
	}},
	{"ExitCodeKilled", func(t *testing.T, p *podman) {
		// Attached run of a process SIGKILLed from outside: 128+9.
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		c := p.command(ctx, "run", "--rm", "--name", "killed", podmanImage, "sleep", "1000")
		done := make(chan error, 1)
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { done <- c.Wait() }()
		p.waitRunning("killed")
		p.ok("kill", "--signal", "KILL", "killed")
		err := <-done
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 137 {
			t.Errorf("podman run: %v, want exit status 137", err)
		}
	}},
	{"NotFound", func(t *testing.T, p *podman) {
		// The runtime's error reaches podman (oci-log), mapped to 127.
		if r := p.run("", "run", "--rm", podmanImage, "/nonexistent"); r.code != 127 {
			t.Errorf("exit %d, want 127 (stderr %q)", r.code, r.stderr)
		}
	}},
	{"DetachLogsStop", func(t *testing.T, p *podman) {
		p.ok("run", "-d", "--name", "term", podmanImage, "sh", "-c", trapLoop(`trap "echo got TERM; exit 7" TERM`))
		p.waitLogs("term", "started\n")
		p.ok("stop", "--time", "60", "term")
		if code := p.inspect("term", "{{.State.ExitCode}}"); code != "7" {
			t.Errorf("exit code after stop %s, want 7 (the TERM trap's)", code)
		}
		if logs := p.ok("logs", "term"); logs != "started\ngot TERM\n" {
			t.Errorf("logs %q, want started and got TERM", logs)
		}
		p.ok("rm", "term")
	}},
	{"StopKillsAfterTimeout", func(t *testing.T, p *podman) {
		p.ok("run", "-d", "--name", "stubborn", podmanImage, "sh", "-c", trapLoop(`trap "" TERM`))
		p.waitLogs("stubborn", "started\n")
		p.ok("stop", "--time", "2", "stubborn")
		if code := p.inspect("stubborn", "{{.State.ExitCode}}"); code != "137" {
			t.Errorf("exit code after stop %s, want 137", code)
		}
		p.ok("rm", "stubborn")
	}},
	{"KillUSR1", func(t *testing.T, p *podman) {
		p.ok("run", "-d", "--name", "usr1", podmanImage, "sh", "-c", trapLoop(`trap "echo got USR1" USR1`))
		p.waitLogs("usr1", "started\n")
		p.ok("kill", "--signal", "USR1", "usr1")
		p.waitLogs("usr1", "got USR1\n")
		if s := p.inspect("usr1", "{{.State.Status}}"); s != "running" {
			t.Errorf("after USR1: status %s, want running", s)
		}
		p.ok("rm", "--force", "--time", "0", "usr1")
	}},
	{"Exec", func(t *testing.T, p *podman) {
		p.ok("run", "-d", "--name", "ex", podmanImage, "sh", "-c", trapLoop(":"))
		p.waitLogs("ex", "started\n")
		r := p.run("", "exec", "ex", "sh", "-c", "echo out; echo err >&2; exit 4")
		if r.code != 4 || r.stdout != "out\n" || !strings.Contains(r.stderr, "err\n") {
			t.Errorf("exec: code %d stdout %q stderr %q; want 4, out, err", r.code, r.stdout, r.stderr)
		}
		if r := p.run("line one\nline two\n", "exec", "-i", "ex", "cat"); r.code != 0 || r.stdout != "line one\nline two\n" {
			t.Errorf("exec -i cat: code %d stdout %q stderr %q", r.code, r.stdout, r.stderr)
		}
		if out := p.ok("exec", "ex", "cat", "/proc/1/cmdline"); out == "" {
			t.Errorf("exec sees no /proc/1/cmdline")
		}
		if s := p.inspect("ex", "{{.State.Status}}"); s != "running" {
			t.Errorf("after exec: status %s, want running", s)
		}
		p.ok("rm", "--force", "--time", "0", "ex")
	}},
	{"PauseUnpause", func(t *testing.T, p *podman) {
		p.ok("run", "-d", "--name", "pz", podmanImage, "sh", "-c", trapLoop(":"))
		p.waitLogs("pz", "started\n")
		p.ok("pause", "pz")
		if s := p.inspect("pz", "{{.State.Status}}"); s != "paused" {
			t.Errorf("after pause: status %s", s)
		}
		p.ok("unpause", "pz")
		if out := p.ok("exec", "pz", "echo", "thawed"); out != "thawed\n" {
			t.Errorf("exec after unpause: %q", out)
		}
		p.ok("rm", "--force", "--time", "0", "pz")
	}},
	{"RemoveForceRunning", func(t *testing.T, p *podman) {
		p.ok("run", "-d", "--name", "rmf", podmanImage, "sleep", "1000")
		p.waitRunning("rmf")
		p.ok("rm", "--force", "--time", "2", "rmf")
		p.checkNoLeaks()
	}},
	{"RemoveForceCreated", func(t *testing.T, p *podman) {
		// init runs the runtime's create and stops there.
		p.ok("create", "--name", "init", podmanImage, "sleep", "1000")
		p.ok("init", "init")
		if s := p.inspect("init", "{{.State.Status}}"); s != "initialized" {
			t.Errorf("after init: status %s", s)
		}
		p.ok("rm", "--force", "init")
		p.checkNoLeaks()
	}},
	{"RunTTY", func(t *testing.T, p *podman) {
		// A pty of 33x97; the container reports its tty and size, and
		// follows a resize to 40x120.
		tt := startOnPty(t, 33, 97, p.command(context.Background(), "run", "--rm", "-it", podmanImage,
			"sh", "-c", "tty; while :; do stty size; read -t 1 x && exit 5; done"))
		tt.waitFor(regexp.MustCompile(`/dev/pts/\d+\r\n`))
		tt.waitFor(regexp.MustCompile(`33 97\r\n`))
		tt.resize(40, 120)
		tt.waitFor(regexp.MustCompile(`40 120\r\n`))
		tt.write("q\r")
		if code := tt.wait(); code != 5 {
			t.Errorf("podman run -it: exit %d, want 5; output %q", code, tt.output())
		}
	}},
	{"ExecTTY", func(t *testing.T, p *podman) {
		p.ok("run", "-d", "--name", "ext", podmanImage, "sh", "-c", trapLoop(":"))
		p.waitLogs("ext", "started\n")
		tt := startOnPty(t, 21, 61, p.command(context.Background(), "exec", "-it", "ext",
			"sh", "-c", "tty; while :; do stty size; read -t 1 x && exit 6; done"))
		tt.waitFor(regexp.MustCompile(`/dev/pts/\d+\r\n`))
		tt.waitFor(regexp.MustCompile(`21 61\r\n`))
		tt.resize(30, 100)
		tt.waitFor(regexp.MustCompile(`30 100\r\n`))
		tt.write("q\r")
		if code := tt.wait(); code != 6 {
			t.Errorf("podman exec -it: exit %d, want 6; output %q", code, tt.output())
		}
		p.ok("rm", "--force", "--time", "0", "ext")
	}},
}

// TestPodman runs the scenario set with podman on runc and on rund.
func TestPodman(t *testing.T) {
	requires(t, "root", "podman", "runc", "qemu")
	if _, err := exec.LookPath("conmon"); err != nil {
		t.Skip("needs conmon")
	}
	rts := podmanRuntimes(t)
	for _, name := range []string{"runc", "rund"} {
		t.Run(name, func(t *testing.T) {
			p := newPodman(t, name, rts[name])
			for _, sc := range podmanScenarios {
				t.Run(sc.name, func(t *testing.T) {
					pt := *p
					pt.t = t
					sc.run(t, &pt)
					if t.Failed() {
						pt.run("", "rm", "--all", "--force", "--time", "0")
					}
				})
			}
		})
	}
}

// BenchmarkPodmanRun measures `podman run --rm IMAGE true` with runc and
// with rund (from its template) on the same private podman set-up, and
// reports the median beside the mean:
//
//	RUND=$PWD/bin/rund go test -tags integration -run '^$' -bench PodmanRun -benchtime 10x ./integration/
func BenchmarkPodmanRun(b *testing.B) {
	requires(b, "root", "podman", "runc", "qemu")
	rts := podmanRuntimes(b)
	for _, name := range []string{"runc", "rund"} {
		b.Run(name, func(b *testing.B) {
			p := newPodman(b, name, rts[name])
			p.ok("run", "--rm", podmanImage, "true") // warm caches (and the template)
			times := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for range b.N {
				t0 := time.Now()
				p.ok("run", "--rm", podmanImage, "true")
				times = append(times, time.Since(t0))
			}
			b.StopTimer()
			sort.Slice(times, func(i, j int) bool { return times[i] < times[j] })
			b.ReportMetric(float64(times[len(times)/2].Microseconds())/1000, "ms/median")
		})
	}
}
