package cloudhypervisor

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/rund-dev/rund/vm"
)

// Files a VMM keeps in its Config.Dir.
const (
	apiSocketName   = "ch.sock"
	vsockSocketName = "vsock.sock"
	eventsFileName  = "ch-events.json"
	logFileName     = "ch.log"
	stderrFileName  = "ch.stderr"
	cloneDirName    = "snapshot"
)

// Device ids rund gives the devices it creates itself.
const (
	memZoneID = "mem0"
	vsockID   = "vsock0"
)

// maxSocketPath is sun_path's size including the terminating NUL.
const maxSocketPath = 108

// paths are the per-VMM file names under a Config.Dir.
type paths struct {
	dir, api, vsock, events, log, stderr string
}

func vmmPaths(dir string) (paths, error) {
	if dir == "" {
		return paths{}, errors.New("vm config has no runtime directory")
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return paths{}, fmt.Errorf("runtime directory %s: %w", dir, err)
	}
	p := paths{
		dir:    abs,
		api:    filepath.Join(abs, apiSocketName),
		vsock:  filepath.Join(abs, vsockSocketName),
		events: filepath.Join(abs, eventsFileName),
		log:    filepath.Join(abs, logFileName),
		stderr: filepath.Join(abs, stderrFileName),
	}
	// The VMM binds the vsock socket's path plus "_<port>" for guest-
	// initiated connections, so leave room for the longest suffix.
	if n := len(p.vsock) + len("_4294967295"); n >= maxSocketPath {
		return paths{}, fmt.Errorf("runtime directory %s: socket paths would be %d bytes, the limit is %d", abs, n, maxSocketPath-1)
	}
	return p, nil
}

// vmConfig translates cfg into the body of vm.create.
func vmConfig(cfg vm.Config, p paths) (VMConfig, error) {
	if cfg.Kernel == "" {
		return VMConfig{}, errors.New("vm config has no kernel")
	}
	if cfg.Accel != "" && cfg.Accel != "kvm" {
		return VMConfig{}, fmt.Errorf("cloud-hypervisor runs only on kvm, not %q: %w", cfg.Accel, vm.ErrUnavailable)
	}
	vcpus := max(cfg.VCPUs, 1)
	memMiB := cfg.MemoryMiB
	if memMiB <= 0 {
		return VMConfig{}, fmt.Errorf("vm config has memory %d MiB", memMiB)
	}
	memBytes := int64(memMiB) << 20
	c := VMConfig{
		Payload: &PayloadConfig{Kernel: cfg.Kernel, Initramfs: cfg.Initrd, Cmdline: cfg.Cmdline},
		CPUs:    &CPUsConfig{BootVCPUs: vcpus, MaxVCPUs: vcpus},
		Memory:  &MemoryConfig{Size: memBytes},
		Vsock:   &VsockConfig{CID: vsockCID, Socket: p.vsock, ID: vsockID},
		Serial:  serialConfig(cfg.ConsoleLog),
		// The API's default console is Tty, which takes over the VMM's
		// stdout; rund never uses the virtio console.
		Console: &ConsoleConfig{Mode: ConsoleOff},
	}
	if cfg.MemPath != "" {
		// One file-backed zone: shared for a template (the snapshot
		// then writes no memory-ranges; the file is the memory).
		c.Memory = &MemoryConfig{Size: 0, Shared: cfg.MemShared, Zones: []MemoryZoneConfig{{
			ID: memZoneID, Size: memBytes, File: cfg.MemPath, Shared: cfg.MemShared,
		}}}
	}
	ids := map[string]bool{vsockID: true, memZoneID: true}
	claim := func(kind, id string) error {
		switch {
		case id == "":
			return fmt.Errorf("%s has no id", kind)
		case strings.HasPrefix(id, "__"):
			return fmt.Errorf("%s id %q: ids starting with __ are reserved by cloud-hypervisor", kind, id)
		case ids[id]:
			return fmt.Errorf("%s id %q is used twice", kind, id)
		}
		ids[id] = true
		return nil
	}
	for _, d := range cfg.Disks {
		if err := claim("disk", d.ID); err != nil {
			return VMConfig{}, err
		}
		c.Disks = append(c.Disks, diskConfig(d))
	}
	for _, pm := range cfg.Pmems {
		if err := claim("pmem", pm.ID); err != nil {
			return VMConfig{}, err
		}
		c.Pmem = append(c.Pmem, pmemConfig(pm))
	}
	for i, s := range cfg.Shares {
		if s.ReadOnly {
			// virtiofsd is started without a read-only mode here, and
			// a guest-side read-only mount is no protection.
			return VMConfig{}, fmt.Errorf("share %q: read-only virtio-fs shares are not supported", s.Tag)
		}
		id := fmt.Sprintf("fs%d", i)
		if err := claim("share", id); err != nil {
			return VMConfig{}, err
		}
		c.Fs = append(c.Fs, FsConfig{Tag: s.Tag, Socket: fsSocket(p, i), NumQueues: 1, QueueSize: 1024, ID: id})
	}
	if len(c.Fs) > 0 {
		// vhost-user devices need guest memory the daemon can map.
		if cfg.MemPath != "" && !cfg.MemShared {
			return VMConfig{}, errors.New("virtio-fs shares need shared guest memory, but the memory file is mapped private")
		}
		c.Memory.Shared = true
	}
	return c, nil
}

func serialConfig(consoleLog string) *ConsoleConfig {
	if consoleLog == "" {
		// Null rather than Off keeps the serial device, so a clone of
		// this VM can still send its console to a file.
		return &ConsoleConfig{Mode: ConsoleNull}
	}
	return &ConsoleConfig{Mode: ConsoleFile, File: consoleLog}
}

func diskConfig(d vm.Disk) DiskConfig {
	return DiskConfig{Path: d.Path, Readonly: d.ReadOnly, ID: d.ID, Serial: d.ID, ImageType: "Raw"}
}

func pmemConfig(p vm.Pmem) PmemConfig {
	return PmemConfig{File: p.Path, Size: p.Size, DiscardWrites: p.ReadOnly, ID: p.ID}
}

func fsSocket(p paths, i int) string {
	return filepath.Join(p.dir, fmt.Sprintf("fs%d.sock", i))
}
