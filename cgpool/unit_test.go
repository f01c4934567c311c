package cgpool

import (
	"errors"
	"strings"
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
		{name: "top level", path: "/abc", parent: "/", cg: "abc"},
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

func TestRecordValues(t *testing.T) {
	tests := []struct {
		name string
		s    slot
	}{
		{name: "idle fresh", s: slot{id: 0, state: stateIdle}},
		{name: "idle with values", s: slot{id: 3, state: stateIdle, mask: fieldMemory | fieldPids | fieldCpusetCpus,
			set: fieldMemory | fieldCpusetCpus, vals: values{memory: 1 << 40}}},
		{name: "all numeric", s: slot{id: 4095, state: stateBusy, owner: owner{pid: 4194304, start: 1<<64 - 1},
			mask: fieldAll, set: fieldAll, name: strings.Repeat("n", maxNameLen),
			vals: values{memory: -1 << 63, swap: 1<<63 - 1, reservation: 5, shares: 1<<64 - 1, quota: -1, period: 1000, pids: 7, blkio: 1000}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			line := encodeSlot(tt.s)
			if len(line) != lineSize {
				t.Fatalf("got line of %d bytes, want %d", len(line), lineSize)
			}
			got, err := decodeSlot(line, tt.s.id)
			if err != nil || got != tt.s {
				t.Fatalf("got %+v %v, want %+v", got, err, tt.s)
			}
		})
	}
	if _, err := decodeValues("1/2", fieldMemory); err == nil {
		t.Fatal("too many values accepted")
	}
	if _, err := decodeValues("-", fieldPids); err == nil {
		t.Fatal("missing value accepted")
	}
}

func TestPlan(t *testing.T) {
	mem := func(m int64) values { return values{memory: m, shares: 512, pids: 10} }
	shape := fieldMemory | fieldCPUShares | fieldPids
	tests := []struct {
		name         string
		prev         slot
		m            fieldMask
		v            values
		reset, apply fieldMask
	}{
		{name: "fresh slot", m: shape, v: mem(1), apply: shape},
		{name: "fresh slot, no limits"},
		{name: "same shape", prev: slot{mask: shape, set: shape, vals: mem(1)}, m: shape, v: mem(1)},
		{name: "other memory", prev: slot{mask: shape, set: shape, vals: mem(1)}, m: shape, v: mem(2), apply: fieldMemory},
		{name: "no limits after limits", prev: slot{mask: shape, set: shape, vals: mem(1)}, reset: shape},
		{name: "swap dropped rewrites memory", prev: slot{mask: fieldMemory | fieldMemorySwap, set: fieldMemory | fieldMemorySwap, vals: values{memory: 1, swap: 2}},
			m: fieldMemory, v: values{memory: 1}, reset: fieldMemory | fieldMemorySwap, apply: fieldMemory},
		{name: "value unknown", prev: slot{mask: fieldPids}, m: fieldPids, v: mem(1), apply: fieldPids},
		{name: "left over from a crash", prev: slot{mask: fieldPids | fieldMemory, set: fieldPids, vals: mem(1)}, m: fieldPids, v: mem(1), reset: fieldMemory},
		{name: "cpuset always written", prev: slot{mask: fieldCpusetCpus, set: fieldCpusetCpus}, m: fieldCpusetCpus, apply: fieldCpusetCpus},
		{name: "rebuilt slot", prev: slot{mask: fieldAll}, m: fieldPids, v: mem(1), reset: fieldAll, apply: fieldPids},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			reset, apply := plan(tt.prev, tt.m, tt.v)
			if reset != tt.reset || apply != tt.apply {
				t.Fatalf("got reset %b apply %b, want %b %b", reset, apply, tt.reset, tt.apply)
			}
		})
	}
}
