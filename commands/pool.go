package commands

import (
	"encoding/json"
	"fmt"
	"text/tabwriter"

	"github.com/urfave/cli/v2"

	"github.com/rund-dev/rund/cgpool"
)

// PoolCommand is `rund pool`: admin of the pre-created cgroup pools.
func PoolCommand() *cli.Command {
	parent := &cli.StringFlag{Name: "parent", Value: cgpool.DefaultParent, Usage: "parent cgroup of the pool"}
	cgroupRoot := &cli.StringFlag{Name: "cgroup-root", Value: cgpool.DefaultRoot, Usage: "cgroup filesystem root", Hidden: true}
	return &cli.Command{
		Name:  "pool",
		Usage: "manage the pools of pre-created cgroups",
		Subcommands: []*cli.Command{
			{
				Name:  "init",
				Usage: "pre-create a pool's cgroups",
				Flags: []cli.Flag{parent, cgroupRoot, &cli.IntFlag{Name: "size", Value: 32, Usage: "number of slots"}},
				Action: func(c *cli.Context) error {
					return withPool(c, func(p *cgpool.Pool) error { return p.Init(c.Int("size")) })
				},
			},
			{
				Name:  "status",
				Usage: "show a pool's slots: idle, busy, leaked",
				Flags: []cli.Flag{parent, cgroupRoot, &cli.StringFlag{Name: "format", Aliases: []string{"f"}, Value: "table", Usage: "table or json"}},
				Action: func(c *cli.Context) error {
					return withPool(c, func(p *cgpool.Pool) error {
						st, err := p.Status()
						if err != nil {
							return err
						}
						return printPoolStatus(c, st)
					})
				},
			},
			{
				Name:  "destroy",
				Usage: "kill everything in a pool's cgroups and remove them",
				Flags: []cli.Flag{parent, cgroupRoot, &cli.BoolFlag{Name: "force", Usage: "also remove slots leased to running sandboxes"}},
				Action: func(c *cli.Context) error {
					return withPool(c, func(p *cgpool.Pool) error { return p.Destroy(c.Bool("force")) })
				},
			},
		},
	}
}

func withPool(c *cli.Context, fn func(*cgpool.Pool) error) error {
	p, err := cgpool.Open(cgpool.Options{
		Root:     c.String("cgroup-root"),
		Parent:   c.String("parent"),
		StateDir: cgpool.DefaultStateDir, // one record per host, whatever --root
	})
	if err != nil {
		return err
	}
	defer p.Close()
	return fn(p)
}

func printPoolStatus(c *cli.Context, st cgpool.Status) error {
	switch f := c.String("format"); f {
	case "json":
		return json.NewEncoder(c.App.Writer).Encode(st)
	case "table":
	default:
		return fmt.Errorf("invalid format %q: want table or json", f)
	}
	fmt.Fprintf(c.App.Writer, "pool %s (cgroup %s): %d idle, %d busy, %d leaked\n", st.Parent, st.Mode, st.Idle, st.Busy, st.Leaked)
	w := tabwriter.NewWriter(c.App.Writer, 0, 8, 2, ' ', 0)
	fmt.Fprintln(w, "SLOT\tSTATE\tNAME\tOWNER\tDIR")
	for _, s := range st.Slots {
		owner := "-"
		if s.Owner > 0 {
			owner = fmt.Sprint(s.Owner)
		}
		name := s.Name
		if name == "" {
			name = "-"
		}
		fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\n", s.ID, s.State, name, owner, s.Dir)
	}
	return w.Flush()
}
