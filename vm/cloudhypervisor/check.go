package cloudhypervisor

import (
	"bytes"
	"context"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/rund-dev/rund/vm"
)

// MinVersion is the oldest Cloud Hypervisor release rund supports: hot-add
// after a restore works from v42.
const MinVersion = 42

// bzImageVersion is the first release that boots a bzImage on x86_64.
const bzImageVersion = 39

// host names the files Check looks at; tests point them elsewhere.
type host struct {
	devKVM    string
	pvmModule string
}

var realHost = host{devKVM: "/dev/kvm", pvmModule: "/sys/module/kvm_pvm"}

// Check reports whether Cloud Hypervisor can run rund's VMs on this host.
// The error matches vm.ErrUnavailable and names every reason: the binary is
// not found or too old, /dev/kvm is missing or unusable, or /dev/kvm belongs
// to a PVM nested hypervisor that cannot run a stock guest kernel. With a
// kernel path it also checks the kernel's format (see CheckKernel).
func (b *Backend) Check(ctx context.Context, kernel string) error {
	return b.check(ctx, realHost, kernel)
}

func (b *Backend) check(ctx context.Context, h host, kernel string) error {
	var reasons []string
	version := ""
	if path, err := exec.LookPath(b.binary()); err != nil {
		reasons = append(reasons, fmt.Sprintf("%s binary not found on PATH", b.binary()))
	} else if v, err := b.Version(ctx); err != nil {
		reasons = append(reasons, fmt.Sprintf("%s does not run: %s", path, err))
	} else if major, ok := parseMajor(v); !ok {
		reasons = append(reasons, fmt.Sprintf("cannot parse the version %q of %s", v, path))
	} else if major < MinVersion {
		reasons = append(reasons, fmt.Sprintf("%s is %s; rund needs v%d or later (hot-plug after restore)", path, v, MinVersion))
	} else {
		version = v
	}
	if err := checkKVM(h); err != nil {
		reasons = append(reasons, err.Error())
	}
	if kernel != "" {
		if err := CheckKernel(kernel, version); err != nil {
			reasons = append(reasons, err.Error())
		}
	}
	if len(reasons) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %s", vm.ErrUnavailable, strings.Join(reasons, "; "))
}

// kvmGetAPIVersion is the KVM_GET_API_VERSION ioctl, _IO(0xAE, 0x00).
const kvmGetAPIVersion = 0xAE00

// kvmAPIVersion is the only KVM API version Linux has ever reported.
const kvmAPIVersion = 12

// checkKVM tells whether /dev/kvm can run a stock guest.
func checkKVM(h host) error {
	f, err := os.OpenFile(h.devKVM, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("%s does not exist (no hardware virtualisation, or the kvm module is not loaded)", h.devKVM)
		}
		return fmt.Errorf("%s cannot be opened: %w", h.devKVM, err)
	}
	defer f.Close()
	if _, err := os.Stat(h.pvmModule); err == nil {
		return fmt.Errorf("%s is provided by kvm_pvm (%s exists), a PVM nested hypervisor "+
			"that runs only PVM-enabled guest kernels; a stock guest hangs at boot, and "+
			"cloud-hypervisor has no software emulation to fall back on", h.devKVM, h.pvmModule)
	}
	v, err := unix.IoctlRetInt(int(f.Fd()), kvmGetAPIVersion)
	switch {
	case errors.Is(err, unix.ENOTTY):
		return fmt.Errorf("%s is not a KVM device", h.devKVM)
	case err != nil:
		return fmt.Errorf("%s: KVM_GET_API_VERSION: %w", h.devKVM, err)
	case v != kvmAPIVersion:
		return fmt.Errorf("%s reports KVM API version %d, not %d", h.devKVM, v, kvmAPIVersion)
	}
	return nil
}

var versionRE = regexp.MustCompile(`v?(\d+)\.\d+`)

// parseMajor extracts the release number from `cloud-hypervisor --version`
// output such as "cloud-hypervisor v42.0.0" or "cloud-hypervisor v53.0-12-g1a2b".
func parseMajor(v string) (int, bool) {
	m := versionRE.FindStringSubmatch(v)
	if m == nil {
		return 0, false
	}
	n, err := strconv.Atoi(m[1])
	return n, err == nil
}

// Xen ELF note that marks a PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY).
const (
	pvhNoteName = "Xen"
	pvhNoteType = 18
)

// CheckKernel tells whether Cloud Hypervisor can boot kernel directly on
// x86_64: an uncompressed vmlinux ELF with a PVH entry note (CONFIG_PVH), or,
// from v39, a bzImage. version is `cloud-hypervisor --version` output, or ""
// when unknown (a bzImage is then accepted).
func CheckKernel(kernel, version string) error {
	f, err := os.Open(kernel)
	if err != nil {
		return fmt.Errorf("guest kernel: %w", err)
	}
	defer f.Close()
	var head [0x206]byte
	n, _ := io.ReadFull(f, head[:])
	switch {
	case n >= 4 && bytes.Equal(head[:4], []byte(elf.ELFMAG)):
		ok, err := hasPVHNote(f)
		if err != nil {
			return fmt.Errorf("guest kernel %s: %w", kernel, err)
		}
		if !ok {
			return fmt.Errorf("guest kernel %s is an ELF without a PVH entry note (build it with CONFIG_PVH=y)", kernel)
		}
		return nil
	case n >= 0x206 && string(head[0x202:0x206]) == "HdrS":
		if major, ok := parseMajor(version); ok && major < bzImageVersion {
			return fmt.Errorf("guest kernel %s is a bzImage, which cloud-hypervisor boots only from v%d (this is %s)", kernel, bzImageVersion, version)
		}
		return nil
	default:
		return fmt.Errorf("guest kernel %s is neither a vmlinux ELF with a PVH note nor a bzImage", kernel)
	}
}

// hasPVHNote looks for the PVH entry note in an ELF's note segments.
func hasPVHNote(r io.ReaderAt) (bool, error) {
	ef, err := elf.NewFile(r)
	if err != nil {
		return false, err
	}
	defer ef.Close()
	for _, p := range ef.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		data, err := io.ReadAll(io.LimitReader(p.Open(), 1<<20))
		if err != nil {
			return false, err
		}
		if findNote(data, ef.ByteOrder, pvhNoteName, pvhNoteType) {
			return true, nil
		}
	}
	return false, nil
}

// findNote scans ELF notes (namesz, descsz, type, name, desc; 4-byte
// aligned) for one with the given name and type.
func findNote(data []byte, bo binary.ByteOrder, name string, typ uint32) bool {
	align := func(n uint32) uint64 { return (uint64(n) + 3) &^ 3 }
	for len(data) >= 12 {
		namesz, descsz, t := bo.Uint32(data), bo.Uint32(data[4:]), bo.Uint32(data[8:])
		data = data[12:]
		if align(namesz)+align(descsz) > uint64(len(data)) {
			return false
		}
		n := strings.TrimRight(string(data[:namesz]), "\x00")
		if n == name && t == typ {
			return true
		}
		data = data[align(namesz)+align(descsz):]
	}
	return false
}
