package cloudhypervisor

// The fake VMM's own view of VmConfig: the API's defaults and validation.

import (
	"encoding/json"
	"fmt"
	"strings"
)

// The fake's own view of VmConfig, with the defaults the real API fills in.
type fConfig struct {
	Payload *fPayload  `json:"payload"`
	Cpus    *fCpus     `json:"cpus"`
	Memory  *fMemory   `json:"memory"`
	Disks   []*fDisk   `json:"disks,omitempty"`
	Net     []*fNet    `json:"net,omitempty"`
	Fs      []*fFs     `json:"fs,omitempty"`
	Pmem    []*fPmem   `json:"pmem,omitempty"`
	Vsock   *fVsock    `json:"vsock,omitempty"`
	Serial  *fConsole  `json:"serial"`
	Console *fConsole  `json:"console"`
	Rng     *fRng      `json:"rng"`
	Extra   *fPlatform `json:"platform,omitempty"`
}

type fPayload struct {
	Kernel    string `json:"kernel,omitempty"`
	Cmdline   string `json:"cmdline,omitempty"`
	Initramfs string `json:"initramfs,omitempty"`
	Firmware  string `json:"firmware,omitempty"`
}

type fCpus struct {
	BootVcpus int `json:"boot_vcpus"`
	MaxVcpus  int `json:"max_vcpus"`
}

type fMemory struct {
	Size      int64    `json:"size"`
	Shared    bool     `json:"shared"`
	Hugepages bool     `json:"hugepages"`
	Prefault  bool     `json:"prefault"`
	Thp       *bool    `json:"thp"`
	Zones     []*fZone `json:"zones,omitempty"`
}

type fZone struct {
	ID     string `json:"id"`
	Size   int64  `json:"size"`
	File   string `json:"file,omitempty"`
	Shared bool   `json:"shared"`
}

type fDisk struct {
	Path      string `json:"path"`
	Readonly  bool   `json:"readonly"`
	Direct    bool   `json:"direct"`
	ID        string `json:"id,omitempty"`
	Serial    string `json:"serial,omitempty"`
	NumQueues *int   `json:"num_queues"`
	QueueSize *int   `json:"queue_size"`
	ImageType string `json:"image_type,omitempty"`
}

type fNet struct {
	Tap       string `json:"tap,omitempty"`
	Mac       string `json:"mac,omitempty"`
	ID        string `json:"id,omitempty"`
	NumQueues *int   `json:"num_queues"`
	QueueSize *int   `json:"queue_size"`
	Fds       []int  `json:"fds,omitempty"`
}

type fFs struct {
	Tag       string `json:"tag"`
	Socket    string `json:"socket"`
	ID        string `json:"id,omitempty"`
	NumQueues *int   `json:"num_queues"`
	QueueSize *int   `json:"queue_size"`
}

type fPmem struct {
	File          string `json:"file"`
	Size          *int64 `json:"size,omitempty"`
	DiscardWrites bool   `json:"discard_writes"`
	ID            string `json:"id,omitempty"`
}

type fVsock struct {
	Cid    int    `json:"cid"`
	Socket string `json:"socket"`
	ID     string `json:"id,omitempty"`
}

type fConsole struct {
	Mode   fMode  `json:"mode"`
	File   string `json:"file,omitempty"`
	Socket string `json:"socket,omitempty"`
}

// fMode rejects unknown enum strings, as the API does.
type fMode string

func (m *fMode) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	switch s {
	case "Off", "Null", "Pty", "Tty", "File", "Socket":
		*m = fMode(s)
		return nil
	}
	return fmt.Errorf("unknown variant `%s`", s)
}

type fRng struct {
	Src string `json:"src"`
}

type fPlatform struct {
	NumPciSegments int `json:"num_pci_segments,omitempty"`
}

func intp(n int) *int { return &n }

// applyDefaults fills what the API fills, and validates like VmConfig's
// validate (a 500 before v53).
func (f *fakeVMM) applyDefaults(c *fConfig) *fakeStatus {
	if c.Payload == nil || (c.Payload.Kernel == "" && c.Payload.Firmware == "") {
		return vmmError("Error creating VM", "Invalid VM config", "No kernel or firmware in payload")
	}
	if c.Cpus == nil {
		c.Cpus = &fCpus{BootVcpus: 1, MaxVcpus: 1}
	}
	if c.Memory == nil {
		c.Memory = &fMemory{Size: 512 << 20}
	}
	if c.Memory.Thp == nil {
		t := true
		c.Memory.Thp = &t
	}
	if c.Serial == nil {
		c.Serial = &fConsole{Mode: "Null"}
	}
	if c.Console == nil {
		c.Console = &fConsole{Mode: "Tty"}
	}
	if c.Rng == nil {
		c.Rng = &fRng{Src: "/dev/urandom"}
	}
	if c.Memory.Size == 0 && len(c.Memory.Zones) == 0 {
		return vmmError("Error creating VM", "Invalid VM config", "Memory size is zero and no zones are given")
	}
	for _, d := range c.Disks {
		if st := diskDefaults(d); st != nil {
			return st
		}
	}
	for _, fs := range c.Fs {
		if st := fsDefaults(fs); st != nil {
			return st
		}
	}
	if len(c.Fs) > 0 && !sharedMemory(c.Memory) {
		return vmmError("Error creating VM", "Invalid VM config", "Using vhost-user requires using shared memory or huge pages")
	}
	if c.Vsock != nil && c.Vsock.Cid < 3 {
		return vmmError("Error creating VM", "Invalid VM config", "Invalid vsock CID")
	}
	seen := map[string]bool{}
	for _, id := range deviceIDs(c) {
		if strings.HasPrefix(id, "__") {
			return vmmError("Error creating VM", "Invalid VM config", fmt.Sprintf("Invalid identifier %s", id))
		}
		if seen[id] {
			return vmmError("Error creating VM", "Invalid VM config", fmt.Sprintf("Duplicated device ID: %s", id))
		}
		seen[id] = true
	}
	return nil
}

func diskDefaults(d *fDisk) *fakeStatus {
	if d.NumQueues != nil && *d.NumQueues == 0 || d.QueueSize != nil && *d.QueueSize == 0 {
		return vmmError("Error creating VM", "Invalid VM config", "Number of queues or queue size is zero")
	}
	if d.NumQueues == nil {
		d.NumQueues = intp(1)
	}
	if d.QueueSize == nil {
		d.QueueSize = intp(128)
	}
	return nil
}

func fsDefaults(fs *fFs) *fakeStatus {
	if fs.NumQueues != nil && *fs.NumQueues == 0 || fs.QueueSize != nil && *fs.QueueSize == 0 {
		return vmmError("Error creating VM", "Invalid VM config", "Number of queues or queue size is zero")
	}
	if fs.NumQueues == nil {
		fs.NumQueues = intp(1)
	}
	if fs.QueueSize == nil {
		fs.QueueSize = intp(1024)
	}
	return nil
}

// sharedMemory is whether every byte of guest RAM is shared.
func sharedMemory(m *fMemory) bool {
	if m.Shared || m.Hugepages {
		return true
	}
	if m.Size > 0 {
		return false
	}
	for _, z := range m.Zones {
		if !z.Shared {
			return false
		}
	}
	return true
}

func deviceIDs(c *fConfig) []string {
	var ids []string
	add := func(id string) {
		if id != "" {
			ids = append(ids, id)
		}
	}
	for _, d := range c.Disks {
		add(d.ID)
	}
	for _, n := range c.Net {
		add(n.ID)
	}
	for _, fs := range c.Fs {
		add(fs.ID)
	}
	for _, p := range c.Pmem {
		add(p.ID)
	}
	if c.Vsock != nil {
		add(c.Vsock.ID)
	}
	return ids
}
