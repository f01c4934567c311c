// Package container owns the OCI lifecycle: the state machine of
// runtime-spec runtime.md, the state directory under the root, its lock, and
// rollback of partial work. Each verb of the CLI calls one function here.
package container

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rund-dev/rund/internal/atomicfile"
)

// Status is an OCI container status.
type Status string

// OCI statuses (runc adds paused).
const (
	Creating Status = "creating"
	Created  Status = "created"
	Running  Status = "running"
	Paused   Status = "paused"
	Stopped  Status = "stopped"
)

// stateVersion is bumped whenever State changes incompatibly.
const stateVersion = 1

// State is what rund persists for a container in <root>/<id>/state.json.
// It holds no channels, funcs or interfaces (see state_test.go).
type State struct {
	Version     int               `json:"version"`
	ID          string            `json:"id"`
	Bundle      string            `json:"bundle"`
	Rootfs      string            `json:"rootfs"`
	Status      Status            `json:"status"` // as last recorded; see Refresh
	Created     time.Time         `json:"created"`
	Annotations map[string]string `json:"annotations,omitempty"`
	// Shim is the per-container host process (the pid OCI callers see).
	Shim Proc `json:"shim"`
	// VMM is the hypervisor process the shim owns.
	VMM Proc `json:"vmm"`
	// Cgroup is the container's cgroup: pool parent and name.
	CgroupParent string `json:"cgroupParent,omitempty"`
	CgroupName   string `json:"cgroupName,omitempty"`
	// CgroupSlot is the pool slot behind the lease: a hint that saves
	// delete a lookup in the pool's record.
	CgroupSlot   int  `json:"cgroupSlot,omitempty"`
	CgroupPooled bool `json:"cgroupPooled,omitempty"`
	// Hypervisor is the backend name, Template the template id used ("" for a
	// cold boot).
	Hypervisor string `json:"hypervisor,omitempty"`
	Template   string `json:"template,omitempty"`
}

// Proc names a host process by pid and start time, so a reused pid is never
// mistaken for it.
type Proc struct {
	Pid       int    `json:"pid"`
	StartTime uint64 `json:"startTime"`
}

// Alive reports whether the process still exists (and is not a zombie).
func (p Proc) Alive() bool {
	if p.Pid <= 0 {
		return false
	}
	st, state, err := procStat(p.Pid)
	if err != nil || state == 'Z' || state == 'X' {
		return false
	}
	return p.StartTime == 0 || st == p.StartTime
}

// NewProc records pid with its start time.
func NewProc(pid int) Proc {
	st, _, _ := procStat(pid)
	return Proc{Pid: pid, StartTime: st}
}

// procStat returns the start time (field 22) and state of /proc/pid/stat.
func procStat(pid int) (uint64, byte, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return 0, 0, fmt.Errorf("parsing /proc/%d/stat", pid)
	}
	fields := strings.Fields(string(b[i+2:]))
	if len(fields) < 20 {
		return 0, 0, fmt.Errorf("parsing /proc/%d/stat", pid)
	}
	st, err := strconv.ParseUint(fields[19], 10, 64)
	return st, fields[0][0], err
}

// Signal sends sig to the process if it is still the one recorded.
func (p Proc) Signal(sig syscall.Signal) error {
	if !p.Alive() {
		return nil
	}
	return syscall.Kill(p.Pid, sig)
}

var idRE = regexp.MustCompile(`^[\w+\-.]+$`)

// ValidateID checks id like runc: non-empty, at most 1024 characters of
// letters, digits, '_', '+', '-', '.', and not "." or "..".
func ValidateID(id string) error {
	if id == "" || len(id) > 1024 || id == "." || id == ".." || !idRE.MatchString(id) {
		return fmt.Errorf("%w: %q", ErrInvalidID, id)
	}
	return nil
}

// dirOf returns the state directory of id.
func dirOf(root, id string) string { return filepath.Join(root, id) }

// Load reads the state of id.
func Load(root, id string) (*State, error) {
	if err := ValidateID(id); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(filepath.Join(dirOf(root, id), "state.json"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", id, ErrNotExist)
	}
	if err != nil {
		return nil, fmt.Errorf("loading container %s: %w", id, err)
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("loading container %s: %w", id, err)
	}
	if s.Version != stateVersion {
		return nil, fmt.Errorf("loading container %s: state version %d, want %d", id, s.Version, stateVersion)
	}
	return &s, nil
}

// saveLocked writes s atomically.
//
// Preconditions: the container's lock is held.
func (s *State) saveLocked(root string) error {
	s.Version = stateVersion
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding state of %s: %w", s.ID, err)
	}
	return atomicfile.Write(filepath.Join(dirOf(root, s.ID), "state.json"), b, 0o600)
}

// Refresh derives the current status: a container whose shim is gone is
// stopped, whatever was recorded.
func (s *State) Refresh() Status {
	if s.Status == Creating {
		if s.Shim.Pid == 0 || s.Shim.Alive() {
			return Creating
		}
		return Stopped
	}
	if !s.Shim.Alive() {
		return Stopped
	}
	return s.Status
}
