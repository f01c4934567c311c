package cloudhypervisor

import (
	"bytes"
	"context"
	"debug/elf"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rund-dev/rund/vm"
)

// TestCheckThisHost is what `rund check` says about Cloud Hypervisor here.
func TestCheckThisHost(t *testing.T) {
	err := New("").Check(context.Background(), "")
	t.Logf("cloud-hypervisor: %v", err)
	if _, lookErr := exec.LookPath(DefaultBinary); lookErr != nil {
		if !errors.Is(err, vm.ErrUnavailable) || !strings.Contains(err.Error(), "cloud-hypervisor binary not found on PATH") {
			t.Errorf("got %v, want the missing binary named", err)
		}
	}
	if _, statErr := os.Stat(realHost.pvmModule); statErr == nil {
		if err == nil || !strings.Contains(err.Error(), "kvm_pvm") {
			t.Errorf("got %v, want the PVM hypervisor named", err)
		}
	}
}

func TestCheckReasons(t *testing.T) {
	dir := shortDir(t)
	pvm := filepath.Join(dir, "kvm_pvm")
	if err := os.Mkdir(pvm, 0o700); err != nil {
		t.Fatal(err)
	}
	kernel := writeELF(t, dir, true)
	tests := []struct {
		name    string
		backend *Backend
		host    host
		kernel  string
		want    []string // each in the message; none: usable
	}{
		{"no binary", New(filepath.Join(dir, "cloud-hypervisor")), host{devKVM: "/dev/null", pvmModule: pvm + "x"}, "",
			[]string{"binary not found on PATH", "/dev/null is not a KVM device"}},
		{"too old", fakeBackend(t, "FAKE_CH_VERSION=41.0.0"), host{devKVM: "/dev/null", pvmModule: pvm + "x"}, "",
			[]string{"cloud-hypervisor v41.0.0; rund needs v42 or later"}},
		{"no /dev/kvm", fakeBackend(t), host{devKVM: filepath.Join(dir, "kvm"), pvmModule: pvm + "x"}, "",
			[]string{filepath.Join(dir, "kvm") + " does not exist"}},
		{"pvm", fakeBackend(t), host{devKVM: "/dev/null", pvmModule: pvm}, "",
			[]string{"provided by kvm_pvm", "runs only PVM-enabled guest kernels"}},
		{"bad kernel", fakeBackend(t), host{devKVM: "/dev/null", pvmModule: pvm}, writeELF(t, t.TempDir(), false),
			[]string{"without a PVH entry note"}},
	}
	if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err == nil {
		f.Close()
		tests = append(tests, struct {
			name    string
			backend *Backend
			host    host
			kernel  string
			want    []string
		}{"usable", fakeBackend(t), host{devKVM: "/dev/kvm", pvmModule: pvm + "x"}, kernel, nil})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.backend.check(context.Background(), tt.host, tt.kernel)
			if tt.want == nil {
				if err != nil {
					t.Fatalf("got %v, want usable", err)
				}
				return
			}
			if !errors.Is(err, vm.ErrUnavailable) {
				t.Fatalf("got %v, want vm.ErrUnavailable", err)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("got %q, want it to contain %q", err, w)
				}
			}
		})
	}
}

// writeELF writes a minimal x86_64 ELF whose one PT_NOTE segment holds a
// Xen note: the PVH entry note when pvh, another Xen note otherwise.
func writeELF(t *testing.T, dir string, pvh bool) string {
	t.Helper()
	var note bytes.Buffer
	typ := uint32(pvhNoteType)
	if !pvh {
		typ = 5 // XEN_ELFNOTE_XEN_VERSION
	}
	for _, v := range []uint32{4, 4, typ} {
		_ = binary.Write(&note, binary.LittleEndian, v)
	}
	note.WriteString("Xen\x00")
	_ = binary.Write(&note, binary.LittleEndian, uint32(0x1000000))
	const ehsize, phsize = 64, 56
	hdr := elf.Header64{
		Type: uint16(elf.ET_EXEC), Machine: uint16(elf.EM_X86_64), Version: uint32(elf.EV_CURRENT),
		Phoff: ehsize, Ehsize: ehsize, Phentsize: phsize, Phnum: 1, Shentsize: 64,
	}
	copy(hdr.Ident[:], elf.ELFMAG)
	hdr.Ident[elf.EI_CLASS] = byte(elf.ELFCLASS64)
	hdr.Ident[elf.EI_DATA] = byte(elf.ELFDATA2LSB)
	hdr.Ident[elf.EI_VERSION] = byte(elf.EV_CURRENT)
	prog := elf.Prog64{Type: uint32(elf.PT_NOTE), Off: ehsize + phsize, Filesz: uint64(note.Len()), Memsz: uint64(note.Len()), Align: 4}
	var b bytes.Buffer
	_ = binary.Write(&b, binary.LittleEndian, hdr)
	_ = binary.Write(&b, binary.LittleEndian, prog)
	b.Write(note.Bytes())
	path := filepath.Join(dir, "vmlinux")
	if err := os.WriteFile(path, b.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestCheckKernel(t *testing.T) {
	dir := t.TempDir()
	bz := make([]byte, 0x400)
	copy(bz[0x202:], "HdrS")
	bzImage := filepath.Join(dir, "bzImage")
	if err := os.WriteFile(bzImage, bz, 0o600); err != nil {
		t.Fatal(err)
	}
	junk := filepath.Join(dir, "junk")
	if err := os.WriteFile(junk, []byte("not a kernel"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, kernel, version string
		want                  string // "" for accepted
	}{
		{"vmlinux with PVH note", writeELF(t, t.TempDir(), true), "cloud-hypervisor v30.0", ""},
		{"vmlinux without PVH note", writeELF(t, t.TempDir(), false), "", "without a PVH entry note"},
		{"bzImage on v39", bzImage, "cloud-hypervisor v39.0", ""},
		{"bzImage, version unknown", bzImage, "", ""},
		{"bzImage before v39", bzImage, "cloud-hypervisor v38.0", "boots only from v39"},
		{"neither", junk, "", "neither a vmlinux ELF with a PVH note nor a bzImage"},
		{"missing", filepath.Join(dir, "none"), "", "no such file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := CheckKernel(tt.kernel, tt.version)
			if tt.want == "" {
				if err != nil {
					t.Fatalf("got %v, want accepted", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want it to contain %q", err, tt.want)
			}
		})
	}
}

func TestParseMajor(t *testing.T) {
	tests := []struct {
		in   string
		want int
		ok   bool
	}{
		{"cloud-hypervisor v42.0.0", 42, true},
		{"cloud-hypervisor v53.0-12-g1a2b3c4-dirty", 53, true},
		{"cloud-hypervisor 40.1", 40, true},
		{"cloud-hypervisor", 0, false},
	}
	for _, tt := range tests {
		got, ok := parseMajor(tt.in)
		if got != tt.want || ok != tt.ok {
			t.Errorf("parseMajor(%q): got %d, %t, want %d, %t", tt.in, got, ok, tt.want, tt.ok)
		}
	}
}
