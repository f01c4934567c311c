package commands

import (
	"encoding/json"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/rund-dev/rund/container"
)

func listCommand() *cli.Command {
	return &cli.Command{
		Name:  "list",
		Usage: "list containers",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "format", Aliases: []string{"f"}, Value: "table", Usage: "table or json"},
			&cli.BoolFlag{Name: "quiet", Aliases: []string{"q"}, Usage: "print ids only"},
		},
		Action: func(c *cli.Context) error {
			all, err := container.List(c.String("root"))
			if err != nil {
				return err
			}
			w := c.App.Writer
			if c.Bool("quiet") {
				for _, s := range all {
					fmt.Fprintln(w, s.ID)
				}
				return nil
			}
			switch c.String("format") {
			case "json":
				if all == nil {
					all = []*container.OCIState{}
				}
				b, err := json.Marshal(all)
				if err != nil {
					return err
				}
				fmt.Fprintln(w, string(b))
			case "table":
				tw := tabwriter.NewWriter(w, 12, 1, 3, ' ', 0)
				fmt.Fprint(tw, "ID\tPID\tSTATUS\tBUNDLE\tCREATED\tOWNER\n")
				for _, s := range all {
					fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\troot\n", s.ID, s.Pid, s.Status, s.Bundle, s.Created.Format(time.RFC3339Nano))
				}
				return tw.Flush()
			default:
				return fmt.Errorf("invalid format %q: want table or json", c.String("format"))
			}
			return nil
		},
	}
}
