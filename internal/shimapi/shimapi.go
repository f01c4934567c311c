// Package shimapi holds what the lifecycle (container) and the per-container
// shim exchange: the launch description create writes for the shim, and the
// control protocol the CLI verbs speak to a running shim over its socket.
// Both sides import it; neither imports the other.
package shimapi

import (
	"fmt"

	"github.com/rund-dev/rund/vm"
	"github.com/rund-dev/rund/vm/agent/proto"
)

// Files inside a container's state directory; SocketFile is in its VM
// directory (Launch.VMDir), whose path is short enough for a unix socket
// whatever the length of the container id.
const (
	LaunchFile  = "launch.json" // Launch, written by create
	SocketFile  = "shim.sock"   // control socket served by the shim
	ExitFile    = "exit"        // the container's exit status, written by the shim
	ConsoleFile = "console.log" // the guest's serial console
	ShimLogFile = "shim.log"    // the shim's own log
)

// Fds the shim inherits beyond stdio.
const (
	SyncFd     = 3 // write end of the pipe create waits on
	WritableFd = 4 // the writable-layer disk, already unlinked (split rootfs)
	ImageFd    = 5 // the read-only image, held open so the cache keeps it
)

// ShareTag is the guest's name of share slot i.
func ShareTag(i int) string { return fmt.Sprintf("rund%d", i) }

// Launch tells the shim what to run.
type Launch struct {
	ID       string `json:"id"`
	StateDir string `json:"stateDir"`
	VMDir    string `json:"vmDir"` // the VMM's sockets (short path)
	Debug    bool   `json:"debug,omitempty"`

	Hypervisor string `json:"hypervisor"`
	VMMBinary  string `json:"vmmBinary,omitempty"`
	Kernel     string `json:"kernel"`
	Initrd     string `json:"initrd"`
	Cmdline    string `json:"cmdline"`
	VCPUs      int    `json:"vcpus"`
	MemoryMiB  int    `json:"memoryMiB"`
	Accel      string `json:"accel"`
	TBSizeMiB  int    `json:"tbSizeMiB"`

	// Template: "" cold-boots; otherwise the templates directory and memory
	// directory the shim builds or restores from.
	TemplateDir string `json:"templateDir,omitempty"`
	MemDir      string `json:"memDir,omitempty"`

	// RootImage is the read-only image (EROFS) attached as the first disk;
	// the writable layer, when present, is fd WritableFd.
	RootImage     string `json:"rootImage"`
	RootImageSize int64  `json:"rootImageSize,omitempty"`
	// PmemSize is the virtio-pmem region for the image (0: virtio-blk);
	// images larger than it go on virtio-blk.
	PmemSize    int64 `json:"pmemSize,omitempty"`
	HasWritable bool  `json:"hasWritable"`
	// WritableSize is the writable layer's size in bytes (templates carry
	// a placeholder of the same size).
	WritableSize int64 `json:"writableSize,omitempty"`
	// ShareSlots is how many 9p devices the sandbox's VM carries (the
	// template's layout); Shares are the host directories behind the first
	// ones, tagged ShareTag(i). The rest are backed by an empty directory.
	ShareSlots int        `json:"shareSlots,omitempty"`
	Shares     []vm.Share `json:"shares,omitempty"`

	// CgroupProcs are cgroup.procs files the VMM and the shim join.
	CgroupProcs []string `json:"cgroupProcs,omitempty"`

	Create proto.CreateRequest `json:"create"`
}

// Ready is what the shim writes on the sync pipe: an error, or the pids.
type Ready struct {
	Error    string `json:"error,omitempty"`
	VMMPid   int    `json:"vmmPid,omitempty"`
	Template string `json:"template,omitempty"`
	// TemplateBuilt says this create built the template; Warning carries
	// a template failure that led to a cold boot.
	TemplateBuilt bool   `json:"templateBuilt,omitempty"`
	Warning       string `json:"warning,omitempty"`
}

// Control operations.
const (
	OpStart  = "start"
	OpKill   = "kill"
	OpExec   = "exec"
	OpPause  = "pause"
	OpResume = "resume"
	OpPs     = "ps"
	OpIomem  = "iomem"
)

// Request is one control request, a JSON line.
type Request struct {
	Op      string         `json:"op"`
	Signal  int            `json:"signal,omitempty"`
	All     bool           `json:"all,omitempty"`
	Process *proto.Process `json:"process,omitempty"`
}

// Response answers a Request, a JSON line. After a successful exec the
// connection carries proto frames for the exec'd process's stream: the
// client sends Stdin, CloseStdin, Signal and Resize; the shim sends Stdout,
// Stderr and finally Exit.
type Response struct {
	Error string `json:"error,omitempty"`
	Pids  []int  `json:"pids,omitempty"`
	Pid   int    `json:"pid,omitempty"`
	// Iomem is the guest's /proc/iomem, the answer to OpIomem.
	Iomem string `json:"iomem,omitempty"`
}
