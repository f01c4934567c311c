//go:build integration

package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// rawState reads rund's own state.json of a container.
func (e *env) rawState(id string) map[string]any {
	e.t.Helper()
	b, err := os.ReadFile(filepath.Join(e.root, id, "state.json"))
	if err != nil {
		e.t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		e.t.Fatal(err)
	}
	return m
}

// templates lists the templates of e's data directory.
func (e *env) templates() []map[string]any {
	e.t.Helper()
	var l []map[string]any
	if err := json.Unmarshal([]byte(e.ok("template", "list", "--format", "json")), &l); err != nil {
		e.t.Fatal(err)
	}
	return l
}

// privateTemplates gives a test its own data and memory directories, so it
// can break and rebuild templates without disturbing other tests.
func privateTemplates(t *testing.T, extra ...string) *env {
	t.Helper()
	dir := t.TempDir()
	mem := filepath.Join("/dev/shm", "rund-it-"+strconv.Itoa(os.Getpid())+"-"+filepath.Base(dir))
	t.Cleanup(func() { os.RemoveAll(mem) })
	e := newEnv(t, append([]string{
		fmt.Sprintf("data_dir = %q", filepath.Join(dir, "data")),
		fmt.Sprintf("mem_dir = %q", mem),
	}, extra...)...)
	e.data = filepath.Join(dir, "data")
	return e
}

// TestClonesHaveTheirOwnIdentity: two clones of one template read different
// bytes from /dev/urandom, and their clocks are within a second of the host's.
func TestClonesHaveTheirOwnIdentity(t *testing.T) {
	e := newEnv(t)
	b := bundle(t, "sh", "-c", "head -c 16 /dev/urandom | od -An -tx1; date +%s")
	var rnd []string
	for i := range 2 {
		r := e.run("", "run", "--bundle", b, fmt.Sprintf("ident-%d", i))
		host := time.Now().Unix()
		lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
		if r.code != 0 || len(lines) != 2 {
			t.Fatalf("clone %d: code %d output %q stderr %q", i, r.code, r.stdout, r.stderr)
		}
		rnd = append(rnd, lines[0])
		guest, err := strconv.ParseInt(strings.TrimSpace(lines[1]), 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		if d := host - guest; d < -1 || d > 1 {
			t.Errorf("clone %d: guest clock %d, host %d", i, guest, host)
		}
	}
	if rnd[0] == rnd[1] {
		t.Errorf("both clones read %s from /dev/urandom", rnd[0])
	}
}

// TestTemplateOffColdBoots: the annotation rund.template=off cold-boots;
// otherwise the sandbox is a clone of a template.
func TestTemplateOffColdBoots(t *testing.T) {
	e := newEnv(t)
	warm := bundle(t, "sleep", "1000")
	cold := bundle(t, "sleep", "1000")
	writeSpec(t, cold, func(s map[string]any) {
		s["process"].(map[string]any)["args"] = []string{"sleep", "1000"}
		s["process"].(map[string]any)["terminal"] = false
		s["annotations"] = map[string]string{"rund.template": "off"}
	})
	e.ok("create", "--bundle", warm, "warm")
	e.ok("create", "--bundle", cold, "cold")
	if tpl, _ := e.rawState("warm")["template"].(string); tpl == "" {
		t.Errorf("sandbox without the annotation was not restored from a template")
	}
	if tpl, _ := e.rawState("cold")["template"].(string); tpl != "" {
		t.Errorf("sandbox with rund.template=off was restored from %s", tpl)
	}
	e.ok("delete", "--force", "warm")
	e.ok("delete", "--force", "cold")
}

// TestTemplateRemovedUnderRunningSandbox: removing the template does not
// break a sandbox cloned from it; the next create rebuilds it.
func TestTemplateRemovedUnderRunningSandbox(t *testing.T) {
	e := privateTemplates(t)
	b := bundle(t, "sh", "-c", "echo alive > /tmp/x; sleep 1000")
	e.ok("run", "-d", "--bundle", b, "survivor")
	e.ok("template", "rm", "--all")
	if n := len(e.templates()); n != 0 {
		t.Fatalf("%d templates after rm --all", n)
	}
	if out := e.execUntil("survivor", "cat", "/tmp/x"); strings.TrimSpace(out) != "alive" {
		t.Errorf("sandbox after template removal: %q", out)
	}
	if out := e.ok("exec", "survivor", "sh", "-c", "head -c 4000000 /dev/zero | wc -c"); strings.TrimSpace(out) != "4000000" {
		t.Errorf("sandbox memory after template removal: %q", out)
	}
	e.ok("run", "--bundle", bundle(t, "true"), "next")
	if n := len(e.templates()); n != 1 {
		t.Errorf("%d templates after the next create, want 1 (rebuilt)", n)
	}
	e.ok("delete", "--force", "survivor")
}

// TestTemplateRebuiltAfterKernelChange: a changed kernel file makes a new
// template; the stale one is never used.
func TestTemplateRebuiltAfterKernelChange(t *testing.T) {
	kernel := filepath.Join(t.TempDir(), "vmlinuz")
	src := os.Getenv("RUND_KERNEL")
	if src == "" {
		src = guestFile(t, "vmlinuz")
	}
	data, err := os.ReadFile(src)
	if err != nil {
		t.Skipf("guest kernel: %v", err)
	}
	if err := os.WriteFile(kernel, data, 0o644); err != nil {
		t.Fatal(err)
	}
	e := privateTemplates(t, fmt.Sprintf("kernel = %q", kernel))
	b := bundle(t, "true")
	e.ok("run", "--bundle", b, "k1")
	first := e.templates()
	if len(first) != 1 {
		t.Fatalf("templates after first run: %d", len(first))
	}
	later := time.Now().Add(time.Minute)
	if err := os.Chtimes(kernel, later, later); err != nil {
		t.Fatal(err)
	}
	e.ok("create", "--bundle", b, "k2")
	id, _ := e.rawState("k2")["template"].(string)
	if id == "" || id == first[0]["id"] {
		t.Errorf("after a kernel change the sandbox used template %q (old %v)", id, first[0]["id"])
	}
	e.ok("delete", "--force", "k2")
}

// TestCorruptTemplateRebuilt: a truncated template file is detected and the
// template rebuilt, never restored.
func TestCorruptTemplateRebuilt(t *testing.T) {
	e := privateTemplates(t)
	b := bundle(t, "echo", "ok")
	e.ok("template", "build")
	tpls := e.templates()
	if len(tpls) != 1 {
		t.Fatalf("templates: %d", len(tpls))
	}
	dir := filepath.Join(e.data, "templates", tpls[0]["id"].(string))
	ents, _ := os.ReadDir(dir)
	truncated := 0
	for _, en := range ents {
		if en.Name() != "manifest.json" && en.Type().IsRegular() {
			os.Truncate(filepath.Join(dir, en.Name()), 100)
			truncated++
		}
	}
	if truncated == 0 {
		t.Fatalf("no snapshot files in %s", dir)
	}
	r := e.run("", "run", "--bundle", b, "after-corruption")
	if r.code != 0 || r.stdout != "ok\n" {
		t.Fatalf("run after corruption: code %d stdout %q stderr %q", r.code, r.stdout, r.stderr)
	}
	after := e.templates()
	if len(after) != 1 || after[0]["created"] == tpls[0]["created"] {
		t.Errorf("template not rebuilt: before %v after %v", tpls[0]["created"], after)
	}
}
