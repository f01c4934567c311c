package container

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/rund-dev/rund/vm/agent/proto"
)

// maxBindFile bounds a host file that is copied into the guest for a bind
// mount (hosts, resolv.conf, hostname, .containerenv).
const maxBindFile = 1 << 20

// loadSpec reads and checks bundle/config.json.
func loadSpec(bundle string) (*specs.Spec, string, error) {
	if bundle == "" {
		return nil, "", errors.New("bundle path is empty")
	}
	abs, err := filepath.Abs(bundle)
	if err != nil {
		return nil, "", fmt.Errorf("bundle %s: %w", bundle, err)
	}
	if fi, err := os.Stat(abs); err != nil {
		return nil, "", fmt.Errorf("bundle %s: %w", abs, err)
	} else if !fi.IsDir() {
		return nil, "", fmt.Errorf("bundle %s: not a directory", abs)
	}
	b, err := os.ReadFile(filepath.Join(abs, "config.json"))
	if err != nil {
		return nil, "", fmt.Errorf("reading config.json of bundle %s: %w", abs, err)
	}
	var s specs.Spec
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, "", fmt.Errorf("parsing %s: %w", filepath.Join(abs, "config.json"), err)
	}
	if s.Root == nil || s.Root.Path == "" {
		return nil, "", errors.New("config.json: root.path is missing")
	}
	if s.Process == nil {
		return nil, "", errors.New("config.json: process is missing")
	}
	if len(s.Process.Args) == 0 {
		return nil, "", errors.New("config.json: process.args is empty")
	}
	if s.Process.Cwd == "" || !filepath.IsAbs(s.Process.Cwd) {
		return nil, "", fmt.Errorf("config.json: process.cwd %q is not an absolute path", s.Process.Cwd)
	}
	if err := checkCapabilities(s.Process.Capabilities); err != nil {
		return nil, "", err
	}
	rootfs := s.Root.Path
	if !filepath.IsAbs(rootfs) {
		rootfs = filepath.Join(abs, rootfs)
	}
	fi, err := os.Stat(rootfs)
	if err != nil {
		return nil, "", fmt.Errorf("rootfs %s (root.path %q): %w", rootfs, s.Root.Path, err)
	}
	if !fi.IsDir() {
		return nil, "", fmt.Errorf("rootfs %s (root.path %q): not a directory", rootfs, s.Root.Path)
	}
	return &s, abs, nil
}

// rootfsOf returns the absolute rootfs directory of a checked spec.
func rootfsOf(s *specs.Spec, bundle string) string {
	if filepath.IsAbs(s.Root.Path) {
		return filepath.Clean(s.Root.Path)
	}
	return filepath.Join(bundle, s.Root.Path)
}

// toProcess converts a spec process for the agent.
func toProcess(p *specs.Process) proto.Process {
	out := proto.Process{
		Args:            p.Args,
		Env:             p.Env,
		Cwd:             p.Cwd,
		UID:             p.User.UID,
		GID:             p.User.GID,
		AdditionalGids:  p.User.AdditionalGids,
		Umask:           p.User.Umask,
		Terminal:        p.Terminal,
		NoNewPrivileges: p.NoNewPrivileges,
	}
	if p.ConsoleSize != nil {
		out.Rows, out.Cols = uint16(p.ConsoleSize.Height), uint16(p.ConsoleSize.Width)
	}
	for _, r := range p.Rlimits {
		out.Rlimits = append(out.Rlimits, proto.Rlimit{Type: r.Type, Hard: r.Hard, Soft: r.Soft})
	}
	if c := p.Capabilities; c != nil {
		out.Capabilities = &proto.Capabilities{
			Bounding: c.Bounding, Effective: c.Effective, Inheritable: c.Inheritable,
			Permitted: c.Permitted, Ambient: c.Ambient,
		}
	}
	return out
}

// toCreateRequest converts the spec into what the agent needs, reading host
// files that are bind-mounted into the container and sharing host
// directories through share. Relative bind sources are relative to the
// bundle, as with runc. warn receives what cannot be honoured inside a VM.
func toCreateRequest(id, bundle string, s *specs.Spec, share shareFunc, warn func(string, ...any)) (proto.CreateRequest, error) {
	req := proto.CreateRequest{
		ID:       id,
		Hostname: s.Hostname,
		Process:  toProcess(s.Process),
		Root:     proto.Root{Readonly: s.Root.Readonly},
	}
	if s.Linux != nil {
		req.Sysctl = s.Linux.Sysctl
		req.MaskedPaths = s.Linux.MaskedPaths
		req.ReadonlyPaths = s.Linux.ReadonlyPaths
	}
	for _, m := range s.Mounts {
		pm := proto.Mount{Destination: m.Destination, Type: m.Type, Source: m.Source, Options: m.Options}
		if isBind(m) {
			src := m.Source
			if !filepath.IsAbs(src) {
				src = filepath.Join(bundle, src)
			}
			fi, err := os.Stat(src)
			if err != nil {
				return req, fmt.Errorf("bind mount %s -> %s: source: %w", m.Source, m.Destination, err)
			}
			switch {
			case fi.Mode().IsRegular():
				data, err := bindFileData(src, fi)
				if err != nil {
					return req, fmt.Errorf("bind mount %s -> %s: %w", m.Source, m.Destination, err)
				}
				pm.Data, pm.Type = data, "bind"
			case fi.IsDir() && path.Clean(m.Destination) == "/dev/shm":
				// Shared memory never crosses the VM boundary: the
				// guest's own tmpfs (podman binds a host shm directory,
				// whose size is the container's --shm-size).
				pm = proto.Mount{Destination: m.Destination, Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "nodev", "noexec", "mode=1777"}}
				var st unix.Statfs_t
				if unix.Statfs(src, &st) == nil && st.Type == unix.TMPFS_MAGIC {
					pm.Options = append(pm.Options, fmt.Sprintf("size=%d", st.Blocks*uint64(st.Bsize)))
				}
			case fi.IsDir():
				// A host directory: shared with the guest over 9p.
				tag, fsType, err := share(src, hasOption(m.Options, "ro"))
				if err != nil {
					return req, fmt.Errorf("bind mount %s -> %s: %w", m.Source, m.Destination, err)
				}
				pm.Type, pm.Source, pm.Tag = fsType, "", tag
			default:
				warn("bind mount of %s at %s: a %s cannot cross the VM boundary; skipped", m.Source, m.Destination, fileKind(fi.Mode()))
				continue
			}
		}
		req.Mounts = append(req.Mounts, pm)
	}
	return req, nil
}

// fileKind names what a non-regular, non-directory file is.
func fileKind(m fs.FileMode) string {
	switch {
	case m&fs.ModeSocket != 0:
		return "socket"
	case m&fs.ModeNamedPipe != 0:
		return "FIFO"
	case m&fs.ModeDevice != 0:
		return "device"
	}
	return "special file"
}

func hasOption(opts []string, want string) bool {
	return slices.Contains(opts, want)
}

func isBind(m specs.Mount) bool {
	if m.Type == "bind" || m.Type == "rbind" {
		return true
	}
	for _, o := range m.Options {
		if o == "bind" || o == "rbind" {
			return true
		}
	}
	return false
}

// bindFileData returns the content of the regular host file src (fi is
// its stat).
func bindFileData(src string, fi fs.FileInfo) ([]byte, error) {
	if fi.Size() > maxBindFile {
		return nil, fmt.Errorf("file of %d bytes is larger than %d", fi.Size(), maxBindFile)
	}
	b, err := os.ReadFile(src)
	if err != nil {
		return nil, err
	}
	if b == nil {
		b = []byte{}
	}
	return b, nil
}

// knownCapabilities are the Linux capability names (runtime-spec:
// process.capabilities) of kernels up to 6.x.
var knownCapabilities = capabilitySet()

func capabilitySet() map[string]bool {
	m := map[string]bool{}
	for _, c := range strings.Fields(`CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID
		SETUID SETPCAP LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW
		IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN
		SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE
		AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND
		AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE`) {
		m["CAP_"+c] = true
	}
	return m
}

// checkCapabilities rejects capability names the kernel has no mapping for
// (runtime-spec: such a value MUST cause an error).
func checkCapabilities(c *specs.LinuxCapabilities) error {
	if c == nil {
		return nil
	}
	for _, set := range [][]string{c.Bounding, c.Effective, c.Inheritable, c.Permitted, c.Ambient} {
		for _, name := range set {
			if !knownCapabilities[name] {
				return fmt.Errorf("config.json: unknown capability %q", name)
			}
		}
	}
	return nil
}
