package cloudhypervisor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/rund-dev/rund/vm"
)

// Files of a Cloud Hypervisor snapshot directory.
const (
	snapConfig = "config.json"
	snapState  = "state.json"
	snapMemory = "memory-ranges"
)

// Restore starts a clone of the template snapshot in src. The clone gets its
// own copy of the snapshot under cfg.Dir: config.json rewritten with the
// clone's vsock socket, serial file, disk and pmem backings and, when the
// template's RAM is a shared file-backed zone, that zone mapped private
// (copy-on-write: clones share the template's pages until they write them);
// a copy of state.json; and memory-ranges, if any, hard-linked. A fresh VMM
// loads it with vm.restore, cfg's disks and pmems that the template lacks are
// hot-added while it is paused, and vm.resume starts it. The returned
// vm.Machine is a *Machine.
func (b *Backend) Restore(ctx context.Context, cfg vm.Config, src string) (vm.Machine, error) {
	p, err := vmmPaths(cfg.Dir)
	if err != nil {
		return nil, err
	}
	if cfg.Accel != "" && cfg.Accel != "kvm" {
		return nil, fmt.Errorf("restoring vm %s: cloud-hypervisor runs only on kvm, not %q: %w", cfg.Name, cfg.Accel, vm.ErrUnavailable)
	}
	dir, plug, err := prepareClone(cfg, p, src)
	if err != nil {
		return nil, fmt.Errorf("restoring vm %s from %s: %w", cfg.Name, src, err)
	}
	m, err := b.launch(ctx, cfg, p)
	if err != nil {
		return nil, fmt.Errorf("restoring vm %s: %w", cfg.Name, err)
	}
	if err := m.restore(ctx, dir, plug); err != nil {
		m.kill()
		return nil, fmt.Errorf("restoring vm %s from %s: %w", cfg.Name, src, err)
	}
	return m, nil
}

// hotplug lists the devices a clone has and its template does not.
type hotplug struct {
	disks []DiskConfig
	pmems []PmemConfig
}

func (m *Machine) restore(ctx context.Context, dir string, plug hotplug) error {
	if err := m.api.RestoreVM(ctx, RestoreConfig{SourceURL: "file://" + dir}); err != nil {
		return m.explain(err)
	}
	for _, d := range plug.disks {
		if _, err := m.api.AddDisk(ctx, d); err != nil {
			return fmt.Errorf("adding disk %s: %w", d.ID, m.explain(err))
		}
	}
	for _, pm := range plug.pmems {
		if _, err := m.api.AddPmem(ctx, pm); err != nil {
			return fmt.Errorf("adding pmem %s: %w", pm.ID, m.explain(err))
		}
	}
	return m.explain(m.api.ResumeVM(ctx))
}

// prepareClone writes the clone's snapshot directory and returns its path.
func prepareClone(cfg vm.Config, p paths, src string) (string, hotplug, error) {
	src, err := filepath.Abs(src)
	if err != nil {
		return "", hotplug{}, err
	}
	raw, err := os.ReadFile(filepath.Join(src, snapConfig))
	if err != nil {
		return "", hotplug{}, fmt.Errorf("%w: %w", vm.ErrBadSnapshot, err)
	}
	conf, err := decodeObject(raw)
	if err != nil {
		return "", hotplug{}, fmt.Errorf("%w: %s: %w", vm.ErrBadSnapshot, snapConfig, err)
	}
	if _, err := os.Stat(filepath.Join(src, snapState)); err != nil {
		return "", hotplug{}, fmt.Errorf("%w: %w", vm.ErrBadSnapshot, err)
	}
	_, err = os.Stat(filepath.Join(src, snapMemory))
	hasRanges := err == nil
	plug, err := rewriteConfig(conf, cfg, p, hasRanges)
	if err != nil {
		return "", hotplug{}, fmt.Errorf("%w: %w", vm.ErrBadSnapshot, err)
	}
	out, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return "", hotplug{}, fmt.Errorf("encoding clone config: %w", err)
	}
	dir := filepath.Join(p.dir, cloneDirName)
	if err := os.RemoveAll(dir); err != nil {
		return "", hotplug{}, fmt.Errorf("clearing clone snapshot directory: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", hotplug{}, fmt.Errorf("creating clone snapshot directory: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, snapConfig), out, 0o600); err != nil {
		return "", hotplug{}, fmt.Errorf("writing clone config: %w", err)
	}
	if err := copyFile(filepath.Join(src, snapState), filepath.Join(dir, snapState)); err != nil {
		return "", hotplug{}, fmt.Errorf("copying snapshot state: %w", err)
	}
	if hasRanges {
		// The VMM only reads memory-ranges; fall back to a symlink
		// when the clone directory is on another filesystem.
		from, to := filepath.Join(src, snapMemory), filepath.Join(dir, snapMemory)
		if err := os.Link(from, to); err != nil {
			if err := os.Symlink(from, to); err != nil {
				return "", hotplug{}, fmt.Errorf("linking snapshot memory: %w", err)
			}
		}
	}
	return dir, plug, nil
}

// rewriteConfig edits a template's config.json (as generic JSON, so fields
// rund does not model survive) into the clone's, checking that the template
// matches cfg in everything a restore cannot change.
func rewriteConfig(conf map[string]any, cfg vm.Config, p paths, hasRanges bool) (hotplug, error) {
	var plug hotplug
	if err := rewriteCPUsAndMemory(conf, cfg, hasRanges); err != nil {
		return plug, err
	}
	vsock, ok := conf["vsock"].(map[string]any)
	if !ok {
		return plug, errors.New("template has no vsock device for the agent channel")
	}
	vsock["socket"] = p.vsock
	if err := rewriteSerial(conf, cfg.ConsoleLog); err != nil {
		return plug, err
	}
	if console, ok := conf["console"].(map[string]any); ok {
		if mode, _ := console["mode"].(string); mode == ConsoleFile || mode == "Socket" {
			return plug, fmt.Errorf("template's virtio console is a %s, which clones cannot share", mode)
		}
	}
	if len(objects(conf, "fs")) > 0 || len(cfg.Shares) > 0 {
		return plug, errors.New("virtio-fs shares cannot be restored (they need the template's virtiofsd and shared memory)")
	}
	if len(objects(conf, "net")) > 0 {
		return plug, errors.New("template has a NIC, whose identity every clone would share")
	}
	disks, err := rewriteDisks(conf, cfg)
	if err != nil {
		return plug, err
	}
	plug.disks = disks
	pmems, err := rewritePmems(conf, cfg)
	if err != nil {
		return plug, err
	}
	plug.pmems = pmems
	return plug, nil
}

func rewriteCPUsAndMemory(conf map[string]any, cfg vm.Config, hasRanges bool) error {
	cpus, _ := conf["cpus"].(map[string]any)
	if n := intField(cpus, "boot_vcpus"); n != int64(max(cfg.VCPUs, 1)) {
		return fmt.Errorf("template has %d vcpus, the clone wants %d", n, max(cfg.VCPUs, 1))
	}
	mem, ok := conf["memory"].(map[string]any)
	if !ok {
		return errors.New("template config has no memory section")
	}
	total := intField(mem, "size")
	zones := objects(mem, "zones")
	for _, z := range zones {
		total += intField(z, "size")
	}
	if want := int64(cfg.MemoryMiB) << 20; total != want {
		return fmt.Errorf("template has %d MiB of memory, the clone wants %d MiB", total>>20, cfg.MemoryMiB)
	}
	fileBacked := false
	for _, z := range zones {
		file, _ := z["file"].(string)
		if file == "" {
			continue
		}
		fileBacked = true
		if cfg.MemPath != "" {
			file = cfg.MemPath
			z["file"] = file
		}
		if err := sameSize(file, cfg.Files, intField(z, "size")); err != nil {
			return fmt.Errorf("memory zone %v: %w", z["id"], err)
		}
		// Private mapping: the clone's writes stay its own, and the
		// template's pages are shared until written.
		z["shared"] = false
	}
	if cfg.MemShared {
		return errors.New("a clone cannot map the template's memory file shared")
	}
	if cfg.MemPath != "" && !fileBacked {
		return errors.New("the clone wants file-backed memory, but the template's memory is not a file")
	}
	mem["shared"] = false
	if !hasRanges && (intField(mem, "size") > 0 || !fileBacked) {
		return fmt.Errorf("snapshot has no %s and its memory is not a file", snapMemory)
	}
	return nil
}

func rewriteSerial(conf map[string]any, consoleLog string) error {
	serial, _ := conf["serial"].(map[string]any)
	mode, _ := serial["mode"].(string)
	switch mode {
	case ConsoleNull, ConsoleFile:
		s := serialConfig(consoleLog)
		serial["mode"] = s.Mode
		if s.File != "" {
			serial["file"] = s.File
		} else {
			delete(serial, "file")
		}
		return nil
	case ConsoleOff, "":
		if consoleLog != "" {
			return errors.New("template has no serial port, so the clone's console cannot be logged")
		}
		return nil
	default:
		return fmt.Errorf("template's serial port is a %s, which clones cannot share", mode)
	}
}

// rewriteDisks points the template's disks at cfg's backings (matched by id)
// and returns cfg's disks the template lacks.
func rewriteDisks(conf map[string]any, cfg vm.Config) ([]DiskConfig, error) {
	tmpl := map[string]map[string]any{}
	for _, d := range objects(conf, "disks") {
		id, _ := d["id"].(string)
		tmpl[id] = d
	}
	var extra []DiskConfig
	for _, d := range cfg.Disks {
		t, ok := tmpl[d.ID]
		if !ok {
			extra = append(extra, diskConfig(d))
			continue
		}
		delete(tmpl, d.ID)
		if ro, _ := t["readonly"].(bool); ro != d.ReadOnly {
			return nil, fmt.Errorf("disk %s: read-only is %t in the template and %t in the clone", d.ID, ro, d.ReadOnly)
		}
		old, _ := t["path"].(string)
		if size, err := fileSize(old, nil); err == nil {
			if err := sameSize(d.Path, cfg.Files, size); err != nil {
				return nil, fmt.Errorf("disk %s: %w", d.ID, err)
			}
		}
		t["path"] = d.Path
	}
	if id, ok := firstKey(tmpl); ok {
		return nil, fmt.Errorf("template disk %q has no backing in the clone's config", id)
	}
	return extra, nil
}

// rewritePmems does for pmem devices what rewriteDisks does for disks.
func rewritePmems(conf map[string]any, cfg vm.Config) ([]PmemConfig, error) {
	tmpl := map[string]map[string]any{}
	for _, pm := range objects(conf, "pmem") {
		id, _ := pm["id"].(string)
		tmpl[id] = pm
	}
	var extra []PmemConfig
	for _, pm := range cfg.Pmems {
		t, ok := tmpl[pm.ID]
		if !ok {
			extra = append(extra, pmemConfig(pm))
			continue
		}
		delete(tmpl, pm.ID)
		if dw, _ := t["discard_writes"].(bool); dw != pm.ReadOnly {
			return nil, fmt.Errorf("pmem %s: read-only is %t in the template and %t in the clone", pm.ID, dw, pm.ReadOnly)
		}
		size := intField(t, "size")
		if pm.Size != 0 && pm.Size != size {
			return nil, fmt.Errorf("pmem %s: %d bytes in the template, %d in the clone", pm.ID, size, pm.Size)
		}
		if err := sameSize(pm.Path, cfg.Files, size); err != nil {
			return nil, fmt.Errorf("pmem %s: %w", pm.ID, err)
		}
		t["file"] = pm.Path
	}
	if id, ok := firstKey(tmpl); ok {
		return nil, fmt.Errorf("template pmem %q has no backing in the clone's config", id)
	}
	return extra, nil
}

// sameSize checks that path (possibly a /proc/self/fd/N name of one of
// files) holds exactly size bytes: a restore keeps the template's capacity.
func sameSize(path string, files []*os.File, size int64) error {
	got, err := fileSize(path, files)
	if err != nil {
		return err
	}
	if got != size {
		return fmt.Errorf("%s is %d bytes, the template's is %d", path, got, size)
	}
	return nil
}

// fileSize stats path, resolving the VMM's /proc/self/fd/N names (fd N is
// files[N-3] in the VMM) against our own open files.
func fileSize(path string, files []*os.File) (int64, error) {
	if rest, ok := strings.CutPrefix(path, "/proc/self/fd/"); ok {
		n, err := strconv.Atoi(rest)
		if err != nil || n < 3 || n-3 >= len(files) {
			return 0, fmt.Errorf("%s names no file handed to the vmm", path)
		}
		st, err := files[n-3].Stat()
		if err != nil {
			return 0, err
		}
		return st.Size(), nil
	}
	st, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// decodeObject decodes a JSON object keeping numbers exact.
func decodeObject(b []byte) (map[string]any, error) {
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	var m map[string]any
	if err := d.Decode(&m); err != nil {
		return nil, err
	}
	if m == nil {
		return nil, errors.New("not a JSON object")
	}
	return m, nil
}

// objects returns the objects in the array m[key].
func objects(m map[string]any, key string) []map[string]any {
	arr, _ := m[key].([]any)
	var out []map[string]any
	for _, v := range arr {
		if o, ok := v.(map[string]any); ok {
			out = append(out, o)
		}
	}
	return out
}

// firstKey returns the smallest key of m, if any.
func firstKey(m map[string]map[string]any) (string, bool) {
	keys := slices.Sorted(maps.Keys(m))
	if len(keys) == 0 {
		return "", false
	}
	return keys[0], true
}

// intField returns m[key] as an integer (0 when absent or not a number).
func intField(m map[string]any, key string) int64 {
	switch v := m[key].(type) {
	case json.Number:
		n, _ := v.Int64()
		return n
	case float64:
		return int64(v)
	}
	return 0
}
