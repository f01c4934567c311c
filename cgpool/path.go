package cgpool

import (
	"fmt"
	"path"
	"strings"
)

// ResolvePath splits a container's linux.cgroupsPath into the pool parent
// and the container's cgroup name, as cgroupfs paths relative to each
// hierarchy's root:
//
//   - "" puts the container at DefaultParent/<id> (with systemd,
//     /system.slice/rund-<id>.scope; an empty slice is system.slice too);
//   - "/a/b/c" is absolute: parent "/a/b", name "c";
//   - "a/b" is relative to the runtime-determined location DefaultParent,
//     as the runtime-spec allows: parent "/rund/a", name "b";
//   - with systemd, "slice:prefix:name" maps the slice to its nested
//     cgroupfs path and the unit to "<prefix>-<name>.scope", e.g.
//     "machine.slice:libpod:<id>" gives parent "/machine.slice",
//     name "libpod-<id>.scope", and "a-b.slice:p:n" parent "/a.slice/a-b.slice".
func ResolvePath(cgroupsPath string, systemd bool, id string) (parent, name string, err error) {
	if id == "" || strings.ContainsAny(id, "/\x00") {
		return "", "", fmt.Errorf("resolving cgroupsPath: %w: container id %q", ErrInvalidName, id)
	}
	if systemd {
		return resolveSystemd(cgroupsPath, id)
	}
	if cgroupsPath == "" {
		return DefaultParent, id, nil
	}
	p := cgroupsPath
	if !strings.HasPrefix(p, "/") {
		p = DefaultParent + "/" + p
	}
	for _, c := range strings.Split(p, "/") {
		if c == ".." {
			return "", "", fmt.Errorf("resolving cgroupsPath %q: %w: contains ..", cgroupsPath, ErrInvalidName)
		}
	}
	p = path.Clean(p)
	parent, name = path.Split(p)
	if name == "" {
		return "", "", fmt.Errorf("resolving cgroupsPath %q: %w: needs a name", cgroupsPath, ErrInvalidName)
	}
	return path.Clean(parent), name, nil
}

func resolveSystemd(cgroupsPath, id string) (string, string, error) {
	slice, prefix, unit := "system.slice", "rund", id
	if cgroupsPath != "" {
		f := strings.Split(cgroupsPath, ":")
		if len(f) != 3 {
			return "", "", fmt.Errorf("resolving cgroupsPath %q: %w: want slice:prefix:name", cgroupsPath, ErrInvalidName)
		}
		prefix, unit = f[1], f[2]
		if f[0] != "" {
			slice = f[0]
		}
	}
	parent, err := expandSlice(slice)
	if err != nil {
		return "", "", fmt.Errorf("resolving cgroupsPath %q: %w", cgroupsPath, err)
	}
	name := unit
	if !strings.HasSuffix(unit, ".slice") {
		name = prefix + "-" + unit + ".scope" // as runc names the scope
	}
	if strings.ContainsAny(name, "/") || unit == "" {
		return "", "", fmt.Errorf("resolving cgroupsPath %q: %w", cgroupsPath, ErrInvalidName)
	}
	if parent == "/" {
		return "", "", fmt.Errorf("resolving cgroupsPath %q: %w: the root slice cannot be a pool parent", cgroupsPath, ErrInvalidName)
	}
	return parent, name, nil
}

// expandSlice turns a systemd slice name into its cgroupfs path: each dash
// nests the slice under its prefix ("a-b-c.slice" is
// "/a.slice/a-b.slice/a-b-c.slice"); "-.slice" is the root.
func expandSlice(slice string) (string, error) {
	if slice == "-.slice" {
		return "/", nil
	}
	base, ok := strings.CutSuffix(slice, ".slice")
	if !ok || strings.Contains(base, "/") || strings.HasPrefix(base, "-") ||
		strings.HasSuffix(base, "-") || strings.Contains(base, "--") {
		return "", fmt.Errorf("%w: slice %q", ErrInvalidName, slice)
	}
	var b strings.Builder
	for i := range len(base) {
		if base[i] == '-' {
			b.WriteString("/" + base[:i] + ".slice")
		}
	}
	b.WriteString("/" + slice)
	return b.String(), nil
}
