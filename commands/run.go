package commands

import (
	"github.com/urfave/cli/v2"

	"github.com/rund-dev/rund/container"
)

func runCommand() *cli.Command {
	flags := append(createFlags(),
		&cli.BoolFlag{Name: "detach", Aliases: []string{"d"}, Usage: "return once the process runs"},
		&cli.BoolFlag{Name: "keep", Usage: "do not delete the container after it exits"},
		&cli.BoolFlag{Name: "no-subreaper", Usage: "accepted for runc compatibility"},
	)
	return &cli.Command{
		Name:      "run",
		Usage:     "create and start a container, wait for it and delete it",
		ArgsUsage: "<container-id>",
		Flags:     flags,
		Action: func(c *cli.Context) error {
			o, err := parseCreate(c)
			if err != nil {
				return err
			}
			status, err := container.Run(c.Context, o, c.Bool("detach"), c.Bool("keep"))
			if err != nil {
				return err
			}
			if status != 0 {
				return cli.Exit("", status)
			}
			return nil
		},
	}
}
