package guest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestParseOptions(t *testing.T) {
	tests := []struct {
		name  string
		opts  []string
		flags uintptr
		prop  uintptr
		data  string
	}{
		{name: "empty"},
		{name: "flags and data", opts: []string{"nosuid", "noexec", "mode=755", "size=65536k"}, flags: unix.MS_NOSUID | unix.MS_NOEXEC, data: "mode=755,size=65536k"},
		{name: "rw clears ro", opts: []string{"ro", "rw"}},
		{name: "rbind rprivate", opts: []string{"rbind", "rprivate", "ro"}, flags: unix.MS_BIND | unix.MS_REC | unix.MS_RDONLY, prop: unix.MS_PRIVATE | unix.MS_REC},
		{name: "ignored", opts: []string{"defaults", "tmpcopyup", "x-foo"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := parseOptions(tt.opts)
			if got.flags != tt.flags || got.prop != tt.prop || got.data != tt.data {
				t.Errorf("got %#x %#x %q, want %#x %#x %q", got.flags, got.prop, got.data, tt.flags, tt.prop, tt.data)
			}
		})
	}
}

func TestUnescapeMountinfo(t *testing.T) {
	tests := []struct{ in, want string }{
		{`/a/b`, "/a/b"},
		{`/a\040b`, "/a b"},
		{`/a\134b`, `/a\b`},
		{`/a\04`, `/a\04`},
	}
	for _, tt := range tests {
		if got := unescapeMountinfo(tt.in); got != tt.want {
			t.Errorf("unescapeMountinfo(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestCapSet(t *testing.T) {
	got := capSet([]string{"CAP_CHOWN", "CAP_KILL", "cap_sys_admin", "CAP_FUTURE", "CAP_CHECKPOINT_RESTORE"}, 39)
	want := uint64(1<<0 | 1<<5 | 1<<21)
	if got != want {
		t.Errorf("got %#x, want %#x", got, want)
	}
}

func TestLookPath(t *testing.T) {
	dir := t.TempDir()
	exe := filepath.Join(dir, "prog")
	if err := os.WriteFile(exe, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "data"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, arg0 string
		env        []string
		want       string // result, or a substring of the error
		wantErr    bool
	}{
		{name: "on PATH", arg0: "prog", env: []string{"PATH=/nonexistent:" + dir}, want: exe},
		{name: "not on PATH", arg0: "prog", env: []string{"PATH=/nonexistent"}, want: "executable file not found in $PATH", wantErr: true},
		{name: "absolute", arg0: exe, want: exe},
		{name: "absolute missing", arg0: dir + "/nope", want: "no such file or directory", wantErr: true},
		{name: "not executable", arg0: dir + "/data", want: "permission denied", wantErr: true},
		{name: "directory", arg0: dir, want: "permission denied", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := lookPath(tt.arg0, tt.env)
			if tt.wantErr {
				if err == nil || !strings.Contains(err.Error(), tt.want) {
					t.Errorf("got %q, %v; want error containing %q", got, err, tt.want)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Errorf("got %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}

func TestExitStatus(t *testing.T) {
	tests := []struct {
		name string
		ws   unix.WaitStatus
		want int
	}{
		{name: "exit 3", ws: unix.WaitStatus(3 << 8), want: 3},
		{name: "killed", ws: unix.WaitStatus(9), want: 137},
	}
	for _, tt := range tests {
		if got := exitStatus(tt.ws); got != tt.want {
			t.Errorf("%s: got %d, want %d", tt.name, got, tt.want)
		}
	}
}

func TestIsGuestOnHost(t *testing.T) {
	if IsGuest() {
		t.Error("IsGuest is true in a test binary")
	}
}
