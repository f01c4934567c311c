package cloudhypervisor

// The fake VMM's VM: the state machine and device hot-plug.

import (
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// vmCall runs the VM endpoints. Preconditions: f.mu is held.
func (f *fakeVMM) vmCall(ep string, body []byte, fds []*os.File) (any, *fakeStatus) {
	if f.cfg == nil && ep != "vm.create" && ep != "vm.restore" && ep != "vm.delete" {
		if f.major() >= 53 {
			return nil, errStatus(http.StatusNotFound, "Error from API", "The VM is not created")
		}
		return nil, vmmError("Error from API", "The VM is not created")
	}
	switch ep {
	case "vm.create":
		if f.cfg != nil {
			return nil, vmmError("Error creating VM", "The VM is already created")
		}
		var c fConfig
		if st := decodeBody(body, &c); st != nil {
			return nil, st
		}
		if st := f.applyDefaults(&c); st != nil {
			return nil, st
		}
		f.cfg, f.state = &c, StateCreated
		return nil, nil
	case "vm.boot":
		if f.state != StateCreated {
			return nil, vmmError("Error booting VM", fmt.Sprintf("Invalid VM state transition: %s to Running", f.state))
		}
		if st := f.openDevices(); st != nil {
			return nil, vmmErrorWrap("Error booting VM", st)
		}
		f.memMode = memoryMode(f.cfg.Memory, false)
		f.setRunning()
		f.event("vm", "booted", nil)
		return nil, nil
	case "vm.pause":
		if f.state != StateRunning {
			return nil, vmmError("Error pausing VM", fmt.Sprintf("Invalid VM state transition: %s to Paused", f.state))
		}
		f.state = StatePaused
		f.event("vm", "paused", nil)
		return nil, nil
	case "vm.resume":
		if f.state != StatePaused {
			return nil, vmmError("Error resuming VM", fmt.Sprintf("Invalid VM state transition: %s to Running", f.state))
		}
		f.setRunning()
		f.event("vm", "resumed", nil)
		return nil, nil
	case "vm.shutdown":
		if f.state != StateRunning && f.state != StatePaused {
			return nil, vmmError("Error shutting down VM", "The VM is not booted")
		}
		f.closeVsock()
		f.state = StateCreated
		f.event("vm", "shutdown", nil)
		return nil, nil
	case "vm.delete":
		if f.cfg != nil {
			f.closeVsock()
			f.cfg, f.state = nil, ""
		}
		return nil, nil
	case "vm.info":
		return map[string]any{"config": f.cfg, "state": f.state, "memory_actual_size": totalMemory(f.cfg.Memory)}, nil
	case "vm.counters":
		return map[string]any{}, nil
	case "vm.snapshot":
		return nil, f.snapshot(body)
	case "vm.restore":
		return nil, f.restore(body)
	case "vm.remove-device":
		return nil, f.removeDevice(body)
	case "vm.add-disk", "vm.add-pmem", "vm.add-fs", "vm.add-net", "vm.add-vsock":
		return f.addDevice(ep, body, fds)
	}
	return nil, vmmError("Error from API", ep+" is not emulated")
}

func vmmErrorWrap(outer string, st *fakeStatus) *fakeStatus {
	return &fakeStatus{code: st.code, chain: append([]string{outer}, st.chain...)}
}

// setRunning starts the vCPUs; a guest acknowledges pending ejects.
func (f *fakeVMM) setRunning() {
	f.state = StateRunning
	if f.runningAt.IsZero() {
		f.runningAt = timeNow()
	}
	for _, id := range f.pending {
		f.dropDevice(id)
	}
	f.pending = nil
}

func totalMemory(m *fMemory) int64 {
	n := m.Size
	for _, z := range m.Zones {
		n += z.Size
	}
	return n
}

// memoryMode says how the VMM backs guest RAM.
func memoryMode(m *fMemory, restoredFromRanges bool) string {
	switch {
	case restoredFromRanges:
		return "copy"
	case m.Size == 0 && len(m.Zones) > 0 && m.Zones[0].File != "" && m.Zones[0].Shared:
		return "file-shared"
	case m.Size == 0 && len(m.Zones) > 0 && m.Zones[0].File != "":
		return "file-private"
	}
	return "anon"
}

// openDevices does what creating the devices does on the host: open backing
// files, bind the vsock socket, truncate the serial file, and give devices
// without an id a generated one. Preconditions: f.mu is held.
func (f *fakeVMM) openDevices() *fakeStatus {
	c := f.cfg
	for _, p := range []string{c.Payload.Kernel, c.Payload.Initramfs} {
		if p == "" {
			continue
		}
		if _, err := os.Stat(p); err != nil {
			return vmmError("Error loading kernel", err.Error())
		}
	}
	for _, z := range c.Memory.Zones {
		if z.File == "" {
			continue
		}
		st, err := os.Stat(z.File)
		if err != nil {
			return vmmError("Error creating memory zone", err.Error())
		}
		if st.Size() < z.Size {
			return vmmError("Error creating memory zone", fmt.Sprintf("file %s is smaller than zone %s", z.File, z.ID))
		}
	}
	for _, d := range c.Disks {
		if st := openDisk(d); st != nil {
			return st
		}
		f.genID(&d.ID, "_disk")
	}
	for _, p := range c.Pmem {
		if st := openPmem(p); st != nil {
			return st
		}
		f.genID(&p.ID, "_pmem")
	}
	for _, fs := range c.Fs {
		if _, err := os.Stat(fs.Socket); err != nil {
			return vmmError("Error creating virtio-fs device", err.Error())
		}
		f.genID(&fs.ID, "_fs")
	}
	for _, n := range c.Net {
		f.genID(&n.ID, "_net")
	}
	if c.Serial.Mode == "File" {
		sf, err := os.OpenFile(c.Serial.File, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return vmmError("Error creating serial output file", err.Error())
		}
		fmt.Fprintf(sf, "fake guest console (%s)\n", c.Payload.Cmdline)
		sf.Close()
	}
	if c.Vsock != nil {
		if st := f.bindVsock(c.Vsock.Socket); st != nil {
			return st
		}
		f.genID(&c.Vsock.ID, "_vsock")
	}
	return nil
}

func openDisk(d *fDisk) *fakeStatus {
	flag := os.O_RDWR
	if d.Readonly {
		flag = os.O_RDONLY
	}
	df, err := os.OpenFile(d.Path, flag, 0)
	if err != nil {
		return vmmError("Error creating virtio-blk device", fmt.Sprintf("Failed to open disk image %s", d.Path), err.Error())
	}
	df.Close()
	return nil
}

func openPmem(p *fPmem) *fakeStatus {
	st, err := os.Stat(p.File)
	if err != nil {
		return vmmError("Error creating virtio-pmem device", err.Error())
	}
	size := st.Size()
	if p.Size != nil {
		size = *p.Size
	}
	if size%(2<<20) != 0 {
		return vmmError("Error creating virtio-pmem device", "Size is not aligned to 2 MiB")
	}
	if p.Size == nil {
		p.Size = &size
	}
	return nil
}

func (f *fakeVMM) genID(id *string, prefix string) {
	if *id == "" {
		*id = fmt.Sprintf("%s%d", prefix, f.nextID)
		f.nextID++
	}
}

// addDevice is a hot-add: 204 on a created VM (the device joins the boot
// config), 200 with {id, bdf} on a booted or restored one.
func (f *fakeVMM) addDevice(ep string, body []byte, fds []*os.File) (any, *fakeStatus) {
	c := f.cfg
	var id *string
	var prefix string
	var open func() *fakeStatus
	var commit func()
	switch ep {
	case "vm.add-disk":
		d := &fDisk{}
		if st := decodeBody(body, d); st != nil {
			return nil, st
		}
		if st := diskDefaults(d); st != nil {
			return nil, st
		}
		id, prefix = &d.ID, "_disk"
		open = func() *fakeStatus { return openDisk(d) }
		commit = func() { c.Disks = append(c.Disks, d) }
	case "vm.add-pmem":
		p := &fPmem{}
		if st := decodeBody(body, p); st != nil {
			return nil, st
		}
		id, prefix = &p.ID, "_pmem"
		open = func() *fakeStatus { return openPmem(p) }
		commit = func() { c.Pmem = append(c.Pmem, p) }
	case "vm.add-fs":
		fs := &fFs{}
		if st := decodeBody(body, fs); st != nil {
			return nil, st
		}
		if st := fsDefaults(fs); st != nil {
			return nil, st
		}
		if !sharedMemory(c.Memory) {
			return nil, vmmError("Error adding fs", "Using vhost-user requires using shared memory or huge pages")
		}
		id, prefix = &fs.ID, "_fs"
		commit = func() { c.Fs = append(c.Fs, fs) }
	case "vm.add-net":
		n := &fNet{}
		if st := decodeBody(body, n); st != nil {
			return nil, st
		}
		for range fds {
			n.Fds = append(n.Fds, -1) // stored as -1, as the VMM does
		}
		id, prefix = &n.ID, "_net"
		commit = func() { c.Net = append(c.Net, n) }
	case "vm.add-vsock":
		v := &fVsock{}
		if st := decodeBody(body, v); st != nil {
			return nil, st
		}
		if c.Vsock != nil {
			return nil, vmmError("Error adding vsock", "Too many vsock devices")
		}
		id, prefix = &v.ID, "_vsock"
		open = func() *fakeStatus { return f.bindVsock(v.Socket) }
		commit = func() { c.Vsock = v }
	}
	if strings.HasPrefix(*id, "__") {
		return nil, vmmError("Error adding device", fmt.Sprintf("Invalid identifier %s", *id))
	}
	if *id != "" && slices.Contains(deviceIDs(c), *id) {
		return nil, vmmError("Error adding device", fmt.Sprintf("Duplicated device ID: %s", *id))
	}
	if f.state == StateCreated {
		commit()
		return nil, nil
	}
	if open != nil {
		if st := open(); st != nil {
			return nil, st
		}
	}
	f.genID(id, prefix)
	commit()
	f.nextSlot++
	return map[string]string{"id": *id, "bdf": fmt.Sprintf("0000:00:%02x.0", f.nextSlot+5)}, nil
}

// removeDevice starts an eject; the fake guest acknowledges it at once if it
// runs, or when it next runs.
func (f *fakeVMM) removeDevice(body []byte) *fakeStatus {
	var r struct {
		ID string `json:"id"`
	}
	if st := decodeBody(body, &r); st != nil {
		return st
	}
	if f.state != StateRunning && f.state != StatePaused {
		return vmmError("Error removing device", "The VM is not booted")
	}
	found := false
	for _, id := range deviceIDs(f.cfg) {
		found = found || id == r.ID
	}
	if !found {
		return vmmError("Error removing device", fmt.Sprintf("Unknown device identifier: %s", r.ID))
	}
	if f.state == StateRunning {
		f.dropDevice(r.ID)
	} else {
		f.pending = append(f.pending, r.ID)
	}
	return nil
}

func (f *fakeVMM) dropDevice(id string) {
	c := f.cfg
	c.Disks = dropByID(c.Disks, id, func(d *fDisk) string { return d.ID })
	c.Pmem = dropByID(c.Pmem, id, func(p *fPmem) string { return p.ID })
	c.Fs = dropByID(c.Fs, id, func(fs *fFs) string { return fs.ID })
	c.Net = dropByID(c.Net, id, func(n *fNet) string { return n.ID })
	if c.Vsock != nil && c.Vsock.ID == id {
		f.closeVsock()
		c.Vsock = nil
	}
}

func dropByID[T any](s []T, id string, get func(T) string) []T {
	out := s[:0]
	for _, v := range s {
		if get(v) != id {
			out = append(out, v)
		}
	}
	return out
}

// fileURL parses a file:// URL to a directory that must exist.
func fileURL(u string) (string, *fakeStatus) {
	p, err := url.Parse(u)
	if err != nil || p.Scheme != "file" || p.Path == "" {
		return "", vmmError("Error parsing URL", u)
	}
	st, err := os.Stat(p.Path)
	if err != nil {
		return "", vmmError("Error opening directory", err.Error())
	}
	if !st.IsDir() {
		return "", vmmError("Error opening directory", p.Path+" is not a directory")
	}
	return filepath.Clean(p.Path), nil
}
