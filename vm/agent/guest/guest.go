// Package guest is the agent that runs as PID 1 inside the microVM: it loads
// the kernel modules it needs, serves the host over the channel (see
// vm/agent/proto), builds the container root and runs its processes.
//
// The agent is the same static binary as the host CLI. It starts container
// processes by re-executing itself (/proc/self/exe) with argv[0] set to
// childArg0: that helper child gets the process and its stdio from the
// agent, enters the container root in its own mount namespace, drops
// privileges, waits until the agent releases it, then execs the container's
// program. Helpers are started ahead of need (zygotes, see zygote.go): the
// warm-up leaves two in the template, so a clone's Create and first Exec
// start no process; a used one is replaced in the background.
//
// A clone of a template runs every code path it takes for the first time
// (under TCG, QEMU translates it again), so the warm-up also leaves ready
// what does not depend on the container: a container directory and the
// usual spec mounts (stage.go). Every request's Reply.Info says where its
// time went.
//
// Layout of the agent's own namespace:
//
//	/rund/<id>/lower   the read-only image (erofs or ext4, DAX when asked)
//	/rund/<id>/upper   the writable ext4 layer (upper/ and work/ inside)
//	/rund/<id>/root    the container root (overlay, or a bind of lower)
//	/rund/<id>/files   a tmpfs holding the files bind-mounted from Mount.Data
//	/rund-spare        a container directory made ahead, renamed to /rund/<id>
//	/rund-stage        the staged mounts, moved into the root by Create
//
// Every helper child gets its own copy of that mount namespace, moves the
// container root onto / and chroots into it, after detaching every other
// mount; the initramfs files are deleted once the modules are loaded, so
// the container sees nothing of the agent.
//
// Semantics worth knowing:
//   - The VM is the isolation boundary: there are no user, network or IPC
//     namespaces. The container has its own PID namespace, whose PID 1 is
//     stream 1's process (it ignores signals it has no handler for, but
//     SIGKILL, as runc's init does); exec'd processes join it. When stream
//     1's process exits every other process is killed before its Exit is
//     sent. The proc filesystems of the container are its namespace's,
//     mounted by the init's helper. Pids in replies are the agent's.
//   - The init gets its own copy of the agent's mount namespace; exec'd
//     processes join the init's, so they see the mounts it made.
//   - The writable layer is mounted without its journal or cache flushes
//     (it vanishes with the sandbox; nothing of it must survive a crash).
//   - Not done: seccomp, AppArmor/SELinux labels, devices beyond the
//     standard nodes, cgroup v1 layouts (a cgroup mount is cgroup2, best
//     effort), /dev/console bound to the terminal. Closing a terminal's
//     stdin sends ^D. Host directories need a share tag (9p or virtio-fs).
package guest

import "os"

// childArg0 is the argv[0] of the helper child the agent re-executes to start
// a container process.
const childArg0 = "rund-guest-child"

// IsGuest reports whether this process is the guest agent (PID 1 in the VM,
// started by the kernel as /init) or one of its helper children. It is false
// for the host CLI, even when that runs as PID 1 of a host container.
func IsGuest() bool {
	if len(os.Args) == 0 {
		return false
	}
	return (os.Getpid() == 1 && os.Args[0] == "/init") || os.Args[0] == childArg0
}

// Main runs the agent, or the helper child when re-executed as one. It never
// returns normally: PID 1 powers the VM off, the helper child execs.
func Main() {
	if len(os.Args) > 0 && os.Args[0] == childArg0 {
		// An init's helper is PID 1 of its own PID namespace.
		childMain()
		return
	}
	agentMain()
}
