// Package kernelpatch measures which guest pages a sandbox's VMM holds as
// private copies of its template's memory, by guest-physical region: the
// guest kernel's text, rodata and data/bss, and everything else.
//
// A clone maps the template's memory file privately (copy-on-write). A page
// of that mapping which is present but no longer backed by the file was
// written by the clone: the kernel gave it a private anonymous copy. Those
// pages are the clone's own memory; the rest stay shared with every clone.
// The guest's own /proc/iomem gives the kernel's layout ("Kernel code",
// "Kernel rodata", "Kernel data", "Kernel bss"), and /proc/PID/pagemap of
// the VMM gives each page's state.
package kernelpatch

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Regions, in report order.
const (
	Text   = "kernel-text"
	Rodata = "kernel-rodata"
	Data   = "kernel-data" // data and bss
	Other  = "other"
)

// Regions lists every region a report has a row for.
var Regions = []string{Text, Rodata, Data, Other}

// Range is a guest-physical range [Start, End) of one region.
type Range struct {
	Start, End uint64
	Region     string
}

var iomemRegion = map[string]string{
	"Kernel code":   Text,
	"Kernel rodata": Rodata,
	"Kernel data":   Data,
	"Kernel bss":    Data,
}

// ParseIomem reads the kernel's ranges from the text of a guest's
// /proc/iomem (lines "start-end : name", inclusive hex bounds, nested by
// indentation). It fails if the text has no "Kernel code" range, as when
// /proc/iomem was read without the privilege that shows real addresses.
func ParseIomem(text string) ([]Range, error) {
	var out []Range
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		bounds, name, ok := strings.Cut(line, " : ")
		if !ok {
			continue
		}
		region, ok := iomemRegion[strings.TrimSpace(name)]
		if !ok {
			continue
		}
		lo, hi, ok := strings.Cut(bounds, "-")
		if !ok {
			return nil, fmt.Errorf("iomem line %q: no range", line)
		}
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 != nil || err2 != nil || end < start {
			return nil, fmt.Errorf("iomem line %q: bad range", line)
		}
		out = append(out, Range{Start: start, End: end + 1, Region: region})
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	hasText := false
	for _, r := range out {
		if r.Region == Text && r.Start != 0 {
			hasText = true
		}
	}
	if !hasText {
		return nil, fmt.Errorf("iomem has no \"Kernel code\" range with a real address (read without CAP_SYS_ADMIN?)")
	}
	return out, nil
}

// Mapping is where the guest's RAM file is mapped in the VMM: host virtual
// addresses [Start, End) showing the file from Offset.
type Mapping struct {
	Start, End, Offset uint64
	Path               string
	Private            bool
}

// FindMappings finds the mappings of the file at path (by its canonical
// name) in process pid's address space: a guest's RAM file may be mapped in
// several pieces (RAM below and above a hole).
func FindMappings(pid int, path string) ([]Mapping, error) {
	if p, err := filepath.EvalSymlinks(path); err == nil {
		path = p
	}
	f, err := os.Open(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return nil, fmt.Errorf("reading the VMM's mappings: %w", err)
	}
	defer f.Close()
	var out []Mapping
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// start-end perms offset dev inode path
		fs := strings.Fields(sc.Text())
		if len(fs) < 6 || strings.Join(fs[5:], " ") != path {
			continue
		}
		lo, hi, _ := strings.Cut(fs[0], "-")
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		off, err3 := strconv.ParseUint(fs[2], 16, 64)
		if err1 != nil || err2 != nil || err3 != nil {
			continue
		}
		out = append(out, Mapping{Start: start, End: end, Offset: off, Path: path, Private: strings.HasSuffix(fs[1], "p")})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading the VMM's mappings: %w", err)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("process %d does not map %s", pid, path)
	}
	return out, nil
}

// Layout maps an offset in the guest's RAM file to a guest-physical address.
type Layout func(offset uint64) uint64

// Q35 is QEMU's q35 layout for a guest of ramSize bytes: RAM up to the
// low-memory limit sits from address 0, the rest from 4 GiB (QEMU lowers
// the limit from 2.75 GiB to 2 GiB for guests of 2.75 GiB or more).
func Q35(ramSize uint64) Layout {
	lowmem := uint64(0xb0000000)
	if ramSize >= 0xb0000000 {
		lowmem = 0x80000000
	}
	return func(off uint64) uint64 {
		if off < lowmem {
			return off
		}
		return 4<<30 + off - lowmem
	}
}

// CloudHypervisor is Cloud Hypervisor's x86_64 layout: RAM from address 0
// up to the 32-bit device hole at 3 GiB, the rest from 4 GiB.
func CloudHypervisor(off uint64) uint64 {
	const hole = 3 << 30
	if off < hole {
		return off
	}
	return 4<<30 + off - hole
}

// Row is one region's count: its pages in guest RAM, those the VMM holds
// as private copies (dirty), and those it maps shared with the template.
type Row struct {
	Region      string `json:"region"`
	Pages       int    `json:"pages"`
	DirtyPages  int    `json:"dirty_pages"`
	SharedPages int    `json:"shared_pages"`
}

// pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const (
	pmPresent = 1 << 63
	pmSwapped = 1 << 62
	pmFile    = 1 << 61 // file page or shared anonymous
)

// Measure classifies every page of the mapping m of process pid: its
// guest-physical address (through layout) picks the region, its pagemap
// entry says whether it is a private copy (present and not file-backed, or
// swapped out) or still the file's page.
func Measure(pid int, m Mapping, layout Layout, ranges []Range) ([]Row, error) {
	pageSize := uint64(os.Getpagesize())
	f, err := os.Open(fmt.Sprintf("/proc/%d/pagemap", pid))
	if err != nil {
		return nil, fmt.Errorf("opening the VMM's pagemap: %w", err)
	}
	defer f.Close()
	rows := make([]Row, len(Regions))
	index := map[string]int{}
	for i, r := range Regions {
		rows[i].Region = r
		index[r] = i
	}
	const chunk = 4096 // pages read at once
	buf := make([]byte, chunk*8)
	for addr := m.Start; addr < m.End; {
		n := min((m.End-addr)/pageSize, chunk)
		b := buf[:n*8]
		if _, err := f.ReadAt(b, int64(addr/pageSize*8)); err != nil {
			return nil, fmt.Errorf("reading the VMM's pagemap: %w", err)
		}
		for i := uint64(0); i < n; i++ {
			e := binary.LittleEndian.Uint64(b[i*8:])
			va := addr + i*pageSize
			gpa := layout(m.Offset + va - m.Start)
			row := &rows[index[regionOf(gpa, ranges)]]
			row.Pages++
			switch {
			case e&pmSwapped != 0, e&pmPresent != 0 && e&pmFile == 0:
				row.DirtyPages++
			case e&pmPresent != 0:
				row.SharedPages++
			}
		}
		addr += n * pageSize
	}
	return rows, nil
}

// Add sums b into a, row by row (both in Regions order).
func Add(a, b []Row) []Row {
	if a == nil {
		return b
	}
	for i := range a {
		a[i].Pages += b[i].Pages
		a[i].DirtyPages += b[i].DirtyPages
		a[i].SharedPages += b[i].SharedPages
	}
	return a
}

func regionOf(gpa uint64, ranges []Range) string {
	for _, r := range ranges {
		if gpa >= r.Start && gpa < r.End {
			return r.Region
		}
	}
	return Other
}
