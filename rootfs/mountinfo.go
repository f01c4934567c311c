package rootfs

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// overlayMount is an overlayfs mount as /proc/self/mountinfo shows it, with
// its layer paths made absolute.
type overlayMount struct {
	lower []string // top first, data-only layers last
	upper string   // "" for a read-only overlay
}

// overlayAt reports the overlay mounted at dir (an absolute, clean path
// without symlinks), or nil if the topmost mount at dir is not an overlay or
// its layers cannot be located.
func overlayAt(dir string) (*overlayMount, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("reading mountinfo: %w", err)
	}
	defer f.Close()
	return parseOverlayAt(f, dir, func(p string) bool {
		_, err := os.Stat(p)
		return err == nil
	})
}

// parseOverlayAt finds the topmost mount at dir in a mountinfo table and
// returns its layers if it is an overlay. Relative layer paths (used by
// containers/storage when the mount data would not fit in a page) are
// resolved against the nearest ancestor of dir under which every one of them
// exists; exists reports whether a path exists.
func parseOverlayAt(r io.Reader, dir string, exists func(string) bool) (*overlayMount, error) {
	var opts string
	var fstype string
	found := false
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 || unescapeOctal(fields[4]) != dir {
			continue
		}
		sep := -1
		for i := 6; i < len(fields); i++ {
			if fields[i] == "-" {
				sep = i
				break
			}
		}
		if sep < 0 || sep+3 >= len(fields) {
			return nil, fmt.Errorf("parsing mountinfo line %q: no super options", sc.Text())
		}
		// Later lines are mounted on top of earlier ones.
		found = true
		fstype = fields[sep+1]
		opts = fields[sep+3]
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading mountinfo: %w", err)
	}
	if !found || fstype != "overlay" {
		return nil, nil
	}
	m := &overlayMount{}
	for _, opt := range strings.Split(opts, ",") {
		name, val, _ := strings.Cut(opt, "=")
		switch name {
		case "lowerdir":
			m.lower = append(m.lower, splitLayers(unescapeOctal(val))...)
		case "lowerdir+", "datadir+":
			m.lower = append(m.lower, unescapeOctal(val))
		case "upperdir":
			m.upper = unescapeOctal(val)
		}
	}
	if len(m.lower) == 0 {
		return nil, nil
	}
	return resolveLayers(m, dir, exists), nil
}

// resolveLayers makes m's layer paths absolute, or returns nil if some
// relative path exists under no ancestor of dir.
func resolveLayers(m *overlayMount, dir string, exists func(string) bool) *overlayMount {
	all := append([]string{}, m.lower...)
	if m.upper != "" {
		all = append(all, m.upper)
	}
	relative := false
	for _, p := range all {
		if !filepath.IsAbs(p) {
			relative = true
		}
	}
	if !relative {
		return m
	}
	for base := filepath.Dir(dir); ; base = filepath.Dir(base) {
		ok := true
		for _, p := range all {
			if !filepath.IsAbs(p) && !exists(filepath.Join(base, p)) {
				ok = false
				break
			}
		}
		if ok {
			r := &overlayMount{}
			for _, p := range m.lower {
				r.lower = append(r.lower, absUnder(base, p))
			}
			if m.upper != "" {
				r.upper = absUnder(base, m.upper)
			}
			return r
		}
		if base == "/" {
			return nil
		}
	}
}

func absUnder(base, p string) string {
	if filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(base, p)
}

// splitLayers splits an unescaped overlay lowerdir value on the colons that
// separate layers ("::" marks the data-only layers that follow). A colon
// inside a path is written "\:".
func splitLayers(val string) []string {
	var layers []string
	var cur strings.Builder
	flush := func() {
		if cur.Len() > 0 {
			layers = append(layers, cur.String())
			cur.Reset()
		}
	}
	for i := 0; i < len(val); i++ {
		switch {
		case val[i] == '\\' && i+1 < len(val) && val[i+1] == ':':
			cur.WriteByte(':')
			i++
		case val[i] == ':':
			flush()
		default:
			cur.WriteByte(val[i])
		}
	}
	flush()
	return layers
}

// unescapeOctal undoes the kernel's \ooo escaping of spaces, tabs, newlines,
// backslashes and commas in mountinfo fields.
func unescapeOctal(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }
