package guest_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rund-dev/rund/vm/agent/client"
	"github.com/rund-dev/rund/vm/agent/proto"
	"golang.org/x/sys/unix"
)

// run execs p on stream in the VM's container, feeding it stdin, and waits.
func (v *vm) run(stream uint32, p proto.Process, stdin io.Reader) (*result, error) {
	v.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	r := &result{}
	if _, err := v.c.Exec(ctx, stream, proto.ExecRequest{Process: p}, client.Stdio{Stdin: stdin, Stdout: &r.stdout, Stderr: &r.stderr}); err != nil {
		return nil, err
	}
	st, err := v.c.Wait(ctx, stream)
	r.status = st
	return r, err
}

func (v *vm) mustRun(stream uint32, p proto.Process, stdin io.Reader) *result {
	v.t.Helper()
	r, err := v.run(stream, p, stdin)
	if err != nil {
		v.t.Fatalf("%v: %v", p.Args, err)
	}
	return r
}

func sh(script string) proto.Process {
	return proto.Process{Args: []string{"sh", "-c", script}, Cwd: "/", Env: env0()}
}

// TestAgentContainer boots one VM, creates a long-running container and
// runs the process cases through exec.
func TestAgentContainer(t *testing.T) {
	e := requireVM(t)
	v := bootVM(t, e)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	var initOut bytes.Buffer
	req := proto.CreateRequest{
		ID:            "c1",
		Hostname:      "box",
		Root:          root(),
		Mounts:        typicalMounts(),
		Process:       proto.Process{Args: []string{"sh", "-c", "echo init-started; exec sleep 1000"}, Cwd: "/", Env: env0()},
		MaskedPaths:   []string{"/proc/kcore", "/sys/firmware", "/nonexistent"},
		ReadonlyPaths: []string{"/proc/sys"},
		Sysctl:        map[string]string{"net.ipv4.ip_forward": "1"},
	}
	t0 := time.Now()
	pid, err := v.c.Create(ctx, req, client.Stdio{Stdout: &initOut})
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	tc := time.Since(t0)
	if err := v.c.Start(ctx); err != nil {
		t.Fatalf("start: %v", err)
	}
	t.Logf("create %v, start %v, init pid %d", tc.Round(time.Millisecond), (time.Since(t0) - tc).Round(time.Millisecond), pid)

	stream := uint32(1)
	next := func() uint32 { stream++; return stream }

	t.Run("stdout and stderr", func(t *testing.T) {
		r := v.mustRun(next(), sh("echo out; echo err >&2"), nil)
		if r.stdout.String() != "out\n" || r.stderr.String() != "err\n" || r.status != 0 {
			t.Errorf("got stdout %q stderr %q status %d, want %q %q 0", r.stdout.String(), r.stderr.String(), r.status, "out\n", "err\n")
		}
	})
	t.Run("exit code", func(t *testing.T) {
		if r := v.mustRun(next(), sh("exit 3"), nil); r.status != 3 {
			t.Errorf("got status %d, want 3", r.status)
		}
	})
	t.Run("stdin", func(t *testing.T) {
		r := v.mustRun(next(), proto.Process{Args: []string{"wc", "-c"}, Cwd: "/", Env: env0()}, strings.NewReader(strings.Repeat("x", 100000)))
		if got := strings.TrimSpace(r.stdout.String()); got != "100000" {
			t.Errorf("wc -c: got %q, want 100000", got)
		}
		// No stdin at all: closed at once.
		if r := v.mustRun(next(), proto.Process{Args: []string{"cat"}, Cwd: "/", Env: env0()}, nil); r.status != 0 || r.stdout.Len() != 0 {
			t.Errorf("cat with no stdin: status %d, %d bytes", r.status, r.stdout.Len())
		}
	})
	t.Run("10 MB output", func(t *testing.T) {
		t0 := time.Now()
		r := v.mustRun(next(), proto.Process{Args: []string{"cat", "/blob"}, Cwd: "/", Env: env0()}, nil)
		if !bytes.Equal(r.stdout.Bytes(), e.blob) {
			t.Errorf("got %d bytes, want the %d bytes of /blob exactly", r.stdout.Len(), len(e.blob))
		}
		t.Logf("10 MB in %v", time.Since(t0).Round(time.Millisecond))
	})
	t.Run("identity", func(t *testing.T) {
		p := proto.Process{
			Args: []string{"sh", "-c", `hostname; echo "$FOO"; pwd; id -u; id -g; id -G; umask; cat /etc/resolv.conf; cat /proc/sys/net/ipv4/ip_forward`},
			Cwd:  "/tmp", Env: env0("FOO=bar baz"), UID: 1000, GID: 1000, AdditionalGids: []uint32{1000, 5},
			Umask: ptr(uint32(0o027)),
		}
		r := v.mustRun(next(), p, nil)
		want := "box\nbar baz\n/tmp\n1000\n1000\n1000 5\n0027\nnameserver 10.0.2.3\n1\n"
		if r.stdout.String() != want || r.status != 0 {
			t.Errorf("got %q (status %d, stderr %q), want %q", r.stdout.String(), r.status, r.stderr.String(), want)
		}
	})
	t.Run("isolation", func(t *testing.T) {
		r := v.mustRun(next(), sh(`ls /; test -e /init && echo SEES-INIT; test -e /rund && echo SEES-RUND; cat /proc/kcore | wc -c; (echo 0 > /proc/sys/net/ipv4/ip_forward) 2>&1 | grep -q Read-only && echo ro-proc-sys; ls /dev`), nil)
		out := r.stdout.String()
		if strings.Contains(out, "SEES-") || !strings.Contains(out, "ro-proc-sys") || !strings.Contains(out, "blob") {
			t.Errorf("container view:\n%s\nstderr: %s", out, r.stderr.String())
		}
		for _, d := range []string{"null", "zero", "urandom", "ptmx", "pts", "shm", "fd"} {
			if !strings.Contains(out, d) {
				t.Errorf("/dev lacks %s:\n%s", d, out)
			}
		}
	})
	t.Run("capabilities", func(t *testing.T) {
		p := sh(`grep Cap /proc/self/status; grep NoNewPrivs /proc/self/status`)
		p.Capabilities = &proto.Capabilities{Bounding: []string{"CAP_CHOWN", "CAP_KILL"}, Effective: []string{"CAP_CHOWN"}, Permitted: []string{"CAP_CHOWN", "CAP_KILL"}}
		p.NoNewPrivileges = true
		r := v.mustRun(next(), p, nil)
		for _, w := range []string{"CapPrm:\t0000000000000021", "CapBnd:\t0000000000000021", "NoNewPrivs:\t1"} {
			if !strings.Contains(r.stdout.String(), w) {
				t.Errorf("missing %q in\n%s", w, r.stdout.String())
			}
		}
	})
	t.Run("terminal", func(t *testing.T) {
		p := proto.Process{Args: []string{"sh", "-c", "tty; stty size; read x; echo got:$x"}, Cwd: "/", Env: env0(), Terminal: true, Rows: 33, Cols: 99}
		r := v.mustRun(next(), p, strings.NewReader("hello\n"))
		out := strings.ReplaceAll(r.stdout.String(), "\r", "")
		if !strings.Contains(out, "/dev/pts/") || !strings.Contains(out, "33 99") || !strings.Contains(out, "got:hello") {
			t.Errorf("terminal output %q", out)
		}
	})
	t.Run("resize", func(t *testing.T) {
		s := next()
		var out bytes.Buffer
		p := proto.Process{Args: []string{"sh", "-c", "read x; stty size"}, Cwd: "/", Env: env0(), Terminal: true, Rows: 10, Cols: 20}
		pr, pw := io.Pipe()
		if _, err := v.c.Exec(ctx, s, proto.ExecRequest{Process: p}, client.Stdio{Stdin: pr, Stdout: &out}); err != nil {
			t.Fatal(err)
		}
		if err := v.c.Resize(ctx, s, 50, 132); err != nil {
			t.Fatal(err)
		}
		pw.Write([]byte("go\n"))
		pw.Close()
		if _, err := v.c.Wait(ctx, s); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(out.String(), "50 132") {
			t.Errorf("after resize: %q", out.String())
		}
	})
	t.Run("kill", func(t *testing.T) {
		s := next()
		if _, err := v.c.Exec(ctx, s, proto.ExecRequest{Process: proto.Process{Args: []string{"sleep", "100"}, Cwd: "/", Env: env0()}}, client.Stdio{}); err != nil {
			t.Fatal(err)
		}
		pids, err := v.c.Ps(ctx)
		if err != nil || len(pids) < 2 {
			t.Errorf("ps: %v %v", pids, err)
		}
		if err := v.c.Signal(ctx, s, int(unix.SIGKILL), false); err != nil {
			t.Fatal(err)
		}
		if st, err := v.c.Wait(ctx, s); err != nil || st != 137 {
			t.Errorf("got status %d (%v), want 137", st, err)
		}
	})
	t.Run("pause", func(t *testing.T) {
		if err := v.c.Pause(ctx); err != nil {
			t.Fatal(err)
		}
		if err := v.c.Resume(ctx); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("missing executable", func(t *testing.T) {
		_, err := v.run(next(), proto.Process{Args: []string{"nonexistent-cmd"}, Cwd: "/", Env: env0()}, nil)
		if err == nil || !strings.Contains(err.Error(), "executable file not found in $PATH") {
			t.Errorf("got %v, want executable file not found in $PATH", err)
		}
		_, err = v.run(next(), proto.Process{Args: []string{"/no/such"}, Cwd: "/", Env: env0()}, nil)
		if err == nil || !strings.Contains(err.Error(), "no such file or directory") {
			t.Errorf("got %v, want no such file or directory", err)
		}
		_, err = v.run(next(), proto.Process{Args: []string{"/noexec.sh"}, Cwd: "/", Env: env0()}, nil)
		if err == nil || !strings.Contains(err.Error(), "permission denied") {
			t.Errorf("got %v, want permission denied", err)
		}
	})
	t.Run("daemon keeps stdout open", func(t *testing.T) {
		t0 := time.Now()
		r := v.mustRun(next(), sh("sleep 30 & echo parent"), nil)
		if r.status != 0 || r.stdout.String() != "parent\n" {
			t.Errorf("got %q status %d", r.stdout.String(), r.status)
		}
		if d := time.Since(t0); d > 10*time.Second {
			t.Errorf("exit took %v", d)
		}
	})
	t.Run("init killed", func(t *testing.T) {
		if err := v.c.Signal(ctx, proto.InitStream, int(unix.SIGKILL), false); err != nil {
			t.Fatal(err)
		}
		if st, err := v.c.Wait(ctx, proto.InitStream); err != nil || st != 137 {
			t.Errorf("got status %d (%v), want 137", st, err)
		}
		if initOut.String() != "init-started\n" {
			t.Errorf("init output %q", initOut.String())
		}
		if pids, err := v.c.Ps(ctx); err != nil || len(pids) != 0 {
			t.Errorf("ps after init exit: %v %v", pids, err)
		}
	})
	v.shutdown()
}

// TestAgentWarmupAndReadonly boots one VM, warms it up as a template build
// would, then checks failed creates and a read-only root's init process.
func TestAgentWarmupAndReadonly(t *testing.T) {
	e := requireVM(t)
	v := bootVM(t, e)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	t0 := time.Now()
	info, err := v.c.Warmup(ctx, proto.WarmupRequest{Root: root()})
	if err != nil {
		t.Fatalf("warmup: %v", err)
	}
	t.Logf("warmup in %v: %s", time.Since(t0).Round(time.Millisecond), info)

	req := proto.CreateRequest{ID: "c2", Root: root(), Mounts: typicalMounts(),
		Process: proto.Process{Args: []string{"no-such-program"}, Cwd: "/", Env: env0()}}
	if _, err := v.c.Create(ctx, req, client.Stdio{}); err == nil || !strings.Contains(err.Error(), "executable file not found in $PATH") {
		t.Errorf("create of a missing program: got %v", err)
	}

	req.Root.Readonly = true
	req.Process = sh(`echo out; echo err >&2; touch /x 2>&1; touch /tmp/x && echo tmp-ok; exit 3`)
	req.Mounts = append(req.Mounts, proto.Mount{Destination: "/tmp", Type: "tmpfs", Source: "tmpfs"})
	var out, errb bytes.Buffer
	if _, err := v.c.Create(ctx, req, client.Stdio{Stdout: &out, Stderr: &errb}); err != nil {
		t.Fatalf("create: %v", err)
	}
	if err := v.c.Start(ctx); err != nil {
		t.Fatalf("start: %v", err)
	}
	st, err := v.c.Wait(ctx, proto.InitStream)
	if err != nil || st != 3 {
		t.Errorf("got status %d (%v), want 3", st, err)
	}
	if !strings.Contains(out.String(), "out\n") || !strings.Contains(out.String(), "Read-only file system") || !strings.Contains(out.String(), "tmp-ok") || errb.String() != "err\n" {
		t.Errorf("stdout %q stderr %q", out.String(), errb.String())
	}
	if _, err := v.c.Exec(ctx, 2, proto.ExecRequest{Process: sh("true")}, client.Stdio{}); err == nil {
		t.Errorf("exec after init exit succeeded")
	}
	if pids, err := v.c.Ps(ctx); err != nil || !slices.Equal(pids, []int{}) {
		t.Errorf("ps: %v %v", pids, err)
	}
	v.shutdown()
}

// TestAgentPmemDAX boots with the image on virtio-pmem as well and runs a
// container whose lower layer is mounted from it with DAX.
func TestAgentPmemDAX(t *testing.T) {
	e := requireVM(t)
	v := bootVM(t, e, "-m", "256M,slots=2,maxmem=1G",
		"-object", fmt.Sprintf("memory-backend-file,id=pm0,share=on,readonly=on,mem-path=%s,size=%d", e.image, e.imageSize),
		"-device", "virtio-pmem-pci,memdev=pm0,addr=0x6")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	r := proto.Root{Lower: "/dev/pmem0", LowerType: "erofs", DAX: true, Upper: "/dev/vdb"}
	if info, err := v.c.Warmup(ctx, proto.WarmupRequest{Root: r}); err != nil {
		t.Fatalf("warmup: %v", err)
	} else {
		t.Logf("warmup: %s", info)
	}
	var out bytes.Buffer
	req := proto.CreateRequest{ID: "dax", Root: r, Mounts: typicalMounts(),
		Process: sh("head -c 16 /blob; echo new > /new; cat /new")}
	if _, err := v.c.Create(ctx, req, client.Stdio{Stdout: &out}); err != nil {
		t.Fatalf("create: %v", err)
	}
	if err := v.c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if st, err := v.c.Wait(ctx, proto.InitStream); err != nil || st != 0 {
		t.Fatalf("status %d %v", st, err)
	}
	if want := string(e.blob[:16]) + "new\n"; out.String() != want {
		t.Errorf("got %q, want %q", out.String(), want)
	}
	v.shutdown()
}

func ptr[T any](v T) *T { return &v }

// TestAgentPIDNamespace checks that the container has a PID namespace of
// its own: its init is PID 1 there, ps shows only its processes, exec'd
// processes join it, and the init (a program with no handler for SIGTERM)
// survives SIGTERM but not SIGKILL, as runc's does.
func TestAgentPIDNamespace(t *testing.T) {
	e := requireVM(t)
	v := bootVM(t, e)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	var initOut bytes.Buffer
	req := proto.CreateRequest{ID: "pidns", Root: root(), Mounts: typicalMounts(),
		MaskedPaths: []string{"/proc/kcore"}, ReadonlyPaths: []string{"/proc/sys"},
		Process: sh(`echo init-pid $$; exec sleep 1000`)}
	pid, err := v.c.Create(ctx, req, client.Stdio{Stdout: &initOut})
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	if err := v.c.Start(ctx); err != nil {
		t.Fatalf("start: %v", err)
	}
	r := v.mustRun(2, sh(`echo exec-pid $$; tr '\0' ' ' < /proc/1/cmdline; echo; ps; echo procs $(ls /proc | grep -cE '^[0-9]+$'); cat /proc/kcore | wc -c; (echo 1 > /proc/sys/kernel/domainname) 2>&1 | grep -q Read-only && echo ro-proc-sys`), nil)
	out := r.stdout.String()
	t.Logf("exec in the container:\n%s", out)
	if r.status != 0 || strings.Contains(out, "exec-pid 1\n") || !strings.Contains(out, "exec-pid ") {
		t.Errorf("exec: status %d, want a pid other than 1:\n%s\nstderr: %s", r.status, out, r.stderr.String())
	}
	if !strings.Contains(out, "\nsleep 1000 \n") {
		t.Errorf("/proc/1/cmdline is not the container's init:\n%s", out)
	}
	for _, bad := range []string{"/init", "kthreadd", "kworker", "rund-guest-child"} {
		if strings.Contains(out, bad) {
			t.Errorf("the container sees %s:\n%s", bad, out)
		}
	}
	// sleep 1000 (PID 1), sh, ps's subshell processes: a handful at most.
	if !strings.Contains(out, "procs ") || strings.Contains(out, "procs 1\n") {
		t.Errorf("process count:\n%s", out)
	}
	if !strings.Contains(out, "ro-proc-sys") || !strings.Contains(out, "\n0\n") {
		t.Errorf("masked /proc/kcore or read-only /proc/sys lost under the namespace's proc:\n%s", out)
	}
	for _, all := range []bool{false, true} {
		if err := v.c.Signal(ctx, proto.InitStream, int(unix.SIGTERM), all); err != nil {
			t.Fatalf("SIGTERM (all %v): %v", all, err)
		}
	}
	time.Sleep(time.Second)
	if pids, err := v.c.Ps(ctx); err != nil || !slices.Contains(pids, pid) {
		t.Errorf("after SIGTERM: ps %v %v, want the init %d still there", pids, err, pid)
	}
	if err := v.c.Signal(ctx, proto.InitStream, int(unix.SIGKILL), false); err != nil {
		t.Fatal(err)
	}
	if st, err := v.c.Wait(ctx, proto.InitStream); err != nil || st != 137 {
		t.Errorf("init: status %d (%v), want 137", st, err)
	}
	if initOut.String() != "init-pid 1\n" {
		t.Errorf("init output %q, want %q", initOut.String(), "init-pid 1\n")
	}
	v.shutdown()
}
