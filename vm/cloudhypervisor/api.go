package cloudhypervisor

// Typed request and response bodies for the Cloud Hypervisor REST API, for
// only the fields rund uses. Field names follow the API's OpenAPI schema.
// Cloud Hypervisor takes zero values literally (num_queues: 0 is an error), so
// optional fields are omitempty and the client only sends what it sets.

// VMConfig is the body of vm.create and the "config" of vm.info. It is also
// the shape of config.json in a snapshot directory, but Restore edits that file
// as generic JSON so that fields this type omits survive the rewrite.
type VMConfig struct {
	Payload *PayloadConfig `json:"payload,omitempty"`
	CPUs    *CPUsConfig    `json:"cpus,omitempty"`
	Memory  *MemoryConfig  `json:"memory,omitempty"`
	Disks   []DiskConfig   `json:"disks,omitempty"`
	Net     []NetConfig    `json:"net,omitempty"`
	Fs      []FsConfig     `json:"fs,omitempty"`
	Pmem    []PmemConfig   `json:"pmem,omitempty"`
	Vsock   *VsockConfig   `json:"vsock,omitempty"`
	Serial  *ConsoleConfig `json:"serial,omitempty"`
	Console *ConsoleConfig `json:"console,omitempty"`
}

// PayloadConfig is what the VM boots: a kernel (x86_64: vmlinux ELF with a
// PVH note, or bzImage from v39) with an initramfs and command line.
type PayloadConfig struct {
	Kernel    string `json:"kernel,omitempty"`
	Initramfs string `json:"initramfs,omitempty"`
	Cmdline   string `json:"cmdline,omitempty"`
	Firmware  string `json:"firmware,omitempty"`
}

// CPUsConfig sets the vCPU count.
type CPUsConfig struct {
	BootVCPUs int `json:"boot_vcpus"`
	MaxVCPUs  int `json:"max_vcpus"`
}

// MemoryConfig sets guest RAM. Size 0 means "RAM is the sum of Zones".
type MemoryConfig struct {
	Size   int64              `json:"size"`
	Shared bool               `json:"shared,omitempty"`
	Zones  []MemoryZoneConfig `json:"zones,omitempty"`
}

// MemoryZoneConfig is one region of guest RAM, optionally backed by a host
// file. A shared file-backed zone is skipped by vm.snapshot (the file is the
// memory); restoring it with Shared false maps the file private, copy-on-write.
type MemoryZoneConfig struct {
	ID     string `json:"id"`
	Size   int64  `json:"size"`
	File   string `json:"file,omitempty"`
	Shared bool   `json:"shared,omitempty"`
}

// DiskConfig is a virtio-blk device. Serial (v35) is how the guest finds the
// disk (/dev/disk/by-id/virtio-<serial>); ImageType "Raw" (v51; ignored as an
// unknown key before) stops the VMM from probing a guest-writable image for a
// qcow2 header.
type DiskConfig struct {
	Path      string `json:"path"`
	Readonly  bool   `json:"readonly,omitempty"`
	Direct    bool   `json:"direct,omitempty"`
	ID        string `json:"id,omitempty"`
	Serial    string `json:"serial,omitempty"`
	ImageType string `json:"image_type,omitempty"`
}

// NetConfig is a virtio-net device on a TAP (by name, or by fds sent with the
// request; see Client.AddNet).
type NetConfig struct {
	Tap string `json:"tap,omitempty"`
	MAC string `json:"mac,omitempty"`
	MTU int    `json:"mtu,omitempty"`
	ID  string `json:"id,omitempty"`
}

// FsConfig is a virtio-fs device served by a vhost-user daemon (virtiofsd)
// listening on Socket. It needs shared guest memory.
type FsConfig struct {
	Tag       string `json:"tag"`
	Socket    string `json:"socket"`
	NumQueues int    `json:"num_queues,omitempty"`
	QueueSize int    `json:"queue_size,omitempty"`
	ID        string `json:"id,omitempty"`
}

// PmemConfig is a virtio-pmem device mapping File into the guest.
// DiscardWrites maps it private so guest writes never reach the file.
type PmemConfig struct {
	File          string `json:"file"`
	Size          int64  `json:"size,omitempty"`
	DiscardWrites bool   `json:"discard_writes,omitempty"`
	ID            string `json:"id,omitempty"`
}

// VsockConfig is the VM's one virtio-vsock device, bridged to the host as a
// hybrid vsock unix socket.
type VsockConfig struct {
	CID    int    `json:"cid"`
	Socket string `json:"socket"`
	ID     string `json:"id,omitempty"`
}

// ConsoleConfig configures the serial port or the virtio console.
type ConsoleConfig struct {
	Mode   string `json:"mode"`
	File   string `json:"file,omitempty"`
	Socket string `json:"socket,omitempty"`
}

// Console modes used by rund. "Off" removes the device; "Null" keeps it and
// discards output (so a template's clones can still log to a File).
const (
	ConsoleOff  = "Off"
	ConsoleNull = "Null"
	ConsoleFile = "File"
)

// VM states reported by vm.info.
const (
	StateCreated  = "Created"
	StateRunning  = "Running"
	StatePaused   = "Paused"
	StateShutdown = "Shutdown"
)

// VMInfo is the body of GET vm.info.
type VMInfo struct {
	Config           VMConfig `json:"config"`
	State            string   `json:"state"`
	MemoryActualSize int64    `json:"memory_actual_size,omitempty"`
}

// PingResponse is the body of GET vmm.ping.
type PingResponse struct {
	BuildVersion string   `json:"build_version"`
	Version      string   `json:"version"`
	Pid          int64    `json:"pid,omitempty"`
	Features     []string `json:"features,omitempty"`
}

// SnapshotConfig is the body of vm.snapshot.
type SnapshotConfig struct {
	DestinationURL string `json:"destination_url"`
}

// RestoreConfig is the body of vm.restore. The VM comes up Paused unless
// Resume (v52) is set; rund always resumes explicitly.
type RestoreConfig struct {
	SourceURL         string `json:"source_url"`
	Prefault          bool   `json:"prefault,omitempty"`
	MemoryRestoreMode string `json:"memory_restore_mode,omitempty"`
}

// PciDeviceInfo is the body of a hot-add on a VM that exists (booted or
// restored): the device's id and its guest PCI address.
type PciDeviceInfo struct {
	ID  string `json:"id"`
	BDF string `json:"bdf"`
}

// RemoveDeviceRequest is the body of vm.remove-device.
type RemoveDeviceRequest struct {
	ID string `json:"id"`
}
