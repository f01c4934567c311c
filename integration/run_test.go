//go:build integration

package integration

import (
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestRunStdioAndExitCodes: rund run relays stdout and stderr separately and
// exits with the process's status, 128+N for a signal.
func TestRunStdioAndExitCodes(t *testing.T) {
	e := newEnv(t)
	tests := []struct {
		name     string
		script   string
		wantOut  string
		wantErr  string
		wantCode int
	}{
		{name: "zero", script: "echo hello", wantOut: "hello\n", wantCode: 0},
		{name: "three", script: "echo out; echo err >&2; exit 3", wantOut: "out\n", wantErr: "err\n", wantCode: 3},
		// The script is PID 1 of the container's PID namespace, which a
		// signal from inside the namespace does not kill (as under runc):
		// a child of it is killed, and the script exits with its status.
		{name: "sigkill", script: "sh -c 'kill -9 $$'; exit $?", wantCode: 137},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := bundle(t, "sh", "-c", tc.script)
			r := e.run("", "run", "--bundle", b, fmt.Sprintf("run-%d", i))
			if r.code != tc.wantCode {
				t.Errorf("exit code: got %d, want %d (stderr %q)", r.code, tc.wantCode, r.stderr)
			}
			if r.stdout != tc.wantOut {
				t.Errorf("stdout: got %q, want %q", r.stdout, tc.wantOut)
			}
			if tc.wantErr != "" && r.stderr != tc.wantErr {
				t.Errorf("stderr: got %q, want %q", r.stderr, tc.wantErr)
			}
		})
	}
}

// TestRunKilled: a container killed with SIGKILL from outside makes rund
// run exit 137, and a PID 1 without a TERM handler survives SIGTERM as it
// would under runc.
func TestRunKilled(t *testing.T) {
	e := newEnv(t)
	b := bundle(t, "sleep", "1000")
	c := e.cmd(t.Context(), "run", "--bundle", b, "killed")
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Process.Kill(); c.Wait() })
	for i := 0; ; i++ {
		r := e.run("", "state", "killed")
		if r.code == 0 && strings.Contains(r.stdout, `"running"`) {
			break
		}
		if i == 600 {
			t.Fatalf("container never ran: %s %s", r.stdout, r.stderr)
		}
		time.Sleep(50 * time.Millisecond)
	}
	e.ok("kill", "killed", "TERM")
	time.Sleep(500 * time.Millisecond)
	if s := e.state("killed")["status"]; s != "running" {
		t.Errorf("after SIGTERM to a PID 1 without a handler: %v, want running", s)
	}
	e.ok("kill", "killed", "KILL")
	err := c.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 137 {
		t.Errorf("rund run of a SIGKILLed container: %v, want exit 137", err)
	}
}

// TestRunStdin: stdin piped into rund run reaches the process, and EOF
// closes it.
func TestRunStdin(t *testing.T) {
	e := newEnv(t)
	b := bundle(t, "sh", "-c", "cat; echo done")
	r := e.run("line one\nline two\n", "run", "--bundle", b, "stdin")
	if r.code != 0 || r.stdout != "line one\nline two\ndone\n" {
		t.Fatalf("got code %d stdout %q stderr %q", r.code, r.stdout, r.stderr)
	}
}

// TestRunLargeOutput: 10 MB of output arrives byte-exact.
func TestRunLargeOutput(t *testing.T) {
	e := newEnv(t)
	b := bundle(t, "cat", "/data/blob")
	blob := make([]byte, 10<<20)
	rand.Read(blob)
	if err := os.WriteFile(filepath.Join(b, "rootfs/data/blob"), blob, 0o644); err != nil {
		t.Fatal(err)
	}
	r := e.run("", "run", "--bundle", b, "large")
	if r.code != 0 {
		t.Fatalf("run: exit %d: %s", r.code, r.stderr)
	}
	if got, want := sha256.Sum256([]byte(r.stdout)), sha256.Sum256(blob); got != want || len(r.stdout) != len(blob) {
		t.Fatalf("output: %d bytes, sha256 %x; want %d bytes, %x", len(r.stdout), got, len(blob), want)
	}
}

// TestTwoContainersIsolated: two containers run at once and do not see each
// other's files or processes.
func TestTwoContainersIsolated(t *testing.T) {
	e := newEnv(t)
	b1 := bundle(t, "sh", "-c", "echo one > /tmp/mark; sleep 1000")
	b2 := bundle(t, "sh", "-c", "echo two > /tmp/mark; sleep 1000")
	e.ok("run", "-d", "--bundle", b1, "iso-1")
	e.ok("run", "-d", "--bundle", b2, "iso-2")
	for _, id := range []string{"iso-1", "iso-2"} {
		want := map[string]string{"iso-1": "one", "iso-2": "two"}[id]
		out := e.execUntil(id, "cat", "/tmp/mark")
		if strings.TrimSpace(out) != want {
			t.Errorf("%s sees /tmp/mark = %q, want %q", id, out, want)
		}
		ps := e.ok("exec", id, "ps", "-o", "args")
		if strings.Contains(ps, map[string]string{"iso-1": "two", "iso-2": "one"}[id]) {
			t.Errorf("%s sees the other container's process:\n%s", id, ps)
		}
	}
	e.ok("delete", "--force", "iso-1")
	e.ok("delete", "--force", "iso-2")
}
