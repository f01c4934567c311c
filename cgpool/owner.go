package cgpool

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
)

// owner identifies a process across pid reuse: its pid and its start time
// in clock ticks since boot (field 22 of /proc/<pid>/stat).
type owner struct {
	pid   int
	start uint64
}

// ownerOf returns the identity of a running process.
func ownerOf(pid int) (owner, error) {
	start, state, err := procStat(pid)
	if err != nil {
		return owner{}, err
	}
	if state == 'Z' || state == 'X' {
		return owner{}, fmt.Errorf("process %d has exited", pid)
	}
	return owner{pid: pid, start: start}, nil
}

// alive reports whether the process that took the slot still runs. A
// zombie holds nothing, so it counts as dead; pid 0 is the unknown owner
// of a slot found in the tree by a rebuild.
func (o owner) alive() bool {
	if o.pid <= 0 {
		return false
	}
	start, state, err := procStat(o.pid)
	return err == nil && start == o.start && state != 'Z' && state != 'X'
}

func procStat(pid int) (start uint64, state byte, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, fmt.Errorf("reading process %d: %w", pid, err)
	}
	// The command name may hold spaces and parentheses: fields restart
	// after the last ')'. There, field 3 (state) is index 0 and field 22
	// (starttime) index 19.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("parsing /proc/%d/stat", pid)
	}
	f := bytes.Fields(b[i+1:])
	if len(f) < 20 {
		return 0, 0, fmt.Errorf("parsing /proc/%d/stat", pid)
	}
	start, err = strconv.ParseUint(string(f[19]), 10, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("parsing /proc/%d/stat: %w", pid, err)
	}
	return start, f[0][0], nil
}
