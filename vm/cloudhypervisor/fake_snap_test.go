package cloudhypervisor

// The fake VMM's snapshot, restore and hybrid vsock.

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

var timeNow = time.Now

// fakeState is the fake's state.json: what a restore takes from the
// snapshot rather than from config.json.
type fakeState struct {
	Devices      []string         `json:"devices"`
	DiskCapacity map[string]int64 `json:"disk_capacity"`
	Vcpus        int              `json:"vcpus"`
	Memory       int64            `json:"memory"`
}

// snapshot writes config.json, state.json and, unless all RAM is a shared
// file-backed zone, memory-ranges. Preconditions: f.mu is held.
func (f *fakeVMM) snapshot(body []byte) *fakeStatus {
	var r struct {
		DestinationURL string `json:"destination_url"`
	}
	if st := decodeBody(body, &r); st != nil {
		return st
	}
	if f.state != StatePaused {
		return vmmError("Error snapshotting VM", "VM is not paused")
	}
	dir, st := fileURL(r.DestinationURL)
	if st != nil {
		return vmmErrorWrap("Error snapshotting VM", st)
	}
	for _, name := range []string{snapConfig, snapState, snapMemory} {
		if _, err := os.Lstat(filepath.Join(dir, name)); err == nil {
			return vmmError("Error snapshotting VM", fmt.Sprintf("%s: File exists (os error 17)", filepath.Join(dir, name)))
		}
	}
	conf, _ := json.MarshalIndent(f.cfg, "", "  ")
	state := fakeState{DiskCapacity: map[string]int64{}, Vcpus: f.cfg.Cpus.BootVcpus, Memory: totalMemory(f.cfg.Memory)}
	state.Devices = deviceIDs(f.cfg)
	slices.Sort(state.Devices)
	for _, d := range f.cfg.Disks {
		if st, err := os.Stat(d.Path); err == nil {
			state.DiskCapacity[d.ID] = st.Size()
		}
	}
	sb, _ := json.Marshal(state)
	if err := os.WriteFile(filepath.Join(dir, snapConfig), conf, 0o600); err != nil {
		return vmmError("Error snapshotting VM", err.Error())
	}
	if err := os.WriteFile(filepath.Join(dir, snapState), sb, 0o600); err != nil {
		return vmmError("Error snapshotting VM", err.Error())
	}
	// Shared file-backed zones are skipped: the file already is the memory.
	ranges := f.cfg.Memory.Size
	for _, z := range f.cfg.Memory.Zones {
		if z.File == "" || !z.Shared {
			ranges += z.Size
		}
	}
	if ranges > 0 {
		mf, err := os.OpenFile(filepath.Join(dir, snapMemory), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return vmmError("Error snapshotting VM", err.Error())
		}
		_ = mf.Truncate(ranges) // sparse, as since v52
		mf.Close()
	}
	f.event("vm", "snapshotted", nil)
	return nil
}

// restore loads a snapshot into this fresh VMM: it reads config.json from
// source_url (honouring edited paths), checks it against state.json, and
// ends Paused (Running with resume). Preconditions: f.mu is held.
func (f *fakeVMM) restore(body []byte) *fakeStatus {
	var r struct {
		SourceURL         string `json:"source_url"`
		Prefault          bool   `json:"prefault"`
		MemoryRestoreMode string `json:"memory_restore_mode"`
		Resume            bool   `json:"resume"`
	}
	if st := decodeBody(body, &r); st != nil {
		return st
	}
	switch r.MemoryRestoreMode {
	case "", "Copy", "OnDemand":
	default:
		return errStatus(http.StatusBadRequest, "Error parsing request body", "unknown variant `"+r.MemoryRestoreMode+"`")
	}
	if f.cfg != nil {
		return vmmError("Error restoring VM", "The VM is already created")
	}
	dir, st := fileURL(r.SourceURL)
	if st != nil {
		return vmmErrorWrap("Error restoring VM", st)
	}
	raw, err := os.ReadFile(filepath.Join(dir, snapConfig))
	if err != nil {
		return vmmError("Error restoring VM", "Cannot read snapshot config", err.Error())
	}
	var c fConfig
	if err := json.Unmarshal(raw, &c); err != nil {
		return vmmError("Error restoring VM", "Cannot parse snapshot config", err.Error())
	}
	if st := f.applyDefaults(&c); st != nil {
		return vmmErrorWrap("Error restoring VM", st)
	}
	sb, err := os.ReadFile(filepath.Join(dir, snapState))
	if err != nil {
		return vmmError("Error restoring VM", "Cannot read snapshot state", err.Error())
	}
	var state fakeState
	if err := json.Unmarshal(sb, &state); err != nil {
		return vmmError("Error restoring VM", "Cannot parse snapshot state", err.Error())
	}
	ids := deviceIDs(&c)
	slices.Sort(ids)
	if !slices.Equal(ids, state.Devices) {
		return vmmError("Error restoring VM", fmt.Sprintf("Devices %v do not match the snapshot's %v", ids, state.Devices))
	}
	if c.Cpus.BootVcpus != state.Vcpus || totalMemory(c.Memory) != state.Memory {
		return vmmError("Error restoring VM", "vCPU count or memory size does not match the snapshot")
	}
	_, err = os.Stat(filepath.Join(dir, snapMemory))
	hasRanges := err == nil
	needRanges := c.Memory.Size > 0
	for _, z := range c.Memory.Zones {
		needRanges = needRanges || z.File == ""
	}
	if !hasRanges && needRanges {
		return vmmError("Error restoring VM", "Cannot open memory-ranges: No such file or directory (os error 2)")
	}
	f.cfg = &c
	if st := f.openDevices(); st != nil {
		f.cfg = nil
		f.closeVsock()
		return vmmErrorWrap("Error restoring VM", st)
	}
	f.memMode = memoryMode(c.Memory, hasRanges)
	f.state = StatePaused
	f.event("vm", "restored", nil)
	if r.Resume {
		f.setRunning()
	}
	return nil
}

// bindVsock listens on the vsock device's socket, failing if it exists.
// Preconditions: f.mu is held.
func (f *fakeVMM) bindVsock(path string) *fakeStatus {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return vmmError("Error creating virtio-vsock device", err.Error())
	}
	f.vsockLn, f.vsockPath = ln, path
	go f.vsockAccept(ln)
	return nil
}

// closeVsock unbinds the vsock socket. Preconditions: f.mu is held.
func (f *fakeVMM) closeVsock() {
	if f.vsockLn != nil {
		f.vsockLn.Close()
		f.vsockLn = nil
	}
}

func (f *fakeVMM) vsockAccept(ln *net.UnixListener) {
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			return
		}
		go f.vsockConn(c)
	}
}

// vsockConn answers "CONNECT <port>\n" with "OK <host port>\n" when the
// fake guest listens on port (it then echoes), or closes the connection.
func (f *fakeVMM) vsockConn(c *net.UnixConn) {
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	var line []byte
	b := make([]byte, 1)
	for len(line) < 64 {
		if _, err := c.Read(b); err != nil {
			return
		}
		if b[0] == '\n' {
			break
		}
		line = append(line, b[0])
	}
	fields := strings.Fields(string(line))
	if len(fields) != 2 || !strings.EqualFold(fields[0], "CONNECT") {
		return
	}
	port, err := strconv.ParseUint(fields[1], 10, 32)
	if err != nil {
		return
	}
	f.mu.Lock()
	listening := f.guestListening(uint32(port))
	host := f.nextHost
	f.nextHost++
	f.mu.Unlock()
	if !listening {
		return // EOF without OK
	}
	fmt.Fprintf(c, "OK %d\n", host)
	_ = c.SetReadDeadline(time.Time{})
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, err := c.Write(buf[:n]); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// guestListening is whether the fake guest accepts on port now.
// Preconditions: f.mu is held.
func (f *fakeVMM) guestListening(port uint32) bool {
	if f.state != StateRunning || !slices.Contains(f.opts.guestPorts, port) {
		return false
	}
	return timeNow().Sub(f.runningAt) >= f.opts.guestDelay
}

// guestDial is the fake guest connecting out to host port: the VMM connects
// to <socket>_<port>, where the host must already listen.
func (f *fakeVMM) guestDial(port uint32) (net.Conn, error) {
	f.mu.Lock()
	path := f.vsockPath
	f.mu.Unlock()
	return net.Dial("unix", fmt.Sprintf("%s_%d", path, port))
}
