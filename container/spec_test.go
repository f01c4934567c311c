package container

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/rund-dev/rund/vm/agent/proto"
)

func TestCheckCapabilities(t *testing.T) {
	tests := []struct {
		name    string
		caps    *specs.LinuxCapabilities
		wantErr bool
	}{
		{name: "none", caps: nil},
		{name: "known", caps: &specs.LinuxCapabilities{Bounding: []string{"CAP_CHOWN", "CAP_CHECKPOINT_RESTORE"}}},
		{name: "unknown", caps: &specs.LinuxCapabilities{Effective: []string{"CAP_TEST"}}, wantErr: true},
		{name: "no prefix", caps: &specs.LinuxCapabilities{Permitted: []string{"CHOWN"}}, wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := checkCapabilities(tc.caps)
			if (err != nil) != tc.wantErr {
				t.Errorf("got %v, want error %v", err, tc.wantErr)
			}
		})
	}
}

func TestValidateID(t *testing.T) {
	tests := []struct {
		id string
		ok bool
	}{
		{"abc", true}, {"a.b-c_d+e", true}, {"", false}, {"..", false}, {".", false},
		{"../x", false}, {"a/b", false}, {string(make([]byte, 1025)), false},
	}
	for _, tc := range tests {
		if err := ValidateID(tc.id); (err == nil) != tc.ok {
			t.Errorf("ValidateID(%q): got %v, want ok %v", tc.id, err, tc.ok)
		}
	}
}

func TestParseSignal(t *testing.T) {
	tests := []struct {
		in   string
		want int
		err  bool
	}{
		{"", 15, false}, {"9", 9, false}, {"KILL", 9, false}, {"sigterm", 15, false},
		{"SIGUSR1", 10, false}, {"SIGNOPE", 0, true}, {"0", 0, true}, {"99", 0, true},
	}
	for _, tc := range tests {
		got, err := ParseSignal(tc.in)
		if (err != nil) != tc.err || (err == nil && int(got) != tc.want) {
			t.Errorf("ParseSignal(%q) = %d, %v; want %d, error %v", tc.in, got, err, tc.want, tc.err)
		}
	}
}

func TestHostDirectoriesShared(t *testing.T) {
	vol, ro, file := t.TempDir(), t.TempDir(), filepath.Join(t.TempDir(), "hosts")
	if err := os.WriteFile(file, []byte("127.0.0.1 x\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	s := &specs.Spec{
		Process: &specs.Process{Args: []string{"true"}},
		Root:    &specs.Root{Path: "rootfs"},
		Mounts: []specs.Mount{
			{Destination: "/data", Type: "bind", Source: vol, Options: []string{"rbind", "rw"}},
			{Destination: "/again", Type: "bind", Source: vol, Options: []string{"rbind"}},
			{Destination: "/ro", Source: ro, Options: []string{"bind", "ro"}},
			{Destination: "/etc/hosts", Type: "bind", Source: file, Options: []string{"bind"}},
			{Destination: "/dev/shm", Type: "bind", Source: t.TempDir(), Options: []string{"bind"}},
		},
	}
	shares := newShareSet(4, "qemu", "rund")
	req, err := toCreateRequest("c", "/bundle", s, shares.add, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	byDest := map[string]proto.Mount{}
	for _, m := range req.Mounts {
		byDest[m.Destination] = m
	}
	if m := byDest["/data"]; m.Tag != "rund0" || m.Type != "9p" || m.Source != "" {
		t.Errorf("/data: %+v", m)
	}
	if m := byDest["/again"]; m.Tag != "rund0" {
		t.Errorf("the same directory shared twice got its own share: %+v", m)
	}
	if m := byDest["/ro"]; m.Tag != "rund1" {
		t.Errorf("/ro: %+v", m)
	}
	if m := byDest["/etc/hosts"]; m.Tag != "" || string(m.Data) != "127.0.0.1 x\n" {
		t.Errorf("a host file is copied, not shared: %+v", m)
	}
	if m := byDest["/dev/shm"]; m.Type != "tmpfs" || m.Tag != "" {
		t.Errorf("/dev/shm stays the guest's tmpfs: %+v", m)
	}
	if len(shares.list) != 2 || shares.list[0].Path != vol || shares.list[0].ReadOnly || !shares.list[1].ReadOnly {
		t.Errorf("shares: %+v", shares.list)
	}

	// More directories than the config allows: a clear error.
	one := newShareSet(1, "qemu", "rund")
	if _, err := toCreateRequest("c", "/bundle", s, one.add, t.Logf); err == nil || !strings.Contains(err.Error(), "shares = 1") {
		t.Errorf("two directories with shares = 1: %v", err)
	}
	// A missing source names the problem.
	s.Mounts = []specs.Mount{{Destination: "/x", Type: "bind", Source: "/nonexistent/dir"}}
	if _, err := toCreateRequest("c", "/bundle", s, shares.add, t.Logf); err == nil || !strings.Contains(err.Error(), "/nonexistent/dir") {
		t.Errorf("missing source: %v", err)
	}
	// Cloud Hypervisor shares with virtio-fs.
	if tag, typ, err := newShareSet(1, "cloud-hypervisor", "rund").add(vol, false); err != nil || tag != "rund0" || typ != "virtiofs" {
		t.Errorf("cloud-hypervisor share: %q %q %v", tag, typ, err)
	}
}

func TestShareClass(t *testing.T) {
	for _, c := range []struct{ n, max, want int }{
		{0, 4, 0}, {1, 4, 1}, {2, 4, 2}, {3, 4, 4}, {4, 4, 4}, {3, 3, 3}, {5, 8, 8},
	} {
		if got := shareClass(c.n, c.max); got != c.want {
			t.Errorf("shareClass(%d, %d) = %d, want %d", c.n, c.max, got, c.want)
		}
	}
}

func TestBindSourceKinds(t *testing.T) {
	bundle := t.TempDir()
	os.Mkdir(filepath.Join(bundle, "data"), 0o755)
	sock := filepath.Join(t.TempDir(), "s")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	s := &specs.Spec{
		Process: &specs.Process{Args: []string{"true"}},
		Root:    &specs.Root{Path: "rootfs"},
		Mounts: []specs.Mount{
			{Destination: "/data", Type: "bind", Source: "data", Options: []string{"rbind"}},
			{Destination: "/run/s", Type: "bind", Source: sock, Options: []string{"bind"}},
		},
	}
	shares := newShareSet(4, "qemu", "rund")
	var warned []string
	req, err := toCreateRequest("c", bundle, s, shares.add, func(f string, a ...any) { warned = append(warned, fmt.Sprintf(f, a...)) })
	if err != nil {
		t.Fatal(err)
	}
	if len(shares.list) != 1 || shares.list[0].Path != filepath.Join(bundle, "data") {
		t.Errorf("relative source not resolved against the bundle: %+v", shares.list)
	}
	if len(req.Mounts) != 1 || len(warned) != 1 || !strings.Contains(warned[0], "socket") {
		t.Errorf("socket bind: mounts %+v, warnings %q", req.Mounts, warned)
	}
	// Debian's cloud kernel has no 9p: refused, naming it.
	if _, _, err := newShareSet(4, "qemu", "cloud").add(bundle, false); err == nil || !strings.Contains(err.Error(), "cloud kernel") {
		t.Errorf("share on the cloud kernel: %v", err)
	}
	// Cloud Hypervisor cannot share read-only.
	if _, _, err := newShareSet(1, "cloud-hypervisor", "rund").add(bundle, true); err == nil {
		t.Error("read-only virtio-fs share accepted")
	}
}
