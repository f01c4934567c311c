package commands

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/urfave/cli/v2"

	"github.com/rund-dev/rund/cgpool"
)

func TestPoolCommand(t *testing.T) {
	cgroot, state := t.TempDir(), t.TempDir()
	for _, h := range []string{"cpu", "memory"} {
		if err := os.Mkdir(filepath.Join(cgroot, h), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	run := func(args ...string) string {
		t.Helper()
		var out bytes.Buffer
		app := &cli.App{
			Writer:   &out,
			Flags:    []cli.Flag{&cli.StringFlag{Name: "root", Value: state}},
			Commands: []*cli.Command{PoolCommand()},
		}
		if err := app.Run(append([]string{"rund"}, args...)); err != nil {
			t.Fatalf("%v: %v", args, err)
		}
		return out.String()
	}
	run("pool", "init", "--cgroup-root", cgroot, "--parent", "/p", "--size", "3")
	var st cgpool.Status
	if err := json.Unmarshal([]byte(run("pool", "status", "--cgroup-root", cgroot, "--parent", "/p", "--format", "json")), &st); err != nil {
		t.Fatal(err)
	}
	if st.Idle != 3 || st.Busy != 0 || st.Leaked != 0 || st.Mode != cgpool.ModeV1 {
		t.Fatalf("got %+v, want 3 idle v1 slots", st)
	}
	if out := run("pool", "status", "--cgroup-root", cgroot, "--parent", "/p"); !bytes.Contains([]byte(out), []byte("3 idle")) {
		t.Fatalf("table: got %q", out)
	}
	run("pool", "destroy", "--cgroup-root", cgroot, "--parent", "/p")
	if entries, _ := os.ReadDir(filepath.Join(cgroot, "cpu", "p")); len(entries) != 0 {
		t.Fatalf("got %d entries after destroy, want none", len(entries))
	}
}
