package commands

import (
	"github.com/urfave/cli/v2"

	"github.com/rund-dev/rund/shim"
)

// shimCommand is the hidden per-container process started by create.
func shimCommand() *cli.Command {
	return &cli.Command{
		Name:   "shim",
		Hidden: true,
		Action: func(c *cli.Context) error {
			return cli.Exit("", shim.Main(c.String("root"), c.Args().First()))
		},
	}
}
