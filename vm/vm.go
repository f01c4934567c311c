// Package vm defines what rund needs of a hypervisor: start a microVM, restore
// one from a template snapshot, and drive it (pause, resume, snapshot, stop),
// plus the guest channel the agent speaks on. Backends live in vm/qemu and
// vm/cloudhypervisor; vm never knows about rootfs or cgroups — callers hand it
// paths and open files.
package vm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
)

// Sentinel errors shared by backends.
var (
	// ErrUnavailable means the backend cannot run on this host (binary
	// missing, no usable accelerator); the wrapped message says why.
	ErrUnavailable = errors.New("hypervisor unavailable")
	// ErrExited means the VMM process is gone.
	ErrExited = errors.New("vmm exited")
	// ErrBadSnapshot means a template snapshot is missing, truncated or
	// does not match the configuration it is restored with.
	ErrBadSnapshot = errors.New("bad snapshot")
)

// Disk is a virtio-blk device. ID is stable between a template and its clones:
// a clone names the same device with its own backing Path.
type Disk struct {
	ID       string
	Path     string // host file, or a /proc/self/fd/N name from Config.AddFile
	ReadOnly bool
}

// Pmem is a virtio-pmem device backed by a host file mapped into the guest
// (the guest mounts it with DAX). Size must be a multiple of 2 MiB and equal
// in a template and its clones.
type Pmem struct {
	ID       string
	Path     string
	Size     int64
	ReadOnly bool
}

// Share is a host directory exported to the guest under a tag (9p with QEMU,
// virtio-fs with Cloud Hypervisor).
type Share struct {
	Tag      string
	Path     string
	ReadOnly bool
}

// Config describes one VM. Backends ignore what they cannot honour only when
// the field says so; anything else they cannot do is an error.
type Config struct {
	Name    string // for logs and process titles (the container id)
	Dir     string // private runtime directory: sockets, logs (keep the path short)
	Kernel  string
	Initrd  string
	Cmdline string

	VCPUs     int
	MemoryMiB int
	Accel     string // "kvm" or "tcg"
	// TBSizeMiB is the TCG translation cache size (0: backend default).
	TBSizeMiB int

	// MemPath, when set, backs guest RAM with this file. MemShared maps it
	// shared (a template: the file receives the guest's memory) or, when
	// false, private copy-on-write (a clone: pages are shared with the
	// template until written).
	MemPath   string
	MemShared bool

	Disks  []Disk
	Pmems  []Pmem
	Shares []Share

	// ConsoleLog receives the guest's serial console (empty: discarded).
	ConsoleLog string

	// Files are inherited by the VMM process as fds 3, 4, ... (see AddFile).
	Files []*os.File
}

// AddFile arranges for f to be inherited by the VMM and returns the path by
// which the VMM can open it. The file may already be unlinked.
func (c *Config) AddFile(f *os.File) string {
	c.Files = append(c.Files, f)
	return fmt.Sprintf("/proc/self/fd/%d", 2+len(c.Files))
}

// Backend starts microVMs.
type Backend interface {
	// Name is the backend's name ("qemu", "cloud-hypervisor").
	Name() string
	// Version identifies the VMM build; templates are keyed by it.
	Version(ctx context.Context) (string, error)
	// Start cold-boots a VM from cfg's kernel and initrd.
	Start(ctx context.Context, cfg Config) (Machine, error)
	// Restore starts a VM from the snapshot in dir (written by
	// Machine.Snapshot of a VM with the same devices) and resumes it.
	Restore(ctx context.Context, cfg Config, dir string) (Machine, error)
}

// Machine is a running VMM process. Its owner (the shim, or the template
// builder) must call Wait or Kill.
type Machine interface {
	// Pid is the VMM's host process id.
	Pid() int
	// Dial returns the guest channel. It may be called once.
	Dial(ctx context.Context) (net.Conn, error)
	// Pause stops the vCPUs; Resume starts them again.
	Pause(ctx context.Context) error
	Resume(ctx context.Context) error
	// Snapshot saves a paused VM's device state into dir, which must exist.
	Snapshot(ctx context.Context, dir string) error
	// Shutdown asks the VMM to quit, then kills it if it has not exited
	// when ctx is done. It returns once the process is gone.
	Shutdown(ctx context.Context) error
	// Wait blocks until the VMM process exits.
	Wait() error
}
