// Package benchutil holds what rund's benchmark programs share: writing the
// JSON result, reading the load average, removing a test cgroup parent,
// making busybox bundles, reading meminfo-style files, PSS and a sandbox's
// pids.
package benchutil

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
)

// WriteJSON writes v, indented, to path (creating its directory).
func WriteJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// LoadAvg returns the 1, 5 and 15 minute load averages, or "" when unknown.
func LoadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

// RemoveCgroupParent removes the (empty) cgroup parent from every v1
// hierarchy and from a v2 root.
func RemoveCgroupParent(parent string) {
	dirs, _ := filepath.Glob("/sys/fs/cgroup/*" + parent)
	dirs2, _ := filepath.Glob("/sys/fs/cgroup" + parent)
	for _, d := range append(dirs, dirs2...) {
		os.Remove(d)
	}
}

// BusyboxRootfs makes a rootfs at dir holding the static busybox binary and
// a link for each of its applets in /bin.
func BusyboxRootfs(dir, busybox string) error {
	for _, d := range []string{"bin", "proc", "sys", "dev", "tmp", "etc", "root"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return err
		}
	}
	src, err := os.ReadFile(busybox)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "bin", "busybox"), src, 0o755); err != nil {
		return err
	}
	list, err := exec.Command(busybox, "--list").Output()
	if err != nil {
		return fmt.Errorf("busybox --list: %w", err)
	}
	for _, a := range strings.Fields(string(list)) {
		if a == "busybox" || strings.Contains(a, "/") {
			continue
		}
		if err := os.Symlink("busybox", filepath.Join(dir, "bin", a)); err != nil && !errors.Is(err, os.ErrExist) {
			return err
		}
	}
	return nil
}

// Bundle writes dir/config.json: `rund spec`'s default with rootfs (absolute,
// writable), the annotations (if any) and the process args, without a
// terminal.
func Bundle(rund, dir, rootfs string, annotations map[string]string, args ...string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	cfg := filepath.Join(dir, "config.json")
	os.Remove(cfg)
	if out, err := exec.Command(rund, "spec", "-b", dir).CombinedOutput(); err != nil {
		return fmt.Errorf("rund spec: %v: %s", err, out)
	}
	raw, err := os.ReadFile(cfg)
	if err != nil {
		return err
	}
	var s map[string]any
	if err := json.Unmarshal(raw, &s); err != nil {
		return fmt.Errorf("rund spec output: %w", err)
	}
	proc, _ := s["process"].(map[string]any)
	root, _ := s["root"].(map[string]any)
	if proc == nil || root == nil {
		return errors.New("rund spec output has no process or root")
	}
	proc["terminal"] = false
	proc["args"] = args
	root["path"] = rootfs
	root["readonly"] = false
	if annotations != nil {
		s["annotations"] = annotations
	}
	out, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(cfg, out, 0o644)
}

// ParseMeminfo reads "Key:   123 kB" lines (/proc/meminfo, smaps_rollup)
// into MiB by key; a value without "kB" is kept as is.
func ParseMeminfo(s string) map[string]float64 {
	m := map[string]float64{}
	for _, line := range strings.Split(s, "\n") {
		k, rest, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			continue
		}
		if len(f) > 1 && f[1] == "kB" {
			v /= 1024
		}
		m[strings.TrimSpace(k)] = v
	}
	return m
}

// MeminfoFileMiB reads key from a meminfo-style file, in MiB (0 if absent).
func MeminfoFileMiB(path, key string) float64 {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	return ParseMeminfo(string(b))[key]
}

// PssMiB is a process's PSS from /proc/PID/smaps_rollup.
func PssMiB(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0, err
	}
	v, ok := ParseMeminfo(string(b))["Pss"]
	if !ok {
		return 0, fmt.Errorf("pid %d: no Pss in smaps_rollup", pid)
	}
	return v, nil
}

// SandboxPids reads the shim's and the VMM's pids from rund's own state of
// container id under the state root.
func SandboxPids(root, id string) (shim, vmm int, err error) {
	b, err := os.ReadFile(filepath.Join(root, id, "state.json"))
	if err != nil {
		return 0, 0, err
	}
	var st struct {
		Shim struct {
			Pid int `json:"pid"`
		} `json:"shim"`
		VMM struct {
			Pid int `json:"pid"`
		} `json:"vmm"`
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return 0, 0, fmt.Errorf("%s state.json: %w", id, err)
	}
	if st.VMM.Pid <= 0 {
		return 0, 0, fmt.Errorf("%s state.json: no vmm.pid", id)
	}
	return st.Shim.Pid, st.VMM.Pid, nil
}

// CPUTicks reads the host's aggregate cpu line of /proc/stat: the busy and
// the total time of all CPUs, in USER_HZ ticks (guest time is already in
// user and nice, so it is not added again).
func CPUTicks() (busy, total uint64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	for i, v := range f[1:] {
		if i >= 8 { // guest, guest_nice
			break
		}
		n, _ := strconv.ParseUint(v, 10, 64)
		total += n
		if i != 3 && i != 4 { // idle, iowait
			busy += n
		}
	}
	return busy, total
}
