package commands

import (
	"encoding/json"
	"fmt"
	"text/tabwriter"

	"github.com/urfave/cli/v2"

	"github.com/rund-dev/rund/container"
)

func kernelpatchCommand() *cli.Command {
	return &cli.Command{
		Name:  "kernelpatch",
		Usage: "inspect how a sandbox's guest kernel diverges from its template",
		Subcommands: []*cli.Command{{
			Name:      "report",
			Usage:     "count the guest pages the sandbox's VMM holds as private copies of the template, by region",
			ArgsUsage: "<container-id>",
			Flags:     []cli.Flag{&cli.StringFlag{Name: "format", Aliases: []string{"f"}, Value: "table", Usage: "table or json"}},
			Action: func(c *cli.Context) error {
				if err := checkArgs(c, 1, 1); err != nil {
					return err
				}
				id, err := idArg(c)
				if err != nil {
					return err
				}
				format := c.String("format")
				if format != "table" && format != "json" {
					return fmt.Errorf("--format %q: want table or json", format)
				}
				g, err := globals(c)
				if err != nil {
					return err
				}
				rows, err := container.KernelPatchReport(c.Context, g, id)
				if err != nil {
					return err
				}
				if format == "json" {
					b, _ := json.MarshalIndent(rows, "", "  ")
					fmt.Fprintln(c.App.Writer, string(b))
					return nil
				}
				tw := tabwriter.NewWriter(c.App.Writer, 8, 1, 2, ' ', tabwriter.AlignRight)
				fmt.Fprintln(tw, "REGION\tPAGES\tDIRTY\tSHARED\t")
				var p, d, s int
				for _, r := range rows {
					fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t\n", r.Region, r.Pages, r.DirtyPages, r.SharedPages)
					p, d, s = p+r.Pages, d+r.DirtyPages, s+r.SharedPages
				}
				fmt.Fprintf(tw, "total\t%d\t%d\t%d\t\n", p, d, s)
				return tw.Flush()
			},
		}},
	}
}
