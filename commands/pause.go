package commands

import (
	"encoding/json"
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/rund-dev/rund/container"
)

func pauseCommand() *cli.Command {
	return &cli.Command{
		Name: "pause", Usage: "freeze the container's processes", ArgsUsage: "<container-id>",
		Action: func(c *cli.Context) error {
			if err := checkArgs(c, 1, 1); err != nil {
				return err
			}
			return container.Pause(c.Context, c.String("root"), c.Args().First())
		},
	}
}

func resumeCommand() *cli.Command {
	return &cli.Command{
		Name: "resume", Usage: "thaw a paused container", ArgsUsage: "<container-id>",
		Action: func(c *cli.Context) error {
			if err := checkArgs(c, 1, 1); err != nil {
				return err
			}
			return container.Resume(c.Context, c.String("root"), c.Args().First())
		},
	}
}

func psCommand() *cli.Command {
	return &cli.Command{
		Name: "ps", Usage: "list the container's processes", ArgsUsage: "<container-id> [ps options]",
		Flags: []cli.Flag{&cli.StringFlag{Name: "format", Aliases: []string{"f"}, Value: "table", Usage: "table or json"}},
		Action: func(c *cli.Context) error {
			if err := checkArgs(c, 1, -1); err != nil {
				return err
			}
			host, guest, err := container.Pids(c.Context, c.String("root"), c.Args().First())
			if err != nil {
				return err
			}
			if c.String("format") == "json" {
				if host == nil {
					host = []int{}
				}
				b, _ := json.Marshal(host)
				fmt.Fprintln(c.App.Writer, string(b))
				return nil
			}
			fmt.Fprintln(c.App.Writer, "HOST-PID\tGUEST-PIDS")
			for _, p := range host {
				fmt.Fprintf(c.App.Writer, "%d\t%v\n", p, guest)
			}
			return nil
		},
	}
}

// checkpointCommand exists so that `rund checkpoint --help` answers, but it
// always fails: podman takes a zero exit of that probe to mean CRIU works.
func checkpointCommand() *cli.Command {
	return &cli.Command{
		Name: "checkpoint", Usage: "not supported", Hidden: true, SkipFlagParsing: true,
		Action: func(c *cli.Context) error { return fmt.Errorf("checkpoint is not supported by rund") },
	}
}
