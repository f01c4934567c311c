package commands

import (
	"encoding/json"
	"fmt"

	"github.com/opencontainers/runtime-spec/specs-go/features"
	"github.com/urfave/cli/v2"

	"github.com/rund-dev/rund/container"
)

func featuresCommand() *cli.Command {
	return &cli.Command{
		Name:  "features",
		Usage: "print what this runtime supports (runtime-spec features.md) as JSON",
		Action: func(c *cli.Context) error {
			b, err := json.MarshalIndent(runtimeFeatures(), "", "    ")
			if err != nil {
				return err
			}
			fmt.Fprintln(c.App.Writer, string(b))
			return nil
		},
	}
}

func runtimeFeatures() features.Features {
	t, f := true, false
	return features.Features{
		OCIVersionMin: "1.0.0",
		OCIVersionMax: container.OCIVersion,
		Hooks:         []string{},
		MountOptions: []string{"ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec",
			"bind", "rbind", "private", "rprivate", "relatime", "noatime", "strictatime"},
		Linux: &features.Linux{
			Namespaces:   []string{"pid", "network", "ipc", "uts", "mount", "cgroup"},
			Capabilities: nil,
			Cgroup:       &features.Cgroup{V1: &t, V2: &t, Systemd: &f, SystemdUser: &f},
			Seccomp:      &features.Seccomp{Enabled: &f},
			Apparmor:     &features.Apparmor{Enabled: &f},
			Selinux:      &features.Selinux{Enabled: &f},
			MountExtensions: &features.MountExtensions{
				IDMap: &features.IDMap{Enabled: &f},
			},
		},
		Annotations: map[string]string{
			"org.opencontainers.runc.checkpoint.enabled": "false",
			"io.github.rund.version":                     version,
			container.AnnotationTemplate:                 "on|off",
			container.AnnotationHypervisor:               "qemu|cloud-hypervisor",
			container.AnnotationRootfs:                   "split|shared",
		},
	}
}
