package shim

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/sirupsen/logrus"

	"github.com/rund-dev/rund/internal/shimapi"
	"github.com/rund-dev/rund/vm"
	"github.com/rund-dev/rund/vm/cloudhypervisor"
	"github.com/rund-dev/rund/vm/qemu"
)

// kernelCmdline builds the guest command line.
func kernelCmdline(extra string) string {
	parts := []string{"console=ttyS0", "quiet", "loglevel=1", "panic=-1", "reboot=t",
		"i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd", "tsc=reliable", "no_timer_check",
		"rcupdate.rcu_expedited=1", "random.trust_cpu=on"}
	if extra != "" {
		parts = append(parts, extra)
	}
	return strings.Join(parts, " ")
}

// backendFor returns the hypervisor backend the launch names.
func backendFor(l *shimapi.Launch) (vm.Backend, error) {
	switch l.Hypervisor {
	case "qemu", "":
		return qemu.New(qemu.Options{Binary: l.VMMBinary}), nil
	case cloudhypervisor.Name:
		b := cloudhypervisor.New(l.VMMBinary)
		if err := b.Check(context.Background(), l.Kernel); err != nil {
			return nil, err
		}
		return b, nil
	default:
		return nil, fmt.Errorf("hypervisor %q: %w", l.Hypervisor, vm.ErrUnavailable)
	}
}

// vmConfig is the sandbox's VM: the same devices whether cold-booted or
// restored from a template, so either path yields the same guest.
func (s *shim) vmConfig() (vm.Config, error) {
	l := &s.launch
	accel := l.Accel
	if accel == "" || accel == "auto" {
		accel, _ = qemu.DetectAccel()
	}
	cfg := vm.Config{
		Name: l.ID, Dir: s.vmDir, Kernel: l.Kernel, Initrd: l.Initrd,
		Cmdline: kernelCmdline(l.Cmdline), VCPUs: l.VCPUs, MemoryMiB: l.MemoryMiB,
		Accel: accel, TBSizeMiB: l.TBSizeMiB,
		ConsoleLog: filepath.Join(l.StateDir, shimapi.ConsoleFile),
	}
	lay := layoutOf(l)
	if s.vmDir == "" {
		// No sandbox (`rund template build`): the template build
		// attaches placeholders of its own.
		return cfg, nil
	}
	if l.HasWritable {
		img := cfg.AddFile(os.NewFile(shimapi.ImageFd, "image"))
		rw := cfg.AddFile(os.NewFile(shimapi.WritableFd, "writable"))
		lay.attach(&cfg, img, rw)
		r := lay.root(l.Create.Root.Readonly)
		// A shared root keeps its tag: the devices are there (the
		// template has them) but the guest mounts the share instead.
		r.SharedTag, r.SharedType = l.Create.Root.SharedTag, l.Create.Root.SharedType
		l.Create.Root = r
	}
	empty := filepath.Join(s.vmDir, "empty")
	if err := os.MkdirAll(empty, 0o555); err != nil {
		return cfg, fmt.Errorf("making the empty share: %w", err)
	}
	lay.attachShares(&cfg, l.Shares, empty)
	return cfg, nil
}

// boot starts the sandbox's VM: a clone of its template when templates are
// on, falling back to a cold boot (with a warning) when that fails.
func (s *shim) boot(ctx context.Context) (vm.Machine, shimapi.Ready, error) {
	var r shimapi.Ready
	b, err := backendFor(&s.launch)
	if err != nil {
		return nil, r, err
	}
	cfg, err := s.vmConfig()
	if err != nil {
		return nil, r, err
	}
	if s.launch.TemplateDir != "" {
		m, id, built, err := s.restore(ctx, b, cfg)
		r.TemplateBuilt = built
		if err == nil {
			r.Template = id
			return m, r, nil
		}
		r.Warning = fmt.Sprintf("template unusable, cold-booting: %v", err)
		logrus.Warnf("sandbox %s: %s", s.launch.ID, r.Warning)
	} else {
		logrus.Debugf("sandbox %s: templates off, cold-booting", s.launch.ID)
	}
	m, err := b.Start(ctx, cfg)
	if err != nil {
		return nil, r, fmt.Errorf("booting vm: %w", err)
	}
	return m, r, nil
}
