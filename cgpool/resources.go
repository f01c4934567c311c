package cgpool

import (
	"bytes"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/opencontainers/cgroups"
	"github.com/opencontainers/cgroups/fs"
	"github.com/opencontainers/cgroups/fs2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// fieldMask records which resource fields were written to a slot, so that
// Release resets exactly those and Acquire skips values a fresh cgroup
// already has.
type fieldMask uint32

const (
	fieldMemory fieldMask = 1 << iota
	fieldMemorySwap
	fieldMemoryReservation
	fieldCPUShares
	fieldCPUQuota
	fieldCPUPeriod
	fieldCpusetCpus
	fieldCpusetMems
	fieldPids
	fieldBlkioWeight

	fieldAll = 1<<iota - 1
)

const (
	defaultCPUShares = 1024
	defaultCPUPeriod = 100000
	defaultCPUWeight = 100
	defaultIOWeight  = 100
)

// hostResources turns the spec's resources into what the VMM's cgroup gets:
// only the fields rund enforces on the host (memory, CPU, cpuset, pids,
// block I/O weight), with overhead added to the memory limits because the
// VMM holds the guest's memory plus its own. Fields equal to a fresh
// cgroup's defaults are dropped. Devices, network and hugepage limits are
// enforced inside the guest, not on the VMM.
func hostResources(res *specs.LinuxResources, overhead int64) (*cgroups.Resources, fieldMask, error) {
	r := &cgroups.Resources{}
	var m fieldMask
	if res == nil {
		return r, 0, nil
	}
	if len(res.Unified) > 0 {
		return nil, 0, fmt.Errorf("linux.resources.unified is not supported by the cgroup pool")
	}
	if mem := res.Memory; mem != nil {
		if mem.Limit != nil && *mem.Limit > 0 {
			r.Memory, m = *mem.Limit+overhead, m|fieldMemory
		}
		if mem.Swap != nil && *mem.Swap > 0 {
			r.MemorySwap, m = *mem.Swap+overhead, m|fieldMemorySwap
		}
		if mem.Reservation != nil && *mem.Reservation > 0 {
			r.MemoryReservation, m = *mem.Reservation, m|fieldMemoryReservation
		}
	}
	if cpu := res.CPU; cpu != nil {
		if cpu.Shares != nil && *cpu.Shares != 0 && *cpu.Shares != defaultCPUShares {
			r.CpuShares, m = *cpu.Shares, m|fieldCPUShares
		}
		if cpu.Quota != nil && *cpu.Quota > 0 {
			r.CpuQuota, m = *cpu.Quota, m|fieldCPUQuota
		}
		if cpu.Period != nil && *cpu.Period != 0 && *cpu.Period != defaultCPUPeriod {
			r.CpuPeriod, m = *cpu.Period, m|fieldCPUPeriod
		}
		if cpu.Cpus != "" {
			r.CpusetCpus, m = cpu.Cpus, m|fieldCpusetCpus
		}
		if cpu.Mems != "" {
			r.CpusetMems, m = cpu.Mems, m|fieldCpusetMems
		}
	}
	if p := res.Pids; p != nil && p.Limit != nil && *p.Limit > 0 {
		l := *p.Limit
		r.PidsLimit, m = &l, m|fieldPids
	}
	if b := res.BlockIO; b != nil && b.Weight != nil && *b.Weight != 0 && *b.Weight != defaultIOWeight {
		r.BlkioWeight, m = *b.Weight, m|fieldBlkioWeight
	}
	return r, m, nil
}

// v1 controllers touched by each field.
var fieldControllers = []struct {
	mask fieldMask
	ctrl string
}{
	{fieldMemory | fieldMemorySwap | fieldMemoryReservation, "memory"},
	{fieldCPUShares | fieldCPUQuota | fieldCPUPeriod, "cpu"},
	{fieldCpusetCpus | fieldCpusetMems, "cpuset"},
	{fieldPids, "pids"},
	{fieldBlkioWeight, "blkio"},
}

type v1Setter interface {
	Set(path string, r *cgroups.Resources) error
}

func v1Group(ctrl string) v1Setter {
	switch ctrl {
	case "memory":
		return &fs.MemoryGroup{}
	case "cpu":
		return &fs.CpuGroup{}
	case "cpuset":
		return &fs.CpusetGroup{}
	case "pids":
		return &fs.PidsGroup{}
	case "blkio":
		return &fs.BlkioGroup{}
	}
	return nil
}

// applyResources writes r, whose set fields are m, to the cgroup at paths.
func applyResources(mode Mode, paths map[string]string, r *cgroups.Resources, m fieldMask) error {
	if m == 0 {
		return nil
	}
	if mode == ModeV2 {
		mgr, err := fs2.NewManager(&cgroups.Cgroup{Resources: r}, paths[""])
		if err != nil {
			return fmt.Errorf("applying resources: %w", err)
		}
		if err := mgr.Set(r); err != nil {
			return fmt.Errorf("applying resources: %w", err)
		}
		return nil
	}
	for _, fc := range fieldControllers {
		if m&fc.mask == 0 {
			continue
		}
		p, ok := paths[fc.ctrl]
		if !ok {
			return fmt.Errorf("applying %s resources: controller not in the pool (Options.Controllers)", fc.ctrl)
		}
		if err := v1Group(fc.ctrl).Set(p, r); err != nil {
			return fmt.Errorf("applying %s resources: %w", fc.ctrl, err)
		}
	}
	return nil
}

// resetResources writes a fresh cgroup's defaults to every field in m.
func resetResources(mode Mode, paths map[string]string, m fieldMask) error {
	if m == fieldAll {
		// What was written is unknown (a slot found by a rebuild): reset
		// whatever this cgroup has.
		m = presentFields(mode, paths)
	}
	if mode == ModeV2 {
		if m == 0 {
			return nil
		}
		return resetV2(paths[""], m)
	}
	for _, fc := range fieldControllers {
		if _, ok := paths[fc.ctrl]; !ok {
			m &^= fc.mask // never written: the pool has no such hierarchy
		}
	}
	if m == 0 {
		return nil
	}
	r := &cgroups.Resources{}
	if m&(fieldMemory|fieldMemorySwap) != 0 {
		r.Memory = -1 // the library lifts memsw first when it exists
	}
	if m&fieldMemoryReservation != 0 {
		r.MemoryReservation = -1
	}
	if m&fieldCPUShares != 0 {
		r.CpuShares = defaultCPUShares
	}
	if m&fieldCPUQuota != 0 {
		r.CpuQuota = -1
	}
	if m&(fieldCPUPeriod|fieldCPUQuota) != 0 {
		r.CpuPeriod = defaultCPUPeriod
	}
	if m&fieldPids != 0 {
		unlimited := int64(-1)
		r.PidsLimit = &unlimited
	}
	if m&fieldBlkioWeight != 0 {
		r.BlkioWeight = defaultIOWeight
	}
	if m&(fieldCpusetCpus|fieldCpusetMems) != 0 {
		p := paths["cpuset"]
		parent := filepath.Dir(p)
		cpus, err := cgroups.ReadFile(parent, "cpuset.cpus")
		if err != nil {
			return fmt.Errorf("resetting cpuset: %w", err)
		}
		mems, err := cgroups.ReadFile(parent, "cpuset.mems")
		if err != nil {
			return fmt.Errorf("resetting cpuset: %w", err)
		}
		r.CpusetCpus, r.CpusetMems = strings.TrimSpace(cpus), strings.TrimSpace(mems)
	}
	return applyResources(ModeV1, paths, r, m)
}

func resetV2(dir string, m fieldMask) error {
	writes := []struct {
		mask       fieldMask
		file, data string
	}{
		{fieldMemorySwap, "memory.swap.max", "max"},
		{fieldMemory, "memory.max", "max"},
		{fieldMemoryReservation, "memory.low", "0"},
		{fieldCPUShares, "cpu.weight", fmt.Sprint(defaultCPUWeight)},
		{fieldCPUQuota | fieldCPUPeriod, "cpu.max", fmt.Sprintf("max %d", defaultCPUPeriod)},
		{fieldCpusetCpus, "cpuset.cpus", ""},
		{fieldCpusetMems, "cpuset.mems", ""},
		{fieldPids, "pids.max", "max"},
		{fieldBlkioWeight, "io.weight", fmt.Sprintf("default %d", defaultIOWeight)},
	}
	for _, w := range writes {
		if m&w.mask == 0 {
			continue
		}
		if err := cgroups.WriteFile(dir, w.file, w.data); err != nil {
			return fmt.Errorf("resetting %s: %w", w.file, err)
		}
	}
	return nil
}

// fieldFiles names, per field, the file whose presence shows the cgroup
// can hold it: controller and file name (v1), file name (v2).
var fieldFiles = []struct {
	mask   fieldMask
	ctrl   string
	v1, v2 string
}{
	{fieldMemory, "memory", "memory.limit_in_bytes", "memory.max"},
	{fieldMemorySwap, "memory", "memory.memsw.limit_in_bytes", "memory.swap.max"},
	{fieldMemoryReservation, "memory", "memory.soft_limit_in_bytes", "memory.low"},
	{fieldCPUShares, "cpu", "cpu.shares", "cpu.weight"},
	{fieldCPUQuota | fieldCPUPeriod, "cpu", "cpu.cfs_quota_us", "cpu.max"},
	{fieldCpusetCpus | fieldCpusetMems, "cpuset", "cpuset.cpus", "cpuset.cpus"},
	{fieldPids, "pids", "pids.max", "pids.max"},
	{fieldBlkioWeight, "blkio", "blkio.weight", "io.weight"},
}

func presentFields(mode Mode, paths map[string]string) fieldMask {
	var m fieldMask
	for _, f := range fieldFiles {
		dir, file := paths[f.ctrl], f.v1
		if mode == ModeV2 {
			dir, file = paths[""], f.v2
		}
		if dir != "" && exists(filepath.Join(dir, file)) {
			m |= f.mask
		}
	}
	return m
}

// values are a lease's numeric resource values, as written to the cgroup.
// cpuset lists are not kept: the kernel itself rewrites cpuset.cpus when
// CPUs go offline, so an Acquire always writes them.
type values struct {
	memory, swap, reservation int64
	shares                    uint64
	quota                     int64
	period                    uint64
	pids                      int64
	blkio                     uint16
}

func valuesOf(r *cgroups.Resources) values {
	v := values{
		memory: r.Memory, swap: r.MemorySwap, reservation: r.MemoryReservation,
		shares: r.CpuShares, quota: r.CpuQuota, period: r.CpuPeriod, blkio: r.BlkioWeight,
	}
	if r.PidsLimit != nil {
		v.pids = *r.PidsLimit
	}
	return v
}

// numericFields are the fields values keeps, in their encoding order.
var numericFields = []fieldMask{
	fieldMemory, fieldMemorySwap, fieldMemoryReservation, fieldCPUShares,
	fieldCPUQuota, fieldCPUPeriod, fieldPids, fieldBlkioWeight,
}

// get returns field f's value in 64 bits: an int64's two's complement for
// the signed fields (signedField).
func (v values) get(f fieldMask) uint64 {
	switch f {
	case fieldCPUShares:
		return v.shares
	case fieldCPUPeriod:
		return v.period
	case fieldBlkioWeight:
		return uint64(v.blkio)
	}
	return uint64(*v.field(f))
}

// set stores n, as get returns it, in field f.
func (v *values) set(f fieldMask, n uint64) {
	switch f {
	case fieldCPUShares:
		v.shares = n
	case fieldCPUPeriod:
		v.period = n
	case fieldBlkioWeight:
		v.blkio = uint16(n)
	default:
		*v.field(f) = int64(n)
	}
}

func (v *values) field(f fieldMask) *int64 {
	switch f {
	case fieldMemory:
		return &v.memory
	case fieldMemorySwap:
		return &v.swap
	case fieldMemoryReservation:
		return &v.reservation
	case fieldCPUQuota:
		return &v.quota
	case fieldPids:
		return &v.pids
	}
	return nil
}

// encode writes the values of the numeric fields in m, "/"-separated in
// numericFields order; "-" when there are none.
func (v values) encode(m fieldMask) string { return string(v.appendEncoded(nil, m)) }

func (v values) appendEncoded(b []byte, m fieldMask) []byte {
	n := len(b)
	for _, f := range numericFields {
		if m&f == 0 {
			continue
		}
		if len(b) > n {
			b = append(b, '/')
		}
		if signedField(f) {
			b = strconv.AppendInt(b, int64(v.get(f)), 10)
		} else {
			b = strconv.AppendUint(b, v.get(f), 10)
		}
	}
	if len(b) == n {
		b = append(b, '-')
	}
	return b
}

func decodeValues(s string, m fieldMask) (values, error) { return decodeValuesBytes([]byte(s), m) }

func decodeValuesBytes(b []byte, m fieldMask) (values, error) {
	var v values
	rest := b
	if string(b) == "-" {
		rest = nil
	}
	for _, f := range numericFields {
		if m&f == 0 {
			continue
		}
		if len(rest) == 0 {
			return v, fmt.Errorf("values %q: too few", b)
		}
		part := rest
		if j := bytes.IndexByte(rest, '/'); j >= 0 {
			part, rest = rest[:j], rest[j+1:]
			if len(rest) == 0 {
				return v, fmt.Errorf("values %q: empty value", b)
			}
		} else {
			rest = nil
		}
		neg := len(part) > 1 && part[0] == '-'
		if neg {
			part = part[1:]
		}
		n, ok := parseUint(part, 10)
		limit := uint64(1<<64 - 1)
		switch {
		case signedField(f):
			limit = 1<<63 - 1
			if neg {
				limit++
			}
		case f == fieldBlkioWeight:
			limit = 1<<16 - 1
		}
		if !ok || n > limit || neg && !signedField(f) {
			return v, fmt.Errorf("values %q: bad number", b)
		}
		if neg {
			n = -n // two's complement, as get returns a negative value
		}
		v.set(f, n)
	}
	if len(rest) != 0 {
		return v, fmt.Errorf("values %q: too many", b)
	}
	return v, nil
}

// signedField reports whether field f holds a signed value.
func signedField(f fieldMask) bool { return (&values{}).field(f) != nil }

// fieldGroups are the fields written together: cgroup v1 couples the
// memory and memory+swap limits, and CFS quota and period.
var fieldGroups = []fieldMask{
	fieldMemory | fieldMemorySwap, fieldMemoryReservation, fieldCPUShares,
	fieldCPUQuota | fieldCPUPeriod, fieldCpusetCpus, fieldCpusetMems, fieldPids, fieldBlkioWeight,
}

const cpusetFields = fieldCpusetCpus | fieldCpusetMems

// plan says what an Acquire writes to turn a slot as recorded (prev) into
// one holding the resources v of fields m: the fields to reset to a fresh
// cgroup's values first, then the fields of m to write. A group whose
// fields and known values are unchanged is not written at all; one that
// loses a field is reset and rewritten.
func plan(prev slot, m fieldMask, v values) (reset, apply fieldMask) {
	if prev.mask == fieldAll {
		return fieldAll, m // unknown: reset whatever the cgroup has
	}
	for _, g := range fieldGroups {
		old, nw := prev.mask&g, m&g
		if old == 0 && nw == 0 {
			continue
		}
		if old == nw && prev.set&g == old && g&cpusetFields == 0 && sameValues(prev.vals, v, g) {
			continue
		}
		if old&^nw != 0 {
			reset |= old
		}
		apply |= nw
	}
	return reset, apply
}

func sameValues(a, b values, m fieldMask) bool {
	for _, f := range numericFields {
		if m&f == 0 {
			continue
		}
		if a.get(f) != b.get(f) {
			return false
		}
	}
	return true
}

// restrict returns r with only the fields in m set.
func restrict(r *cgroups.Resources, m fieldMask) *cgroups.Resources {
	out := &cgroups.Resources{}
	if m&fieldMemory != 0 {
		out.Memory = r.Memory
	}
	if m&fieldMemorySwap != 0 {
		out.MemorySwap = r.MemorySwap
	}
	if m&fieldMemoryReservation != 0 {
		out.MemoryReservation = r.MemoryReservation
	}
	if m&fieldCPUShares != 0 {
		out.CpuShares = r.CpuShares
	}
	if m&fieldCPUQuota != 0 {
		out.CpuQuota = r.CpuQuota
	}
	if m&fieldCPUPeriod != 0 {
		out.CpuPeriod = r.CpuPeriod
	}
	if m&fieldCpusetCpus != 0 {
		out.CpusetCpus = r.CpusetCpus
	}
	if m&fieldCpusetMems != 0 {
		out.CpusetMems = r.CpusetMems
	}
	if m&fieldPids != 0 {
		out.PidsLimit = r.PidsLimit
	}
	if m&fieldBlkioWeight != 0 {
		out.BlkioWeight = r.BlkioWeight
	}
	return out
}
