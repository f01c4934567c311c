// Package proto defines the wire protocol between the host side of rund (the
// shim) and the guest agent (PID 1 in the microVM). Host and guest share only
// this package; it depends on the standard library alone.
//
// The channel is a single reliable byte stream (virtio-serial with QEMU, a
// hybrid vsock connection with Cloud Hypervisor). It carries frames:
//
//	+------+-----------+-----------+-----------+----------------+
//	| kind | stream    | seq       | length    | payload        |
//	| u8   | u32 BE    | u32 BE    | u32 BE    | length bytes   |
//	+------+-----------+-----------+-----------+----------------+
//
// Control frames carry a JSON payload; data frames (Stdin, Stdout, Stderr)
// carry raw bytes. Every host request carries a non-zero seq and is answered
// by exactly one Reply frame with the same seq.
//
// Stream 1 is the container's init process; exec'd processes get streams 2
// and up, chosen by the host.
//
// A session:
//
//	host (shim)                                  guest (agent)
//	    |                                             | boots, opens the channel,
//	    |                                             | waits for Hello
//	    |-- Hello{version, time, seed} -------------->| set clock, reseed RNG
//	    |<------------------------- Reply{version} ---|
//	    |-- Create{root, mounts, process} (stream 1) ->| mount root, fork the
//	    |<------------------------------ Reply{pid} ---| process, held before exec
//	    |-- Start (stream 1) ------------------------>| release it: execve
//	    |<------------------------------ Reply{} -----|
//	    |-- Stdin / CloseStdin (stream 1) ----------->|
//	    |<------------------- Stdout / Stderr --------|
//	    |-- Signal{sig} / Resize{rows,cols} --------->|
//	    |-- Exec{process} (stream n) ---------------->| spawn in the container
//	    |<------------------------------ Reply{pid} ---|
//	    |<------------------------ Exit{status} ------| after output drained
//	    |-- Shutdown -------------------------------->| sync, power off
//
// For templates the builder sends Hello, then Warmup (load every module, run
// the mount and spawn paths once), then pauses and snapshots the VM while the
// agent waits for the next frame. A clone's shim starts with Hello again,
// carrying the clone's own clock and entropy.
package proto
