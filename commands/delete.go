package commands

import (
	"github.com/urfave/cli/v2"

	"github.com/rund-dev/rund/container"
)

func deleteCommand() *cli.Command {
	return &cli.Command{
		Name:      "delete",
		Usage:     "delete a container and everything it holds",
		ArgsUsage: "<container-id>",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "force", Aliases: []string{"f"}, Usage: "kill a running container first; succeed for an unknown id"},
		},
		Action: func(c *cli.Context) error {
			if err := checkArgs(c, 1, 1); err != nil {
				return err
			}
			g, err := globals(c)
			if err != nil {
				return err
			}
			return container.Delete(c.Context, g, c.Args().First(), c.Bool("force"))
		},
	}
}
