package commands

import (
	"github.com/urfave/cli/v2"

	"github.com/rund-dev/rund/container"
)

func killCommand() *cli.Command {
	return &cli.Command{
		Name:      "kill",
		Usage:     "send a signal (default TERM) to the container's process",
		ArgsUsage: "<container-id> [signal]",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "all", Aliases: []string{"a"}, Usage: "signal every process of the container"},
		},
		Action: func(c *cli.Context) error {
			if err := checkArgs(c, 1, 2); err != nil {
				return err
			}
			sig, err := container.ParseSignal(c.Args().Get(1))
			if err != nil {
				return err
			}
			return container.Kill(c.Context, c.String("root"), c.Args().First(), sig, c.Bool("all"))
		},
	}
}
