package qemu

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/rund-dev/rund/vm"
)

// PCI slots on q35's root bus: 0 is the host bridge and 0x1f the LPC
// bridge; rund's devices take 2, 3, ... in Config order, the agent's
// virtio-serial first.
const (
	firstSlot = 0x02
	lastSlot  = 0x1e
)

// pmemAlign is the granularity of a virtio-pmem device's size.
const pmemAlign = 2 << 20

// defaultTBSizeMiB is the TCG translation cache size when the Config leaves
// it 0. QEMU's own default (1 GiB, allocated lazily) lets an idle guest's
// translations grow without bound; 32 MiB holds an idle guest's working set.
const defaultTBSizeMiB = 32

// launch is everything one QEMU command line is built from.
type launch struct {
	cfg       vm.Config
	firmware  string // -bios image; "" for QEMU's default
	qmpFD     int    // QEMU's end of the QMP socket pair
	agentPath string // the unix socket QEMU connects the agent port to
	// incoming makes a clone: -S -incoming defer, guest RAM mapped privately.
	incoming bool
	// kernel loads cfg's kernel, initrd and command line. A clone does not
	// need them: its guest memory already holds the booted kernel.
	kernel bool
}

// validate checks what QEMU would otherwise reject obscurely, or accept and
// get wrong.
func validate(cfg *vm.Config) error {
	var errs []error
	if cfg.MemoryMiB <= 0 {
		errs = append(errs, fmt.Errorf("memory %d MiB: must be positive", cfg.MemoryMiB))
	}
	if cfg.VCPUs < 0 {
		errs = append(errs, fmt.Errorf("vcpus %d: must not be negative", cfg.VCPUs))
	}
	switch cfg.Accel {
	case "kvm", "tcg":
	default:
		errs = append(errs, fmt.Errorf("accelerator %q: want kvm or tcg", cfg.Accel))
	}
	if cfg.Dir == "" {
		errs = append(errs, errors.New("no runtime directory"))
	}
	if n := 1 + len(cfg.Disks) + len(cfg.Pmems) + len(cfg.Shares); n > lastSlot-firstSlot+1 {
		errs = append(errs, fmt.Errorf("%d pci devices: at most %d fit", n, lastSlot-firstSlot+1))
	}
	for _, d := range cfg.Disks {
		if d.Path == "" {
			errs = append(errs, fmt.Errorf("disk %q: no path", d.ID))
		}
	}
	for _, p := range cfg.Pmems {
		if p.Path == "" {
			errs = append(errs, fmt.Errorf("pmem %q: no path", p.ID))
		}
		if p.Size <= 0 || p.Size%pmemAlign != 0 {
			errs = append(errs, fmt.Errorf("pmem %q: size %d is not a positive multiple of 2 MiB", p.ID, p.Size))
		}
	}
	for _, s := range cfg.Shares {
		if s.Path == "" || s.Tag == "" {
			errs = append(errs, fmt.Errorf("share %q: needs a tag and a path", s.Tag))
		}
	}
	return errors.Join(errs...)
}

// args returns QEMU's command line, without argv[0].
func (l *launch) args() []string {
	cfg := &l.cfg
	var a []string
	add := func(s ...string) { a = append(a, s...) }

	add("-nodefaults", "-no-user-config", "-nographic", "-display", "none", "-no-reboot")
	if cfg.Name != "" {
		add("-name", "guest="+escape(cfg.Name))
	}
	// Nothing the guest does may make QEMU spawn processes or gain
	// privileges.
	add("-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")

	machine := "q35,i8042=off,sata=off,smbus=off,vmport=off,dump-guest-core=off"
	if cfg.MemPath != "" {
		machine += ",memory-backend=ram"
	}
	add("-machine", machine)
	if cfg.Accel == "tcg" {
		tb := cfg.TBSizeMiB
		if tb <= 0 {
			tb = defaultTBSizeMiB
		}
		add("-accel", "tcg,tb-size="+strconv.Itoa(tb))
	} else {
		add("-accel", cfg.Accel)
	}
	if l.firmware != "" {
		add("-bios", escape(l.firmware))
	}
	vcpus := max(cfg.VCPUs, 1)
	add("-smp", strconv.Itoa(vcpus))

	mem := fmt.Sprintf("size=%dM", cfg.MemoryMiB)
	if len(cfg.Pmems) > 0 {
		var extra int64
		for _, p := range cfg.Pmems {
			extra += p.Size
		}
		mem += fmt.Sprintf(",slots=%d,maxmem=%dM", len(cfg.Pmems), int64(cfg.MemoryMiB)+(extra>>20))
	}
	add("-m", mem)
	if cfg.MemPath != "" {
		share := "on"
		if l.incoming || !cfg.MemShared {
			share = "off"
		}
		add("-object", fmt.Sprintf("memory-backend-file,id=ram,size=%dM,mem-path=%s,share=%s",
			cfg.MemoryMiB, escape(cfg.MemPath), share))
	}

	if l.kernel {
		add("-kernel", escape(cfg.Kernel))
		if cfg.Initrd != "" {
			add("-initrd", escape(cfg.Initrd))
		}
		if cfg.Cmdline != "" {
			add("-append", cfg.Cmdline)
		}
	}

	if cfg.ConsoleLog != "" {
		add("-chardev", "file,id=console,path="+escape(cfg.ConsoleLog))
	} else {
		add("-chardev", "null,id=console")
	}
	add("-serial", "chardev:console")
	add("-chardev", "socket,id=qmp,fd="+strconv.Itoa(l.qmpFD),
		"-mon", "chardev=qmp,mode=control")

	slot := firstSlot
	pci := func() string {
		s := fmt.Sprintf("bus=pcie.0,addr=%#x", slot)
		slot++
		return s
	}
	add("-chardev", "socket,id=agent,path="+escape(l.agentPath))
	add("-device", "virtio-serial-pci,id=vser0,max_ports=2,"+pci())
	add("-device", "virtserialport,bus=vser0.0,nr=1,chardev=agent,name="+agentPortName)

	for i, d := range cfg.Disks {
		ro := ""
		if d.ReadOnly {
			ro = ",read-only=on"
		}
		add("-blockdev", fmt.Sprintf("driver=raw,node-name=disk%d%s,file.driver=file,file.filename=%s",
			i, ro, escape(d.Path)))
		add("-device", fmt.Sprintf("virtio-blk-pci,id=blk%d,drive=disk%d,serial=%s,%s",
			i, i, escape(d.ID), pci()))
	}
	for i, p := range cfg.Pmems {
		ro := ""
		if p.ReadOnly {
			ro = ",readonly=on"
		}
		add("-object", fmt.Sprintf("memory-backend-file,id=pmemmem%d,size=%d,mem-path=%s,share=on%s",
			i, p.Size, escape(p.Path), ro))
		add("-device", fmt.Sprintf("virtio-pmem-pci,id=pmem%d,memdev=pmemmem%d,%s", i, i, pci()))
	}
	for i, s := range cfg.Shares {
		ro := ""
		if s.ReadOnly {
			ro = ",readonly=on"
		}
		add("-fsdev", fmt.Sprintf("local,id=fs%d,path=%s,security_model=none%s", i, escape(s.Path), ro))
		add("-device", fmt.Sprintf("virtio-9p-pci,id=share%d,fsdev=fs%d,mount_tag=%s,%s",
			i, i, escape(s.Tag), pci()))
	}

	if l.incoming {
		add("-S", "-incoming", "defer")
	}
	return a
}

// agentPortName is the virtio-serial port the guest agent opens.
const agentPortName = "rund.agent"

// escape quotes a value for QEMU's option syntax, where a comma separates
// options and ",," stands for a literal comma.
func escape(s string) string {
	return strings.ReplaceAll(s, ",", ",,")
}
