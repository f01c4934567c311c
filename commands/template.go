package commands

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/rund-dev/rund/container"
	"github.com/rund-dev/rund/shim"
	"github.com/rund-dev/rund/vm/template"
)

func templateStore(c *cli.Context) (*template.Store, container.Options, error) {
	g, err := globals(c)
	if err != nil {
		return nil, g, err
	}
	return &template.Store{Dir: filepath.Join(g.Config.DataDir, "templates"), MemDir: g.Config.MemDir}, g, nil
}

func templateCommand() *cli.Command {
	return &cli.Command{
		Name:  "template",
		Usage: "manage microVM snapshot templates",
		Subcommands: []*cli.Command{
			{
				Name:  "build",
				Usage: "build the template sandboxes use with this configuration (if missing or stale)",
				Action: func(c *cli.Context) error {
					g, err := globals(c)
					if err != nil {
						return err
					}
					g.Config.Templates = "on"
					l := container.BaseLaunch(g, "template-build")
					start := time.Now()
					id, built, err := shim.EnsureTemplate(c.Context, l)
					if err != nil {
						return err
					}
					if built {
						fmt.Fprintf(c.App.Writer, "built template %s in %.1fs\n", id, time.Since(start).Seconds())
					} else {
						fmt.Fprintf(c.App.Writer, "template %s is up to date\n", id)
					}
					return nil
				},
			},
			{
				Name:  "list",
				Usage: "list templates",
				Flags: []cli.Flag{&cli.StringFlag{Name: "format", Aliases: []string{"f"}, Value: "table"}},
				Action: func(c *cli.Context) error {
					s, _, err := templateStore(c)
					if err != nil {
						return err
					}
					all, err := s.List()
					if err != nil {
						return err
					}
					if c.String("format") == "json" {
						b, _ := json.MarshalIndent(all, "", "  ")
						fmt.Fprintln(c.App.Writer, string(b))
						return nil
					}
					tw := tabwriter.NewWriter(c.App.Writer, 8, 1, 2, ' ', 0)
					fmt.Fprintln(tw, "ID\tBACKEND\tVCPUS\tMEMORY\tCREATED\tBUILD")
					for _, m := range all {
						fmt.Fprintf(tw, "%s\t%s\t%d\t%dMiB\t%s\t%.1fs\n", m.ID, m.Key.Backend, m.Key.VCPUs, m.Key.MemoryMiB, m.Created.Format(time.RFC3339), m.BuildSeconds)
					}
					return tw.Flush()
				},
			},
			{
				Name:      "rm",
				Usage:     "remove templates (running sandboxes are not affected)",
				ArgsUsage: "<template-id>... | --all",
				Flags:     []cli.Flag{&cli.BoolFlag{Name: "all", Usage: "remove every template"}},
				Action: func(c *cli.Context) error {
					s, _, err := templateStore(c)
					if err != nil {
						return err
					}
					ids := c.Args().Slice()
					if c.Bool("all") {
						all, err := s.List()
						if err != nil {
							return err
						}
						for _, m := range all {
							ids = append(ids, m.ID)
						}
					}
					for _, id := range ids {
						if err := s.Remove(c.Context, id); err != nil {
							return err
						}
					}
					return nil
				},
			},
		},
	}
}
