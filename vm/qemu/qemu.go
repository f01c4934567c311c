// Package qemu is rund's QEMU backend: it runs each microVM as a
// qemu-system-x86_64 process (q35, no network, no default devices) driven
// over a minimal hand-written QMP client.
//
// The guest channel is a virtio-serial port named "rund.agent" whose chardev
// is a unix socket in client mode: the backend listens on <Dir>/agent.sock
// before it execs QEMU, QEMU connects while it starts, and Machine.Dial
// returns that connection. The guest's port is therefore always connected on
// the host side, in a cold-booted VM and in a clone restored from a template
// alike.
//
// Templates use QEMU's migration with the x-ignore-shared capability: the
// template's RAM is a shared memory-backend-file that stays where it is, and
// only device state is written to <dir>/state. A clone maps the same file
// privately (copy-on-write) and loads the device state with -incoming defer
// and migrate-incoming. Every PCI device has a fixed address derived from its
// position in the Config, so a clone's devices line up with its template's
// and each clone names its own backing files.
package qemu

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/rund-dev/rund/vm"
)

// DefaultBinary is the QEMU binary looked up on PATH when Options.Binary is
// empty.
const DefaultBinary = "qemu-system-x86_64"

// DefaultFirmware is the firmware used when Options.Firmware is empty and the
// file exists: qboot boots a -kernel guest with less work than SeaBIOS.
const DefaultFirmware = "/usr/share/qemu/qboot.rom"

// FirmwareSeaBIOS, as Options.Firmware, selects QEMU's built-in default
// firmware (SeaBIOS) even where qboot is installed.
const FirmwareSeaBIOS = "seabios"

// Options configures a Backend.
type Options struct {
	// Binary is the QEMU executable (default DefaultBinary on PATH).
	Binary string
	// Firmware is the -bios image. Empty selects DefaultFirmware when it
	// exists and QEMU's own default otherwise; FirmwareSeaBIOS forces the
	// default.
	Firmware string
}

// Backend starts QEMU microVMs. It implements vm.Backend.
type Backend struct {
	binary   string
	firmware string // "" means QEMU's default firmware

	mu      sync.Mutex
	version string
}

var _ vm.Backend = (*Backend)(nil)

// New returns a QEMU backend.
func New(opts Options) *Backend {
	b := &Backend{binary: opts.Binary, firmware: opts.Firmware}
	if b.binary == "" {
		b.binary = DefaultBinary
	}
	switch b.firmware {
	case "":
		if _, err := os.Stat(DefaultFirmware); err == nil {
			b.firmware = DefaultFirmware
		}
	case FirmwareSeaBIOS:
		b.firmware = ""
	}
	return b
}

// Name returns "qemu".
func (b *Backend) Name() string { return "qemu" }

// Firmware returns the -bios image the backend passes, or "" for QEMU's
// default firmware.
func (b *Backend) Firmware() string { return b.firmware }

// Check reports whether the QEMU binary and the chosen firmware are present.
// Its errors wrap vm.ErrUnavailable.
func (b *Backend) Check() error {
	if _, err := b.lookPath(); err != nil {
		return err
	}
	if b.firmware != "" {
		if _, err := os.Stat(b.firmware); err != nil {
			return fmt.Errorf("qemu firmware: %w (%w)", vm.ErrUnavailable, err)
		}
	}
	return nil
}

func (b *Backend) lookPath() (string, error) {
	p, err := exec.LookPath(b.binary)
	if err != nil {
		return "", fmt.Errorf("qemu binary %q: %w (%w)", b.binary, vm.ErrUnavailable, err)
	}
	return p, nil
}

// Version returns the first line of `qemu --version` without its "QEMU
// emulator version " prefix, e.g. "7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)".
// The result is cached.
func (b *Backend) Version(ctx context.Context) (string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.version != "" {
		return b.version, nil
	}
	path, err := b.lookPath()
	if err != nil {
		return "", err
	}
	out, err := exec.CommandContext(ctx, path, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("running %s --version: %w", path, err)
	}
	line, _, _ := strings.Cut(string(out), "\n")
	line = strings.TrimSpace(strings.TrimPrefix(line, "QEMU emulator version "))
	if line == "" {
		return "", fmt.Errorf("running %s --version: empty output", path)
	}
	b.version = line
	return line, nil
}

// kvmGetAPIVersion is the KVM_GET_API_VERSION ioctl; KVM's API version has
// been 12 since Linux 2.6.22.
const (
	kvmGetAPIVersion = 0xAE00
	kvmAPIVersion    = 12
)

// DetectAccel returns the accelerator a stock guest kernel can run on here,
// "kvm" or "tcg", and why. /dev/kvm backed by the PVM nested hypervisor
// (kvm_pvm loaded) runs only PVM-enabled guests — a stock kernel hangs
// silently early in boot — so it counts as unusable.
func DetectAccel() (accel, reason string) {
	return detectAccel("/sys/module/kvm_pvm", "/dev/kvm")
}

func detectAccel(pvmModule, kvmDev string) (string, string) {
	if _, err := os.Stat(pvmModule); err == nil {
		return "tcg", kvmDev + " is the PVM nested hypervisor (kvm_pvm is loaded), which cannot run a stock guest kernel"
	}
	fd, err := unix.Open(kvmDev, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return "tcg", fmt.Sprintf("%s unusable: %v", kvmDev, err)
	}
	defer unix.Close(fd)
	v, err := unix.IoctlRetInt(fd, kvmGetAPIVersion)
	if err != nil {
		return "tcg", fmt.Sprintf("%s: KVM_GET_API_VERSION: %v", kvmDev, err)
	}
	if v != kvmAPIVersion {
		return "tcg", fmt.Sprintf("%s: KVM API version %d, want %d", kvmDev, v, kvmAPIVersion)
	}
	return "kvm", kvmDev + " is usable"
}
