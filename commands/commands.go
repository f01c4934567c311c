package commands

import (
	"fmt"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/rund-dev/rund/container"
	"github.com/rund-dev/rund/internal/config"
)

// specVersion is the runtime-spec version rund implements.
const specVersion = container.OCIVersion

func allCommands() []*cli.Command {
	return []*cli.Command{
		createCommand(), startCommand(), stateCommand(), killCommand(), deleteCommand(),
		runCommand(), listCommand(), execCommand(), psCommand(), pauseCommand(), resumeCommand(),
		featuresCommand(), specCommand(), checkCommand(), checkpointCommand(), shimCommand(), execRelayCommand(), templateCommand(), PoolCommand(),
		kernelpatchCommand(),
	}
}

// globals reads the global flags and the configuration file.
func globals(c *cli.Context) (container.Options, error) {
	cfg, err := config.Load(c.String("config"))
	if err != nil {
		return container.Options{}, err
	}
	return container.Options{
		Root: c.String("root"), Config: cfg, ConfigPath: c.String("config"),
		Debug: c.Bool("debug"), LogPath: c.String("log"), LogFormat: c.String("log-format"),
		SystemdCgroup: c.Bool("systemd-cgroup"),
	}, nil
}

// idArg returns the container id, the command's first argument.
func idArg(c *cli.Context) (string, error) {
	id := c.Args().First()
	if id == "" {
		return "", fmt.Errorf("%s: container id is required", c.Command.Name)
	}
	return id, nil
}

// checkArgs rejects a wrong number of arguments.
func checkArgs(c *cli.Context, min, max int) error {
	if n := c.NArg(); n < min || (max >= 0 && n > max) {
		return fmt.Errorf("%s: wrong number of arguments (%d); usage: rund %s %s", c.Command.Name, n, c.Command.Name, c.Command.ArgsUsage)
	}
	return nil
}

func stdout() *os.File { return os.Stdout }
