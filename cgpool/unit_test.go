package cgpool

import (
	"errors"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

func TestResolvePath(t *testing.T) {
	tests := []struct {
		name, path  string
		systemd     bool
		parent, cg  string
		wantInvalid bool
	}{
		{name: "empty", path: "", parent: "/rund", cg: "abc"},
		{name: "absolute", path: "/kubepods/pod1/abc", parent: "/kubepods/pod1", cg: "abc"},
		{name: "absolute unclean", path: "/a//b/./c/", parent: "/a/b", cg: "c"},
		{name: "relative", path: "pods/abc", parent: "/rund/pods", cg: "abc"},
		{name: "relative leaf", path: "abc", parent: "/rund", cg: "abc"},
		{name: "dotdot", path: "/a/../../b", wantInvalid: true},
		{name: "top level", path: "/abc", wantInvalid: true},
		{name: "systemd empty", systemd: true, parent: "/system.slice", cg: "rund-abc.scope"},
		{name: "systemd libpod", path: "machine.slice:libpod:abc", systemd: true, parent: "/machine.slice", cg: "libpod-abc.scope"},
		{name: "systemd nested", path: "machine-libpod_pod_x.slice:crio:abc", systemd: true, parent: "/machine.slice/machine-libpod_pod_x.slice", cg: "crio-abc.scope"},
		{name: "systemd empty slice", path: ":crio:abc", systemd: true, parent: "/system.slice", cg: "crio-abc.scope"},
		{name: "systemd slice unit", path: "a.slice:x:a-b.slice", systemd: true, parent: "/a.slice", cg: "a-b.slice"},
		{name: "systemd bad form", path: "machine.slice/abc", systemd: true, wantInvalid: true},
		{name: "systemd bad slice", path: "a--b.slice:p:n", systemd: true, wantInvalid: true},
		{name: "systemd root slice", path: "-.slice:p:n", systemd: true, wantInvalid: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			parent, cg, err := ResolvePath(tt.path, tt.systemd, "abc")
			if tt.wantInvalid {
				if !errors.Is(err, ErrInvalidName) {
					t.Fatalf("got %q %q %v, want ErrInvalidName", parent, cg, err)
				}
				return
			}
			if err != nil || parent != tt.parent || cg != tt.cg {
				t.Fatalf("got %q %q %v, want %q %q", parent, cg, err, tt.parent, tt.cg)
			}
		})
	}
}

func TestHostResources(t *testing.T) {
	i64 := func(v int64) *int64 { return &v }
	u64 := func(v uint64) *uint64 { return &v }
	u16 := func(v uint16) *uint16 { return &v }
	tests := []struct {
		name string
		res  *specs.LinuxResources
		mask fieldMask
		mem  int64
	}{
		{name: "nil", res: nil},
		{name: "defaults skipped", res: &specs.LinuxResources{
			Memory: &specs.LinuxMemory{Limit: i64(-1)},
			CPU:    &specs.LinuxCPU{Shares: u64(1024), Period: u64(100000)},
			Pids:   &specs.LinuxPids{Limit: i64(0)},
		}},
		{name: "memory with overhead", res: &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: i64(1000)}},
			mask: fieldMemory, mem: 1000 + 64},
		{name: "all", res: &specs.LinuxResources{
			Memory:  &specs.LinuxMemory{Limit: i64(1000), Swap: i64(2000), Reservation: i64(500)},
			CPU:     &specs.LinuxCPU{Shares: u64(512), Quota: u64ToI(50000), Period: u64(50000), Cpus: "0", Mems: "0"},
			Pids:    &specs.LinuxPids{Limit: i64(100)},
			BlockIO: &specs.LinuxBlockIO{Weight: u16(200)},
		}, mask: fieldAll, mem: 1000 + 64},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, m, err := hostResources(tt.res, 64)
			if err != nil {
				t.Fatal(err)
			}
			if m != tt.mask || r.Memory != tt.mem {
				t.Fatalf("got mask %b memory %d, want %b %d", m, r.Memory, tt.mask, tt.mem)
			}
		})
	}
	if _, _, err := hostResources(&specs.LinuxResources{Unified: map[string]string{"memory.max": "1"}}, 0); err == nil {
		t.Fatal("unified resources accepted, want an error")
	}
}

func u64ToI(v int64) *int64 { return &v }

func TestRecordLines(t *testing.T) {
	s := slot{id: 7, state: stateBusy, owner: owner{pid: 42, start: 99}, mask: fieldMemory | fieldPids, name: "libpod-abc.scope"}
	line := encodeSlot(s)
	if len(line) != lineSize {
		t.Fatalf("got line of %d bytes, want %d", len(line), lineSize)
	}
	got, err := decodeSlot(line, 7)
	if err != nil || got != s {
		t.Fatalf("got %+v %v, want %+v", got, err, s)
	}
	bad := append([]byte(nil), line...)
	bad[3] ^= 1
	if _, err := decodeSlot(bad, 7); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("flipped bit: got %v, want ErrCorrupt", err)
	}
	if _, err := decodeSlot(line, 8); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("wrong index: got %v, want ErrCorrupt", err)
	}
}
