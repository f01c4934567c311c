// Command rund is an OCI runtime that runs every container in its own
// microVM. The same binary is the CLI, the per-container shim (a hidden
// command), and — as /init in the guest initramfs — the guest agent.
package main

import (
	"os"

	"github.com/rund-dev/rund/commands"
	"github.com/rund-dev/rund/vm/agent/guest"
)

func main() {
	if guest.IsGuest() {
		guest.Main()
		return
	}
	os.Exit(commands.Main(os.Args))
}
