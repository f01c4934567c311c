package commands

import (
	"github.com/urfave/cli/v2"

	"github.com/rund-dev/rund/container"
)

func startCommand() *cli.Command {
	return &cli.Command{
		Name:      "start",
		Usage:     "run the process of a created container",
		ArgsUsage: "<container-id>",
		Action: func(c *cli.Context) error {
			if err := checkArgs(c, 1, 1); err != nil {
				return err
			}
			g, err := globals(c)
			if err != nil {
				return err
			}
			return container.Start(c.Context, g.Root, c.Args().First())
		},
	}
}
