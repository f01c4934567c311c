package kernelpatch

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

const sampleIomem = `00000000-00000fff : Reserved
00001000-0009fbff : System RAM
000f0000-000fffff : Reserved
00100000-0ffdffff : System RAM
  01000000-0160218c : Kernel code
  01800000-01a3bfff : Kernel rodata
  01c00000-01d1a2ff : Kernel data
  01f8d000-01ffffff : Kernel bss
fd000000-fdffffff : PCI Bus 0000:00
`

func TestParseIomem(t *testing.T) {
	rs, err := ParseIomem(sampleIomem)
	if err != nil {
		t.Fatal(err)
	}
	want := []Range{
		{0x1000000, 0x160218d, Text},
		{0x1800000, 0x1a3c000, Rodata},
		{0x1c00000, 0x1d1a300, Data},
		{0x1f8d000, 0x2000000, Data},
	}
	if len(rs) != len(want) {
		t.Fatalf("got %v", rs)
	}
	for i := range want {
		if rs[i] != want[i] {
			t.Errorf("range %d: got %+v, want %+v", i, rs[i], want[i])
		}
	}
	// Read without privilege, /proc/iomem shows zeros.
	if _, err := ParseIomem("00000000-00000000 : Kernel code\n"); err == nil {
		t.Error("zeroed iomem accepted")
	}
	if _, err := ParseIomem("garbage"); err == nil {
		t.Error("iomem without kernel ranges accepted")
	}
}

func TestQ35Layout(t *testing.T) {
	small := Q35(256 << 20)
	if small(0x1000) != 0x1000 || small(255<<20) != 255<<20 {
		t.Error("a small guest's RAM is not identity-mapped")
	}
	big := Q35(4 << 30)
	if big(0x7fffffff) != 0x7fffffff || big(0x80000000) != 4<<30 {
		t.Errorf("4 GiB guest: offset 2 GiB at %#x", big(0x80000000))
	}
}

var sink byte

// TestMeasurePrivateCopies maps a file privately in this process, writes
// some of its pages and reads others, and checks that Measure counts the
// written pages as dirty and the read ones as shared, by region.
func TestMeasurePrivateCopies(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("reading pagemap entries needs root")
	}
	ps := os.Getpagesize()
	const pages = 64
	path := filepath.Join(t.TempDir(), "mem")
	if err := os.WriteFile(path, make([]byte, pages*ps), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	mem, err := unix.Mmap(int(f.Fd()), 0, pages*ps, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	// "Kernel text" is pages 8..15, rodata 16..23, data 24..31.
	ranges := []Range{
		{uint64(8 * ps), uint64(16 * ps), Text},
		{uint64(16 * ps), uint64(24 * ps), Rodata},
		{uint64(24 * ps), uint64(32 * ps), Data},
	}
	for p := 8; p < 24; p++ { // text and rodata read only
		sink += mem[p*ps]
	}
	for _, p := range []int{24, 25, 40, 41, 42} { // two data pages, three others
		mem[p*ps] = 1
	}
	maps, err := FindMappings(os.Getpid(), path)
	if err != nil {
		t.Fatal(err)
	}
	if len(maps) != 1 || !maps[0].Private || maps[0].End-maps[0].Start != uint64(pages*ps) {
		t.Fatalf("mappings %+v", maps)
	}
	m := maps[0]
	rows, err := Measure(os.Getpid(), m, func(off uint64) uint64 { return off }, ranges)
	if err != nil {
		t.Fatal(err)
	}
	// Shared counts are at least the pages read: the kernel maps a read
	// fault's neighbours too.
	want := map[string][3]int{ // pages, dirty, shared
		Text:   {8, 0, 8},
		Rodata: {8, 0, 8},
		Data:   {8, 2, 0},
		Other:  {40, 3, 0},
	}
	for _, r := range rows {
		w := want[r.Region]
		if r.Pages != w[0] || r.DirtyPages != w[1] || r.SharedPages < w[2] {
			t.Errorf("%s: got pages %d dirty %d shared %d, want %v", r.Region, r.Pages, r.DirtyPages, r.SharedPages, w)
		}
	}
	if _, err := FindMappings(os.Getpid(), path+".absent"); err == nil {
		t.Error("FindMapping of an unmapped file succeeded")
	}
}
