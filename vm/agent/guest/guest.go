// Package guest is the agent that runs as PID 1 inside the microVM: it loads
// the kernel modules it needs, serves the host over the channel (see
// vm/agent/proto), builds the container root and runs its processes.
package guest

import "os"

// IsGuest reports whether this process is the guest agent (PID 1 in the VM)
// or one of its helper children.
func IsGuest() bool {
	return os.Getpid() == 1
}

// Main runs the agent. It never returns normally: PID 1 powers the VM off.
func Main() {
}
