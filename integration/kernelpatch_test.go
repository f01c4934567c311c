//go:build integration

package integration

import (
	"encoding/json"
	"strings"
	"testing"
)

type kpRow struct {
	Region     string `json:"region"`
	Pages      int    `json:"pages"`
	DirtyPages int    `json:"dirty_pages"`
}

// TestKernelpatchReport: a sandbox cloned from a template that has run its
// init and an exec'd process holds no private copy of kernel text or
// rodata with rund's streamlined kernel, while it does hold private pages
// elsewhere (the measurement sees writes). Bad input is refused.
func TestKernelpatchReport(t *testing.T) {
	e := newEnv(t)
	if !strings.Contains(guestFile(t, "vmlinuz"), "/rund/") {
		t.Fatalf("rund's streamlined kernel is not built (make kernel); the default guest is %s", guestFile(t, "vmlinuz"))
	}
	b := bundle(t, "sleep", "1000")
	e.ok("run", "-d", "--bundle", b, "kp")
	defer e.ok("delete", "--force", "kp")
	if out := e.execUntil("kp", "sh", "-c", "echo ran; ls / >/dev/null"); !strings.Contains(out, "ran") {
		t.Fatalf("exec: %q", out)
	}
	var rows []kpRow
	if err := json.Unmarshal([]byte(e.ok("kernelpatch", "report", "--format", "json", "kp")), &rows); err != nil {
		t.Fatal(err)
	}
	got := map[string]kpRow{}
	for _, r := range rows {
		got[r.Region] = r
	}
	for _, region := range []string{"kernel-text", "kernel-rodata", "kernel-data", "other"} {
		if got[region].Pages == 0 {
			t.Errorf("region %s: no pages in %+v", region, rows)
		}
	}
	for _, region := range []string{"kernel-text", "kernel-rodata"} {
		if got[region].DirtyPages != 0 {
			t.Errorf("%s: %d pages copied by the clone, want 0", region, got[region].DirtyPages)
		}
	}
	if got["other"].DirtyPages == 0 || got["kernel-data"].DirtyPages == 0 {
		t.Errorf("no private pages outside kernel text at all (the measurement sees nothing): %+v", rows)
	}
	table := e.ok("kernelpatch", "report", "kp")
	for _, want := range []string{"REGION", "kernel-text", "total"} {
		if !strings.Contains(table, want) {
			t.Errorf("table lacks %q:\n%s", want, table)
		}
	}
	for _, args := range [][]string{
		{"kernelpatch", "report", "nosuch"},
		{"kernelpatch", "report", "--format", "yaml", "kp"},
		{"kernelpatch", "report"},
	} {
		if r := e.run("", args...); r.code == 0 || r.stderr == "" {
			t.Errorf("rund %v: exit %d, stderr %q; want an error", args, r.code, r.stderr)
		}
	}
}

// TestCloudKernelFlavour: guest_kernel = "cloud" still runs containers on
// Debian's cloud kernel (with its modules), in a template of its own; the
// kernelpatch report works there too.
func TestCloudKernelFlavour(t *testing.T) {
	e := privateTemplates(t, `guest_kernel = "cloud"`)
	b := bundle(t, "uname", "-r")
	if out := e.ok("run", "--bundle", b, "cloud1"); !strings.Contains(out, "cloud") {
		t.Errorf("uname -r on the cloud flavour: %q", out)
	}
	b = bundle(t, "sleep", "1000")
	e.ok("run", "-d", "--bundle", b, "cloud2")
	defer e.ok("delete", "--force", "cloud2")
	var rows []kpRow
	if err := json.Unmarshal([]byte(e.ok("kernelpatch", "report", "--format", "json", "cloud2")), &rows); err != nil {
		t.Fatal(err)
	}
	if len(rows) != 4 || rows[0].Region != "kernel-text" || rows[0].Pages == 0 {
		t.Errorf("report on the cloud kernel: %+v", rows)
	}
}
