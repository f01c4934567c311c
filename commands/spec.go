package commands

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/urfave/cli/v2"

	"github.com/rund-dev/rund/container"
)

func specCommand() *cli.Command {
	return &cli.Command{
		Name:  "spec",
		Usage: "write a starter config.json into the bundle directory",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "bundle", Aliases: []string{"b"}, Value: ".", Usage: "bundle directory"},
			&cli.BoolFlag{Name: "rootless", Usage: "accepted; same spec"},
		},
		Action: func(c *cli.Context) error {
			p := filepath.Join(c.String("bundle"), "config.json")
			if _, err := os.Stat(p); err == nil {
				return fmt.Errorf("file %s exists: remove it first", p)
			} else if !errors.Is(err, fs.ErrNotExist) {
				return err
			}
			b, err := json.MarshalIndent(container.ExampleSpec(), "", "\t")
			if err != nil {
				return err
			}
			return os.WriteFile(p, append(b, '\n'), 0o644)
		},
	}
}
