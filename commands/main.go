// Package commands is rund's command line: runc's verbs and flags, plus
// rund's own (check, template, pool). Each verb parses its flags into an
// options struct and calls one function of container (or of an admin
// package); no verb talks to a VMM or writes state itself.
package commands

import (
	"errors"
	"fmt"
	"os"

	"github.com/sirupsen/logrus"
	"github.com/urfave/cli/v2"
)

// version is set at build time (-ldflags -X).
var version = "dev"

// Main runs the CLI and returns the process exit code.
func Main(args []string) int {
	app := newApp()
	if err := app.Run(args); err != nil {
		var ec cli.ExitCoder
		if errors.As(err, &ec) {
			if msg := ec.Error(); msg != "" {
				reportError(msg)
			}
			return ec.ExitCode()
		}
		reportError(err.Error())
		return 1
	}
	return 0
}

// logToFile is set when --log sends the log to a file; errors then go to the
// file and, as runc does, to stderr too, where conmon reads them.
var logToFile bool

func reportError(msg string) {
	logrus.Error(msg)
	if logToFile {
		fmt.Fprintln(os.Stderr, msg)
	}
}

func newApp() *cli.App {
	app := &cli.App{
		Name:                 "rund",
		Usage:                "an OCI runtime that runs each container in its own microVM",
		Version:              version,
		HideHelpCommand:      true,
		EnableBashCompletion: false,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "root", Value: "/run/rund", Usage: "directory for container state (tmpfs recommended)"},
			&cli.StringFlag{Name: "log", Usage: "log file (default: stderr)"},
			&cli.StringFlag{Name: "log-format", Value: "text", Usage: "log format: text or json"},
			&cli.BoolFlag{Name: "debug", Usage: "debug logging"},
			&cli.BoolFlag{Name: "systemd-cgroup", Usage: "read cgroupsPath as slice:prefix:name"},
			&cli.StringFlag{Name: "rootless", Value: "auto", Usage: "accepted for runc compatibility; rund runs as root"},
			&cli.StringFlag{Name: "config", Value: "/etc/rund/config.toml", Usage: "rund configuration file", EnvVars: []string{"RUND_CONFIG"}},
		},
		Before:   setupLogging,
		Commands: allCommands(),
	}
	cli.VersionPrinter = printVersion
	app.ExitErrHandler = func(*cli.Context, error) {}
	return app
}

func printVersion(c *cli.Context) {
	fmt.Fprintf(c.App.Writer, "rund version %s\nspec: %s\n", version, specVersion)
}

func setupLogging(c *cli.Context) error {
	logrus.SetOutput(os.Stderr)
	if c.Bool("debug") {
		logrus.SetLevel(logrus.DebugLevel)
	}
	switch f := c.String("log-format"); f {
	case "text", "":
		logrus.SetFormatter(&logrus.TextFormatter{DisableColors: true, FullTimestamp: true})
	case "json":
		logrus.SetFormatter(&logrus.JSONFormatter{})
	default:
		return fmt.Errorf("invalid log-format %q: want text or json", f)
	}
	if p := c.String("log"); p != "" {
		f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_APPEND|os.O_SYNC, 0o644)
		if err != nil {
			return fmt.Errorf("opening log file: %w", err)
		}
		logrus.SetOutput(f)
		logToFile = true
	}
	return nil
}
