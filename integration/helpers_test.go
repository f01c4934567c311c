//go:build integration

// Package integration drives the built rund binary ($RUND) end to end: real
// QEMU microVMs (TCG where KVM cannot serve), real mounts and cgroups.
package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rund-dev/rund/internal/config"
)

// rund is the binary under test.
func rund(t testing.TB) string {
	t.Helper()
	p := os.Getenv("RUND")
	if p == "" {
		t.Skip("RUND is not set (run `make test-integration`)")
	}
	return p
}

// guestFile is name (vmlinuz, initrd.img) of the guest flavour rund picks by
// default: its streamlined kernel where built, else Debian's cloud kernel.
func guestFile(t testing.TB, name string) string {
	t.Helper()
	kernel, _, _ := config.Guest([]string{filepath.Join(filepath.Dir(rund(t)), "guest")}, "auto")
	return filepath.Join(filepath.Dir(kernel), name)
}

// requires skips the test unless each named capability is present.
func requires(t testing.TB, what ...string) {
	t.Helper()
	for _, w := range what {
		switch w {
		case "root":
			if os.Geteuid() != 0 {
				t.Skip("needs root")
			}
		case "qemu":
			if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
				t.Skip("needs qemu-system-x86_64")
			}
		case "runc":
			if _, err := exec.LookPath("runc"); err != nil {
				t.Skip("needs runc")
			}
		case "podman":
			if _, err := exec.LookPath("podman"); err != nil {
				t.Skip("needs podman")
			}
		default:
			t.Fatalf("unknown requirement %q", w)
		}
	}
}

// env is one test's rund: its own state root and data directory.
type env struct {
	t    *testing.T
	bin  string
	root string
	cfg  string
	data string // data_dir, when the test chose its own
}

// Shared by every test: images and templates are built once per run.
const (
	testDataDir = "/var/tmp/rund-integration"
	testMemDir  = "/dev/shm/rund-integration"
)

// baseConfig is the configuration every test starts from.
func baseConfig() []string {
	return []string{
		fmt.Sprintf("data_dir = %q", testDataDir),
		fmt.Sprintf("mem_dir = %q", testMemDir),
	}
}

// TestMain builds the template once, so no test's output carries the
// first-use message, and removes the shared data afterwards.
func TestMain(m *testing.M) {
	if bin := os.Getenv("RUND"); bin != "" && os.Geteuid() == 0 {
		cfg := filepath.Join(os.TempDir(), "rund-integration.toml")
		os.WriteFile(cfg, []byte(strings.Join(baseConfig(), "\n")+"\n"), 0o644)
		if out, err := exec.Command(bin, "--config", cfg, "template", "build").CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "rund template build: %v\n%s", err, out)
		}
	}
	code := m.Run()
	os.RemoveAll(testMemDir)
	os.RemoveAll(testDataDir)
	os.Exit(code)
}

func newEnv(t *testing.T, configLines ...string) *env {
	t.Helper()
	requires(t, "root", "qemu")
	dir := t.TempDir()
	e := &env{t: t, bin: rund(t), root: filepath.Join(dir, "state"), cfg: filepath.Join(dir, "config.toml")}
	// A line of configLines replaces the base line with the same key.
	lines := configLines
	for _, b := range baseConfig() {
		key, _, _ := strings.Cut(b, "=")
		overridden := false
		for _, l := range configLines {
			if k, _, _ := strings.Cut(l, "="); strings.TrimSpace(k) == strings.TrimSpace(key) {
				overridden = true
			}
		}
		if !overridden {
			lines = append(lines, b)
		}
	}
	cfg := strings.Join(lines, "\n") + "\n"
	if err := os.WriteFile(e.cfg, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.checkNoLeaks() })
	return e
}

// result is a finished rund command.
type result struct {
	stdout, stderr string
	code           int
}

func (e *env) cmd(ctx context.Context, args ...string) *exec.Cmd {
	full := append([]string{"--root", e.root, "--config", e.cfg}, args...)
	return exec.CommandContext(ctx, e.bin, full...)
}

// run runs rund with args and stdin, and returns what it printed and its exit code.
func (e *env) run(stdin string, args ...string) result {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c := e.cmd(ctx, args...)
	// Files, not pipes: a created container keeps its stdio open, and
	// exec would wait for a pipe's EOF.
	out, errb := tempFile(e.t), tempFile(e.t)
	c.Stdout, c.Stderr = out, errb
	if stdin != "" {
		c.Stdin = strings.NewReader(stdin)
	}
	err := c.Run()
	r := result{stdout: readBack(e.t, out), stderr: readBack(e.t, errb)}
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	case err != nil:
		e.t.Fatalf("rund %v: %v", args, err)
	}
	return r
}

func tempFile(t *testing.T) *os.File {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "out")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func readBack(t *testing.T, f *os.File) string {
	t.Helper()
	b, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// ok runs rund and fails the test unless it exits 0.
func (e *env) ok(args ...string) string {
	e.t.Helper()
	r := e.run("", args...)
	if r.code != 0 {
		e.t.Fatalf("rund %v: exit %d\nstdout: %s\nstderr: %s", args, r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// state returns the parsed `rund state`.
func (e *env) state(id string) map[string]any {
	e.t.Helper()
	out := e.ok("state", id)
	var m map[string]any
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		e.t.Fatalf("state %s: %v: %s", id, err, out)
	}
	return m
}

// waitStatus polls state until it reports want.
func (e *env) waitStatus(id, want string) {
	e.t.Helper()
	end := time.Now().Add(60 * time.Second)
	for {
		st := e.state(id)
		if st["status"] == want {
			return
		}
		if time.Now().After(end) {
			e.t.Fatalf("container %s: status %v, want %s", id, st["status"], want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// checkNoLeaks asserts nothing of this env is left: no state, no VMM or
// shim processes, no mounts.
func (e *env) checkNoLeaks() {
	t := e.t
	if t.Failed() {
		// Don't let one failure leak into the next test.
		if ents, err := os.ReadDir(e.root); err == nil {
			for _, en := range ents {
				if en.Name() != ".vm" {
					e.cmd(context.Background(), "delete", "--force", en.Name()).Run()
				}
			}
		}
	}
	if ents, err := os.ReadDir(e.root); err == nil {
		for _, en := range ents {
			if en.Name() == ".vm" {
				if sub, _ := os.ReadDir(filepath.Join(e.root, ".vm")); len(sub) > 0 {
					t.Errorf("leaked vm directories under %s/.vm: %d", e.root, len(sub))
				}
				continue
			}
			t.Errorf("leaked state: %s", filepath.Join(e.root, en.Name()))
		}
	}
	if procs := processesMentioning(e.root); len(procs) > 0 {
		t.Errorf("leaked processes: %v", procs)
	}
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil && bytes.Contains(b, []byte(e.root)) {
		t.Errorf("leaked mounts under %s", e.root)
	}
}

// processesMentioning lists the command lines of live processes whose
// arguments contain s.
func processesMentioning(s string) []string {
	var out []string
	ents, _ := os.ReadDir("/proc")
	for _, en := range ents {
		if en.Name()[0] < '0' || en.Name()[0] > '9' {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", en.Name(), "cmdline"))
		if err != nil || len(b) == 0 {
			continue
		}
		if stat, err := os.ReadFile(filepath.Join("/proc", en.Name(), "stat")); err == nil {
			if i := bytes.LastIndexByte(stat, ')'); i > 0 && i+2 < len(stat) && stat[i+2] == 'Z' {
				continue
			}
		}
		if bytes.Contains(b, []byte(s)) {
			out = append(out, en.Name()+": "+strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
	return out
}

// bundle makes an OCI bundle whose rootfs is busybox, running args.
func bundle(t *testing.T, args ...string) string {
	t.Helper()
	dir := t.TempDir()
	rootfs := filepath.Join(dir, "rootfs")
	makeBusybox(t, rootfs)
	writeSpec(t, dir, func(s map[string]any) {
		p := s["process"].(map[string]any)
		p["args"] = args
		p["terminal"] = false
	})
	return dir
}

// makeBusybox builds a busybox rootfs at dir.
func makeBusybox(t testing.TB, dir string) {
	t.Helper()
	bb, err := exec.LookPath("busybox")
	if err != nil {
		bb = "/bin/busybox"
	}
	for _, d := range []string{"bin", "sbin", "etc", "tmp", "proc", "sys", "dev", "root", "var", "data"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.Chmod(filepath.Join(dir, "tmp"), 0o1777)
	b, err := os.ReadFile(bb)
	if err != nil {
		t.Fatalf("reading busybox: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "bin/busybox"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bb, "--list").Output()
	if err != nil {
		t.Fatalf("busybox --list: %v", err)
	}
	for _, a := range strings.Fields(string(out)) {
		if a == "busybox" {
			continue
		}
		os.Symlink("busybox", filepath.Join(dir, "bin", a))
	}
	os.WriteFile(filepath.Join(dir, "etc/passwd"), []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "etc/group"), []byte("root:x:0:\nnogroup:x:65534:\n"), 0o644)
}

// writeSpec writes config.json from `rund spec`, edited by edit.
func writeSpec(t *testing.T, dir string, edit func(map[string]any)) {
	t.Helper()
	os.Remove(filepath.Join(dir, "config.json"))
	if out, err := exec.Command(rund(t), "spec", "--bundle", dir).CombinedOutput(); err != nil {
		t.Fatalf("rund spec: %v: %s", err, out)
	}
	editSpec(t, dir, func(s map[string]any) {
		s["root"].(map[string]any)["readonly"] = false
		edit(s)
	})
}

// editSpec rewrites the bundle's config.json through edit.
func editSpec(t *testing.T, dir string, edit func(map[string]any)) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	var s map[string]any
	if err := json.Unmarshal(b, &s); err != nil {
		t.Fatal(err)
	}
	edit(s)
	out, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), out, 0o644); err != nil {
		t.Fatal(err)
	}
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

// execUntil runs `rund exec id args...` until it succeeds with non-empty
// output (a detached container's process may not have run its first
// command yet), and returns that output.
func (e *env) execUntil(id string, args ...string) string {
	e.t.Helper()
	var r result
	for i := 0; i < 100; i++ {
		r = e.run("", append([]string{"exec", id}, args...)...)
		if r.code == 0 && strings.TrimSpace(r.stdout) != "" {
			return r.stdout
		}
		time.Sleep(100 * time.Millisecond)
	}
	e.t.Fatalf("rund exec %s %v: exit %d\nstdout: %s\nstderr: %s", id, args, r.code, r.stdout, r.stderr)
	return ""
}
