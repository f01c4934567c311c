package guest

import (
	"fmt"
	"strings"
	"unsafe"

	"github.com/rund-dev/rund/vm/agent/proto"
	"golang.org/x/sys/unix"
)

// capNames maps capability names (capabilities(7)) to their numbers.
var capNames = map[string]int{
	"CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4,
	"KILL": 5, "SETGID": 6, "SETUID": 7, "SETPCAP": 8, "LINUX_IMMUTABLE": 9,
	"NET_BIND_SERVICE": 10, "NET_BROADCAST": 11, "NET_ADMIN": 12, "NET_RAW": 13,
	"IPC_LOCK": 14, "IPC_OWNER": 15, "SYS_MODULE": 16, "SYS_RAWIO": 17,
	"SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_PACCT": 20, "SYS_ADMIN": 21,
	"SYS_BOOT": 22, "SYS_NICE": 23, "SYS_RESOURCE": 24, "SYS_TIME": 25,
	"SYS_TTY_CONFIG": 26, "MKNOD": 27, "LEASE": 28, "AUDIT_WRITE": 29,
	"AUDIT_CONTROL": 30, "SETFCAP": 31, "MAC_OVERRIDE": 32, "MAC_ADMIN": 33,
	"SYSLOG": 34, "WAKE_ALARM": 35, "BLOCK_SUSPEND": 36, "AUDIT_READ": 37,
	"PERFMON": 38, "BPF": 39, "CHECKPOINT_RESTORE": 40,
}

// lastKnownCap is the highest number in capNames.
const lastKnownCap = 40

// capSet turns names into a bit set of the capabilities the kernel knows;
// unknown names (a newer spec than this kernel) are skipped, as runc does.
func capSet(names []string, last int) uint64 {
	var s uint64
	for _, n := range names {
		c, ok := capNames[strings.TrimPrefix(strings.ToUpper(n), "CAP_")]
		if ok && c <= last {
			s |= 1 << uint(c)
		}
	}
	return s
}

// dropBounding removes from the bounding set every capability not kept.
func dropBounding(keep []string, last int) error {
	set := capSet(keep, last)
	for c := 0; c <= last; c++ {
		if set&(1<<uint(c)) != 0 {
			continue
		}
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil && err != unix.EINVAL {
			return fmt.Errorf("dropping capability %d from the bounding set: %w", c, err)
		}
	}
	return nil
}

// setCaps sets the effective, permitted and inheritable sets, then raises
// the ambient ones.
func setCaps(caps *proto.Capabilities, last int) error {
	eff := capSet(caps.Effective, last)
	perm := capSet(caps.Permitted, last)
	inh := capSet(caps.Inheritable, last)
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	data := [2]unix.CapUserData{
		{Effective: uint32(eff), Permitted: uint32(perm), Inheritable: uint32(inh)},
		{Effective: uint32(eff >> 32), Permitted: uint32(perm >> 32), Inheritable: uint32(inh >> 32)},
	}
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return fmt.Errorf("setting capabilities: %w", err)
	}
	amb := capSet(caps.Ambient, last)
	for c := 0; c <= last; c++ {
		if amb&(1<<uint(c)) == 0 {
			continue
		}
		// Raising fails unless the capability is permitted and inheritable;
		// runc ignores that, and so do we.
		_ = unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_RAISE, uintptr(c), 0, 0)
	}
	return nil
}

// setgroupsThread sets the supplementary groups of the calling thread only
// (unix.Setgroups changes every thread of the process).
func setgroupsThread(gids []uint32) error {
	var e unix.Errno
	if len(gids) == 0 {
		_, _, e = unix.RawSyscall(unix.SYS_SETGROUPS, 0, 0, 0)
	} else {
		_, _, e = unix.RawSyscall(unix.SYS_SETGROUPS, uintptr(len(gids)), uintptr(unsafe.Pointer(&gids[0])), 0)
	}
	if e != 0 {
		return e
	}
	return nil
}
