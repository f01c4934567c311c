package commands

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/rund-dev/rund/rootfs"
	"github.com/rund-dev/rund/vm/cloudhypervisor"
	"github.com/rund-dev/rund/vm/qemu"
)

// checkItem is one line of `rund check`.
type checkItem struct {
	What   string `json:"what"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
}

func checkCommand() *cli.Command {
	return &cli.Command{
		Name:  "check",
		Usage: "report what this host can do for rund",
		Flags: []cli.Flag{&cli.StringFlag{Name: "format", Aliases: []string{"f"}, Value: "table", Usage: "table or json"}},
		Action: func(c *cli.Context) error {
			g, err := globals(c)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(c.Context, 20*time.Second)
			defer cancel()
			cfg := g.Config
			var items []checkItem
			add := func(what string, ok bool, format string, a ...any) {
				items = append(items, checkItem{What: what, OK: ok, Detail: fmt.Sprintf(format, a...)})
			}
			accel, why := qemu.DetectAccel()
			add("accelerator", true, "%s: %s", accel, why)
			qb := qemu.New(qemu.Options{Binary: cfg.QEMUBinary})
			if v, err := qb.Version(ctx); err != nil {
				add("qemu", false, "%v", err)
			} else {
				add("qemu", true, "%s", v)
			}
			chb := cloudhypervisor.New(cfg.CloudHypervisorBinary)
			if err := chb.Check(ctx, cfg.Kernel); err != nil {
				add("cloud-hypervisor", false, "%v", err)
			} else {
				add("cloud-hypervisor", true, "usable")
			}
			flavour := map[string]string{"rund": "rund's streamlined kernel", "cloud": "Debian's cloud kernel (build rund's with `make kernel`)"}[cfg.GuestKernel]
			add("guest flavour", true, "%s", flavour)
			for _, f := range []struct{ what, path string }{{"guest kernel", cfg.Kernel}, {"guest initramfs", cfg.Initrd}} {
				if fi, err := os.Stat(f.path); err != nil {
					add(f.what, false, "%s missing (run `make install`)", f.path)
				} else {
					add(f.what, true, "%s (%d bytes)", f.path, fi.Size())
				}
			}
			add("cgroups", true, "%s", cgroupVersion())
			if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
				add("data directory", false, "%s: %v", cfg.DataDir, err)
			} else if ok, err := rootfs.SupportsReflink(cfg.DataDir); err != nil {
				add("reflink", false, "%s: %v", cfg.DataDir, err)
			} else if ok {
				add("reflink", true, "%s supports FICLONE: writable layers are instant", cfg.DataDir)
			} else {
				add("reflink", false, "%s has no reflink: writable layers fall back to sparse copies (put it on XFS with reflink=1, see README)", cfg.DataDir)
			}
			for _, tool := range []string{"mkfs.erofs", "mkfs.ext4"} {
				if p, err := exec.LookPath(tool); err != nil {
					add(tool, false, "not found (apt-get install erofs-utils e2fsprogs)")
				} else {
					add(tool, true, "%s", p)
				}
			}
			if c.String("format") == "json" {
				b, _ := json.MarshalIndent(items, "", "  ")
				fmt.Fprintln(c.App.Writer, string(b))
				return nil
			}
			tw := tabwriter.NewWriter(c.App.Writer, 8, 1, 2, ' ', 0)
			for _, it := range items {
				mark := "ok"
				if !it.OK {
					mark = "NO"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\n", it.What, mark, it.Detail)
			}
			return tw.Flush()
		},
	}
}

// cgroupVersion describes the host's cgroup layout.
func cgroupVersion() string {
	var st unix.Statfs_t
	if unix.Statfs("/sys/fs/cgroup", &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC {
		return "v2 (unified)"
	}
	if _, err := os.Stat(filepath.Join("/sys/fs/cgroup", "unified")); err == nil {
		return "v1 (hybrid: controllers on v1, an empty v2 at /sys/fs/cgroup/unified)"
	}
	return "v1"
}
