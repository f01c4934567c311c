//go:build integration

package integration

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// cgroupFile reads a v1 controller file of a cgroup, or skips when the host
// is not v1.
func cgroupFile(t *testing.T, ctrl, cgroup, file string) string {
	t.Helper()
	p := filepath.Join("/sys/fs/cgroup", ctrl, cgroup, file)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("reading %s: %v", p, err)
	}
	return strings.TrimSpace(string(b))
}

func isCgroupV1(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/sys/fs/cgroup/memory/memory.limit_in_bytes"); err != nil {
		t.Skip("host is not cgroup v1 (this test reads v1 files)")
	}
}

// TestCgroupLimits: a container's memory, CPU and pids limits are visible in
// its host cgroup, which holds the shim and the VMM; delete returns it.
func TestCgroupLimits(t *testing.T) {
	isCgroupV1(t)
	e := newEnv(t)
	b := bundle(t, "sleep", "1000")
	cg := "/rund-it-" + strconv.Itoa(os.Getpid()) + "/limits"
	writeSpec(t, b, func(s map[string]any) {
		s["process"].(map[string]any)["args"] = []string{"sleep", "1000"}
		s["process"].(map[string]any)["terminal"] = false
		linux := s["linux"].(map[string]any)
		linux["cgroupsPath"] = cg
		linux["resources"] = map[string]any{
			"memory": map[string]any{"limit": 512 << 20},
			"cpu":    map[string]any{"quota": 50000, "period": 100000, "shares": 512},
			"pids":   map[string]any{"limit": 100},
		}
	})
	e.ok("run", "-d", "--bundle", b, "limits")
	t.Cleanup(func() {
		if out, err := e.cmd(context.Background(), "pool", "destroy", "--force", "--parent", filepath.Dir(cg)).CombinedOutput(); err != nil {
			t.Errorf("pool destroy: %v: %s", err, out)
		}
		// The pool made the parent: destroying it leaves nothing.
		if left, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", filepath.Dir(cg))); len(left) != 0 {
			t.Errorf("after pool destroy: %v", left)
		}
	})
	mem, _ := strconv.ParseInt(cgroupFile(t, "memory", cg, "memory.limit_in_bytes"), 10, 64)
	if mem < 512<<20 || mem > 1<<30 {
		t.Errorf("memory.limit_in_bytes = %d, want the limit plus the VMM's overhead", mem)
	}
	if q := cgroupFile(t, "cpu", cg, "cpu.cfs_quota_us"); q != "50000" {
		t.Errorf("cpu.cfs_quota_us = %s, want 50000", q)
	}
	if s := cgroupFile(t, "cpu", cg, "cpu.shares"); s != "512" {
		t.Errorf("cpu.shares = %s, want 512", s)
	}
	if p := cgroupFile(t, "pids", cg, "pids.max"); p != "100" {
		t.Errorf("pids.max = %s, want 100", p)
	}
	// The shim and the VMM are in the container's cgroup: under its name
	// where the pool renames slots, in the slot's own directory elsewhere.
	var status struct {
		Slots []struct {
			ID   int    `json:"id"`
			Name string `json:"name"`
		} `json:"slots"`
	}
	out := e.ok("pool", "status", "--parent", filepath.Dir(cg), "--format", "json")
	if err := json.Unmarshal([]byte(out), &status); err != nil {
		t.Fatalf("pool status: %v: %s", err, out)
	}
	slot := -1
	for _, s := range status.Slots {
		if s.Name == filepath.Base(cg) {
			slot = s.ID
		}
	}
	if slot < 0 {
		t.Fatalf("no slot leased to %s in %s", filepath.Base(cg), out)
	}
	st := e.rawState("limits")
	for ctrl, dir := range map[string]string{
		"memory": cg, "cpu": cg, "cpuacct": cg, "pids": cg,
		"cpuset": filepath.Join(filepath.Dir(cg), "rund-slot-"+strconv.Itoa(slot)),
	} {
		procs := cgroupFile(t, ctrl, dir, "cgroup.procs")
		for _, k := range []string{"shim", "vmm"} {
			pid := strconv.Itoa(int(st[k].(map[string]any)["pid"].(float64)))
			if !strings.Contains("\n"+procs+"\n", "\n"+pid+"\n") {
				t.Errorf("%s (pid %s) is not in %s:%s: %q", k, pid, ctrl, dir, procs)
			}
		}
	}
	e.ok("delete", "--force", "limits")
	if _, err := os.Stat(filepath.Join("/sys/fs/cgroup/memory", cg)); err == nil {
		t.Errorf("cgroup %s still exists after delete", cg)
	}
}

// TestGuestOOM: a process that needs more than the guest's memory is
// OOM-killed inside the guest; the sandbox (and its VMM) lives on.
func TestGuestOOM(t *testing.T) {
	e := newEnv(t)
	b := bundle(t, "sh", "-c", "tail /dev/zero; echo tail=$? > /tmp/oom; sleep 1000")
	e.ok("run", "-d", "--bundle", b, "oom")
	var out string
	for i := 0; i < 120; i++ {
		r := e.run("", "exec", "oom", "cat", "/tmp/oom")
		if out = strings.TrimSpace(r.stdout); r.code == 0 && out != "" {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if out != "tail=137" {
		t.Errorf("tail of /dev/zero (a line that grows until memory runs out): %q, want tail=137 (killed by the guest's OOM killer)", out)
	}
	if s := e.state("oom")["status"]; s != "running" {
		t.Errorf("sandbox after the guest OOM: %v", s)
	}
	e.ok("delete", "--force", "oom")
}
