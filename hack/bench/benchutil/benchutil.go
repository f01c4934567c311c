// Package benchutil holds what rund's benchmark programs share: writing the
// JSON result, reading the load average, removing a test cgroup parent.
package benchutil

import (
	"encoding/json"
	"os"
	"path/filepath"
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
