//go:build integration

package integration

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
)

// TestLifecycle: create → created with the shim's pid → start → running →
// kill TERM → stopped → delete removes everything.
func TestLifecycle(t *testing.T) {
	e := newEnv(t)
	// The process is PID 1 of the container's PID namespace: like under
	// runc, it must handle SIGTERM for TERM to stop it.
	b := bundle(t, "sh", "-c", "trap 'exit 0' TERM; touch /tmp/trapped; while :; do sleep 0.1; done")
	pidFile := filepath.Join(t.TempDir(), "pid")
	e.ok("create", "--bundle", b, "--pid-file", pidFile, "life")
	st := e.state("life")
	if st["status"] != "created" {
		t.Fatalf("after create: status %v", st["status"])
	}
	pidb, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(string(pidb))
	if err != nil || float64(pid) != st["pid"] {
		t.Fatalf("pid file %q, state pid %v", pidb, st["pid"])
	}
	if err := syscall.Kill(pid, 0); err != nil {
		t.Fatalf("pid %d not alive: %v", pid, err)
	}
	if st["bundle"] != b || st["ociVersion"] == "" || st["id"] != "life" {
		t.Errorf("state: %v", st)
	}
	e.ok("start", "life")
	if s := e.state("life")["status"]; s != "running" {
		t.Fatalf("after start: status %v", s)
	}
	if r := e.run("", "start", "life"); r.code == 0 {
		t.Errorf("second start succeeded")
	}
	if r := e.run("", "delete", "life"); r.code == 0 {
		t.Errorf("delete of a running container succeeded")
	}
	e.execUntil("life", "ls", "/tmp/trapped") // the trap is set
	e.ok("kill", "life", "TERM")
	e.waitStatus("life", "stopped")
	if p := e.state("life")["pid"]; p != float64(0) {
		t.Errorf("stopped container reports pid %v", p)
	}
	if r := e.run("", "kill", "life", "TERM"); r.code == 0 || !strings.Contains(r.stderr, "not running") {
		t.Errorf("kill of a stopped container: code %d stderr %q", r.code, r.stderr)
	}
	e.ok("delete", "life")
	if r := e.run("", "state", "life"); r.code == 0 || !strings.Contains(r.stderr, "does not exist") {
		t.Errorf("state after delete: code %d stderr %q", r.code, r.stderr)
	}
}

// TestDeleteForceAfterCrash: delete --force cleans up a container whose shim
// and VMM were killed with SIGKILL.
func TestDeleteForceAfterCrash(t *testing.T) {
	for _, victim := range []string{"shim", "vmm"} {
		t.Run(victim, func(t *testing.T) {
			e := newEnv(t)
			b := bundle(t, "sleep", "1000")
			e.ok("run", "-d", "--bundle", b, "crash")
			var raw map[string]any
			data, err := os.ReadFile(filepath.Join(e.root, "crash", "state.json"))
			if err != nil {
				t.Fatal(err)
			}
			if err := jsonUnmarshal(data, &raw); err != nil {
				t.Fatal(err)
			}
			pid := int(raw[victim].(map[string]any)["pid"].(float64))
			if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
				t.Fatalf("killing %s %d: %v", victim, pid, err)
			}
			e.ok("delete", "--force", "crash")
		})
	}
}

// TestConcurrentCreateOneID: of two concurrent creates of one id, exactly one
// wins.
func TestConcurrentCreateOneID(t *testing.T) {
	e := newEnv(t)
	b := bundle(t, "sleep", "1000")
	var wg sync.WaitGroup
	codes := make([]int, 2)
	for i := range codes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			codes[i] = e.run("", "create", "--bundle", b, "dup").code
		}()
	}
	wg.Wait()
	if (codes[0] == 0) == (codes[1] == 0) {
		t.Fatalf("exit codes %v: want exactly one success", codes)
	}
	e.ok("delete", "--force", "dup")
}

// TestBadInput: each bad input exits non-zero, names the problem and leaves
// no state behind.
func TestBadInput(t *testing.T) {
	e := newEnv(t)
	good := bundle(t, "true")
	malformed := t.TempDir()
	os.WriteFile(filepath.Join(malformed, "config.json"), []byte("{not json"), 0o644)
	noRootfs := bundle(t, "true")
	os.RemoveAll(filepath.Join(noRootfs, "rootfs"))
	relMissing := bundle(t, "true")
	writeSpec(t, relMissing, func(s map[string]any) { s["root"].(map[string]any)["path"] = "../nowhere" })
	noArgs := bundle(t, "true")
	writeSpec(t, noArgs, func(s map[string]any) { s["process"].(map[string]any)["args"] = []string{} })

	tests := []struct {
		name string
		args []string
		want string
	}{
		{"missing bundle", []string{"create", "--bundle", "/nonexistent/bundle", "c1"}, "/nonexistent/bundle"},
		{"malformed config", []string{"create", "--bundle", malformed, "c2"}, "config.json"},
		{"absent rootfs", []string{"create", "--bundle", noRootfs, "c3"}, "rootfs"},
		{"relative rootfs missing", []string{"create", "--bundle", relMissing, "c4"}, "nowhere"},
		{"empty args", []string{"create", "--bundle", noArgs, "c5"}, "args"},
		{"invalid id", []string{"create", "--bundle", good, "../x"}, "invalid container id"},
		{"empty id", []string{"create", "--bundle", good, ""}, "invalid container id"},
		{"long id", []string{"create", "--bundle", good, strings.Repeat("a", 1025)}, "invalid container id"},
		{"unknown container", []string{"start", "nosuch"}, "does not exist"},
		{"unknown container kill", []string{"kill", "nosuch"}, "does not exist"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := e.run("", tc.args...)
			if r.code == 0 {
				t.Fatalf("exit 0, want failure")
			}
			if !strings.Contains(r.stderr, tc.want) {
				t.Errorf("stderr %q does not mention %q", r.stderr, tc.want)
			}
		})
	}
	// A duplicate id and an unknown signal need a live container.
	e.ok("create", "--bundle", good, "dupe")
	if r := e.run("", "create", "--bundle", good, "dupe"); r.code == 0 || !strings.Contains(r.stderr, "already exists") {
		t.Errorf("duplicate id: code %d stderr %q", r.code, r.stderr)
	}
	if r := e.run("", "kill", "dupe", "SIGNOPE"); r.code == 0 || !strings.Contains(r.stderr, "SIGNOPE") {
		t.Errorf("unknown signal: code %d stderr %q", r.code, r.stderr)
	}
	if s := e.state("dupe")["status"]; s != "created" {
		t.Errorf("after bad kill: status %v", s)
	}
	e.ok("delete", "dupe")
	if r := e.run("", "delete", "--force", "never-existed"); r.code != 0 {
		t.Errorf("delete --force of an unknown id: code %d stderr %q", r.code, r.stderr)
	}
}
