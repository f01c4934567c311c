package commands

import (
	"github.com/urfave/cli/v2"

	"github.com/rund-dev/rund/container"
)

func createFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "bundle", Aliases: []string{"b"}, Value: ".", Usage: "path to the bundle directory"},
		&cli.StringFlag{Name: "pid-file", Usage: "file to write the container's pid (the shim) to"},
		&cli.StringFlag{Name: "console-socket", Usage: "unix socket that receives the pty master when process.terminal is set"},
		&cli.BoolFlag{Name: "no-pivot", Usage: "accepted; the guest always pivots"},
		&cli.BoolFlag{Name: "no-new-keyring", Usage: "accepted; each container has its own kernel"},
		&cli.IntFlag{Name: "preserve-fds", Usage: "accepted; extra fds are not passed into the VM"},
		&cli.StringFlag{Name: "pidfd-socket", Usage: "accepted for runc compatibility"},
	}
}

func createCommand() *cli.Command {
	return &cli.Command{
		Name:      "create",
		Usage:     "create a container (boot its microVM; the process waits for start)",
		ArgsUsage: "<container-id>",
		Flags:     createFlags(),
		Action: func(c *cli.Context) error {
			o, err := parseCreate(c)
			if err != nil {
				return err
			}
			_, err = container.Create(c.Context, o)
			return err
		},
	}
}

func parseCreate(c *cli.Context) (container.CreateOptions, error) {
	if err := checkArgs(c, 1, 1); err != nil {
		return container.CreateOptions{}, err
	}
	g, err := globals(c)
	if err != nil {
		return container.CreateOptions{}, err
	}
	return container.CreateOptions{
		Options: g, ID: c.Args().First(), Bundle: c.String("bundle"),
		PidFile: c.String("pid-file"), ConsoleSocket: c.String("console-socket"),
		PreserveFDs: c.Int("preserve-fds"),
	}, nil
}
