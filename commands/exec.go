package commands

import (
	"github.com/urfave/cli/v2"

	"github.com/rund-dev/rund/container"
)

func execCommand() *cli.Command {
	return &cli.Command{
		Name:      "exec",
		Usage:     "run another process in a running container",
		ArgsUsage: "<container-id> [command [args...]]",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "process", Aliases: []string{"p"}, Usage: "process.json to run"},
			&cli.BoolFlag{Name: "detach", Aliases: []string{"d"}, Usage: "return once the process runs"},
			&cli.StringFlag{Name: "pid-file", Usage: "file to write the process's host pid to"},
			&cli.StringFlag{Name: "console-socket", Usage: "unix socket that receives the pty master"},
			&cli.BoolFlag{Name: "tty", Aliases: []string{"t"}, Usage: "allocate a pseudo-TTY"},
			&cli.StringFlag{Name: "cwd", Usage: "working directory"},
			&cli.StringSliceFlag{Name: "env", Aliases: []string{"e"}, Usage: "environment variable"},
			&cli.StringFlag{Name: "user", Aliases: []string{"u"}, Usage: "uid[:gid]"},
			&cli.IntSliceFlag{Name: "additional-gids", Aliases: []string{"g"}, Usage: "additional gid"},
			&cli.BoolFlag{Name: "no-new-privs", Usage: "set no_new_privs"},
			&cli.StringSliceFlag{Name: "cap", Aliases: []string{"c"}, Usage: "accepted"},
			&cli.StringFlag{Name: "process-label", Usage: "accepted"},
			&cli.StringFlag{Name: "apparmor", Usage: "accepted"},
			&cli.IntFlag{Name: "preserve-fds", Usage: "accepted"},
			&cli.StringFlag{Name: "cgroup", Usage: "accepted"},
			&cli.BoolFlag{Name: "ignore-paused", Usage: "accepted"},
		},
		Action: func(c *cli.Context) error {
			if err := checkArgs(c, 1, -1); err != nil {
				return err
			}
			o := container.ExecOptions{
				Root: c.String("root"), ID: c.Args().First(), ProcessFile: c.String("process"),
				Args: c.Args().Tail(), Detach: c.Bool("detach"), PidFile: c.String("pid-file"),
				ConsoleSocket: c.String("console-socket"), Tty: c.Bool("tty"), Cwd: c.String("cwd"),
				Env: c.StringSlice("env"), User: c.String("user"), AdditionalGID: c.IntSlice("additional-gids"),
				NoNewPrivs: c.Bool("no-new-privs"),
			}
			status, err := container.Exec(c.Context, o)
			return exitStatus(status, err)
		},
	}
}

// execRelayCommand is the hidden host stand-in of a detached exec.
func execRelayCommand() *cli.Command {
	return &cli.Command{
		Name:   "exec-relay",
		Hidden: true,
		Action: func(c *cli.Context) error {
			status, err := container.ExecRelay(c.Context, c.String("root"), c.Args().First())
			return exitStatus(status, err)
		},
	}
}

// exitStatus turns a process status into the command's exit.
func exitStatus(status int, err error) error {
	if err != nil {
		return err
	}
	if status != 0 {
		return cli.Exit("", status)
	}
	return nil
}
