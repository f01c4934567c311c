// Package config reads rund's configuration file (/etc/rund/config.toml).
// Every key is optional; Default documents each value rund uses without one.
package config

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/BurntSushi/toml"
)

// Config is rund's configuration. The TOML keys are the field tags.
type Config struct {
	// GuestKernel picks the guest kernel flavour: "rund" (the streamlined
	// kernel `make kernel` builds), "cloud" (Debian's cloud kernel) or "auto"
	// (rund's where it was built, else cloud's).
	GuestKernel string `toml:"guest_kernel"`
	// Kernel and Initrd are the guest kernel and initramfs. Empty: the
	// flavour's, the first found of /usr/local/share/rund/<flavour>/<name>
	// and <dir of rund>/guest/<flavour>/<name>.
	Kernel string `toml:"kernel"`
	Initrd string `toml:"initrd"`
	// KernelCmdline is appended to the guest kernel command line.
	KernelCmdline string `toml:"kernel_cmdline"`
	// DataDir holds images, the writable-layer base and templates' state;
	// put it on XFS with reflink=1 (or btrfs) for instant writable layers.
	DataDir string `toml:"data_dir"`
	// MemDir holds templates' guest-memory files (tmpfs).
	MemDir string `toml:"mem_dir"`
	// Hypervisor is "qemu" or "cloud-hypervisor".
	Hypervisor            string `toml:"hypervisor"`
	QEMUBinary            string `toml:"qemu_binary"`
	CloudHypervisorBinary string `toml:"cloud_hypervisor_binary"`
	// Accel is "auto", "kvm" or "tcg".
	Accel string `toml:"accel"`
	// TBSizeMiB is QEMU's TCG translation-cache size.
	TBSizeMiB int `toml:"tcg_tb_size_mib"`
	VCPUs     int `toml:"vcpus"`
	MemoryMiB int `toml:"memory_mib"`
	// Templates turns snapshot templates on or off ("off" cold-boots every
	// sandbox; the annotation rund.template does it per container).
	Templates string `toml:"templates"`
	// Rootfs is "split" (EROFS image + writable layer) or "shared".
	Rootfs string `toml:"rootfs"`
	// WritableMiB is the size of each sandbox's writable layer.
	WritableMiB int `toml:"writable_mib"`
	// PmemMiB is the virtio-pmem region the read-only image is mapped
	// through (DAX: the guest reads the host's page cache); images larger
	// than it use virtio-blk. 0 always uses virtio-blk.
	PmemMiB int `toml:"pmem_mib"`
	// Shares is how many host directories a sandbox can share with its
	// guest over 9p (bind mounts of host directories, and the root in
	// "shared" mode). A sandbox sharing n directories is cloned from a
	// template carrying 1, 2, 4 or 8 9p devices (the smallest class that
	// holds n), so clones get their directories without hot-plug.
	Shares int `toml:"shares"`
	// ImageCacheMiB bounds the read-only image cache.
	ImageCacheMiB int `toml:"image_cache_mib"`
	// CgroupParent is where containers without a cgroupsPath are placed.
	CgroupParent string `toml:"cgroup_parent"`
	// CgroupPool turns the pre-created cgroup pool on or off.
	CgroupPool string `toml:"cgroup_pool"`
	// BootTimeoutSeconds bounds a cold boot until the agent answers.
	BootTimeoutSeconds int `toml:"boot_timeout_seconds"`
}

// MaxShares bounds the shares key: each is a PCI slot of the sandbox.
const MaxShares = 8

// Default returns the configuration used for keys the file does not set.
func Default() Config {
	return Config{
		GuestKernel:        "auto",
		DataDir:            "/var/lib/rund",
		MemDir:             "/dev/shm/rund",
		Hypervisor:         "qemu",
		Accel:              "auto",
		TBSizeMiB:          32,
		VCPUs:              1,
		MemoryMiB:          256,
		Templates:          "on",
		Rootfs:             "split",
		WritableMiB:        1024,
		PmemMiB:            512,
		Shares:             4,
		ImageCacheMiB:      4096,
		CgroupParent:       "/rund",
		CgroupPool:         "on",
		BootTimeoutSeconds: 60,
	}
}

// Load reads path over the defaults. A missing file is not an error.
func Load(path string) (Config, error) {
	c := Default()
	if path != "" {
		b, err := os.ReadFile(path)
		switch {
		case errors.Is(err, fs.ErrNotExist):
		case err != nil:
			return c, fmt.Errorf("reading config %s: %w", path, err)
		default:
			md, err := toml.Decode(string(b), &c)
			if err != nil {
				return c, fmt.Errorf("parsing config %s: %w", path, err)
			}
			if und := md.Undecoded(); len(und) > 0 {
				return c, fmt.Errorf("config %s: unknown key %q", path, und[0].String())
			}
		}
	}
	if err := c.validate(); err != nil {
		return c, fmt.Errorf("config %s: %w", path, err)
	}
	c.resolveGuest(GuestDirs())
	return c, nil
}

func (c *Config) validate() error {
	switch c.Hypervisor {
	case "qemu", "cloud-hypervisor":
	default:
		return fmt.Errorf("hypervisor %q: want qemu or cloud-hypervisor", c.Hypervisor)
	}
	switch c.GuestKernel {
	case "auto", "rund", "cloud":
	default:
		return fmt.Errorf("guest_kernel %q: want auto, rund or cloud", c.GuestKernel)
	}
	switch c.Accel {
	case "auto", "kvm", "tcg":
	default:
		return fmt.Errorf("accel %q: want auto, kvm or tcg", c.Accel)
	}
	switch c.Templates {
	case "on", "off":
	default:
		return fmt.Errorf("templates %q: want on or off", c.Templates)
	}
	switch c.Rootfs {
	case "split", "shared":
	default:
		return fmt.Errorf("rootfs %q: want split or shared", c.Rootfs)
	}
	switch c.CgroupPool {
	case "on", "off":
	default:
		return fmt.Errorf("cgroup_pool %q: want on or off", c.CgroupPool)
	}
	if c.VCPUs < 1 || c.MemoryMiB < 64 || c.WritableMiB < 16 {
		return errors.New("vcpus must be >= 1, memory_mib >= 64, writable_mib >= 16")
	}
	if c.Shares < 0 || c.Shares > MaxShares {
		return fmt.Errorf("shares %d: want 0 to %d", c.Shares, MaxShares)
	}
	if c.PmemMiB < 0 || c.PmemMiB%2 != 0 {
		return fmt.Errorf("pmem_mib %d: want 0 or a positive multiple of 2", c.PmemMiB)
	}
	return nil
}

// GuestDirs are the directories searched for the guest flavours, in order:
// the installed one, then guest/ beside the rund binary.
func GuestDirs() []string {
	dirs := []string{"/usr/local/share/rund"}
	if exe, err := os.Executable(); err == nil {
		dirs = append(dirs, filepath.Join(filepath.Dir(exe), "guest"))
	}
	return dirs
}

// Guest returns the kernel and initramfs rund would use for flavour
// ("auto", "rund" or "cloud") with the guests found in dirs, and the
// flavour settled on. Tests boot what rund boots through it.
func Guest(dirs []string, flavour string) (kernel, initrd, settled string) {
	c := Config{GuestKernel: flavour}
	c.resolveGuest(dirs)
	return c.Kernel, c.Initrd, c.GuestKernel
}

// resolveGuest fills Kernel and Initrd that the file left empty with the
// flavour's files, and settles GuestKernel "auto" on the flavour found.
func (c *Config) resolveGuest(dirs []string) {
	if c.Kernel != "" && c.Initrd == "" {
		// A kernel of one's own: the initramfs beside it belongs to it
		// (modules and all), where there is one.
		if p := filepath.Join(filepath.Dir(c.Kernel), "initrd.img"); fileExists(p) {
			c.Initrd = p
		}
	}
	flavour := c.GuestKernel
	if flavour == "auto" {
		flavour = "cloud"
		if findGuestFile(dirs, "rund", "vmlinuz") != "" && findGuestFile(dirs, "rund", "initrd.img") != "" {
			flavour = "rund"
		}
		c.GuestKernel = flavour
	}
	for _, f := range []struct {
		path *string
		name string
	}{{&c.Kernel, "vmlinuz"}, {&c.Initrd, "initrd.img"}} {
		if *f.path != "" {
			continue
		}
		if *f.path = findGuestFile(dirs, flavour, f.name); *f.path == "" {
			// Not built: name the first place, so errors name a path.
			*f.path = filepath.Join(dirs[0], flavour, f.name)
		}
	}
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// findGuestFile returns the first existing dir/flavour/name, or "".
func findGuestFile(dirs []string, flavour, name string) string {
	for _, d := range dirs {
		p := filepath.Join(d, flavour, name)
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return ""
}
