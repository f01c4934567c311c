package shim

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/rund-dev/rund/internal/shimapi"
	"github.com/rund-dev/rund/vm"
	"github.com/rund-dev/rund/vm/agent/client"
	"github.com/rund-dev/rund/vm/agent/proto"
	"github.com/rund-dev/rund/vm/template"
)

// templateKey is everything that shapes the sandbox's template.
func templateKey(ctx context.Context, b vm.Backend, cfg vm.Config, lay layout) (template.Key, error) {
	ver, err := b.Version(ctx)
	if err != nil {
		return template.Key{}, err
	}
	k := template.Key{
		Backend: b.Name(), BackendVersion: ver, Cmdline: cfg.Cmdline, VCPUs: cfg.VCPUs,
		MemoryMiB: cfg.MemoryMiB, Accel: cfg.Accel, TBSizeMiB: cfg.TBSizeMiB,
		Devices: lay.key(),
	}
	if k.Kernel, err = template.IdentifyFile(cfg.Kernel); err != nil {
		return k, err
	}
	if k.Initrd, err = template.IdentifyFile(cfg.Initrd); err != nil {
		return k, err
	}
	return k, nil
}

// BuildTemplate boots a template VM with placeholder disks, warms it (the
// agent loads its modules, mounts the root layers and runs a process once),
// then pauses it and saves its device state into dir. Its RAM is memPath,
// mapped shared, so the file holds the guest's memory afterwards.
func BuildTemplate(ctx context.Context, b vm.Backend, cfg vm.Config, lay layout, memPath, dir string) error {
	ph := filepath.Join(dir, "placeholders")
	if err := os.MkdirAll(ph, 0o700); err != nil {
		return err
	}
	defer os.RemoveAll(ph)
	ro := filepath.Join(ph, "ro.img")
	empty := filepath.Join(ph, "empty")
	os.Mkdir(empty, 0o755)
	if out, err := exec.CommandContext(ctx, "mkfs.erofs", ro, empty).CombinedOutput(); err != nil {
		return fmt.Errorf("making read-only placeholder: %w: %s", err, out)
	}
	if err := os.Truncate(ro, lay.roSize()); err != nil {
		return fmt.Errorf("sizing read-only placeholder: %w", err)
	}
	cfg.Disks, cfg.Pmems, cfg.Files, cfg.Shares = nil, nil, nil, nil
	rw := filepath.Join(ph, "rw.img")
	if lay.writableSize > 0 {
		if err := os.WriteFile(rw, nil, 0o600); err != nil {
			return err
		}
		if err := os.Truncate(rw, lay.writableSize); err != nil {
			return err
		}
		if out, err := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", rw).CombinedOutput(); err != nil {
			return fmt.Errorf("making writable placeholder: %w: %s", err, out)
		}
	}
	lay.attach(&cfg, ro, rw)
	lay.attachShares(&cfg, nil, empty)
	root := lay.root(false)
	cfg.MemPath, cfg.MemShared = memPath, true
	cfg.ConsoleLog = filepath.Join(ph, "console.log")
	// The template VM's sockets get a short private directory of their own.
	vmDir, err := os.MkdirTemp("", "rund-template-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(vmDir)
	cfg.Dir = vmDir
	m, err := b.Start(ctx, cfg)
	if err != nil {
		return fmt.Errorf("booting template vm: %w", err)
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		m.Shutdown(sctx)
	}()
	conn, err := m.Dial(ctx)
	if err != nil {
		return fmt.Errorf("connecting to template agent: %w", err)
	}
	c := client.New(conn)
	defer c.Close()
	if err := c.Hello(ctx, proto.Hello{Version: proto.Version, TimeUnixNano: time.Now().UnixNano()}); err != nil {
		return fmt.Errorf("greeting template agent: %w", err)
	}
	info, err := c.Warmup(ctx, proto.WarmupRequest{Root: root})
	if err != nil {
		return fmt.Errorf("warming template: %w", err)
	}
	logrus.Debugf("template warm-up: %s", info)
	if err := m.Pause(ctx); err != nil {
		return fmt.Errorf("pausing template: %w", err)
	}
	if err := m.Snapshot(ctx, dir); err != nil {
		return fmt.Errorf("saving template: %w", err)
	}
	return nil
}

// ensureTemplate returns the template for cfg, building it when none fits.
func ensureTemplate(ctx context.Context, b vm.Backend, cfg vm.Config, l *shimapi.Launch) (*template.Template, bool, error) {
	store := &template.Store{Dir: l.TemplateDir, MemDir: l.MemDir}
	lay := layoutOf(l)
	key, err := templateKey(ctx, b, cfg, lay)
	if err != nil {
		return nil, false, err
	}
	return store.Ensure(ctx, key, func(ctx context.Context, memPath, dir string) error {
		logrus.Infof("building template %s (once per kernel, initramfs and VM shape)", key.ID())
		return BuildTemplate(ctx, b, cfg, lay, memPath, dir)
	})
}

// EnsureTemplate builds the template a sandbox described by l would use,
// unless it exists. It returns the template's id and whether it was built.
func EnsureTemplate(ctx context.Context, l *shimapi.Launch) (string, bool, error) {
	b, err := backendFor(l)
	if err != nil {
		return "", false, err
	}
	s := &shim{launch: *l}
	cfg, err := s.vmConfig()
	if err != nil {
		return "", false, err
	}
	tpl, built, err := ensureTemplate(ctx, b, cfg, l)
	if err != nil {
		return "", false, err
	}
	return tpl.Manifest.ID, built, nil
}

// restore starts the sandbox as a clone of its template, building the
// template first when none fits. Any failure is returned so the caller can
// fall back to a cold boot.
func (s *shim) restore(ctx context.Context, b vm.Backend, cfg vm.Config) (vm.Machine, string, bool, error) {
	tpl, built, err := ensureTemplate(ctx, b, cfg, &s.launch)
	if err != nil {
		return nil, "", false, err
	}
	id := tpl.Manifest.ID
	cfg.MemPath, cfg.MemShared = tpl.Manifest.MemPath, false
	m, err := b.Restore(ctx, cfg, tpl.Dir)
	if errors.Is(err, vm.ErrBadSnapshot) {
		// Never restore it again: the next create rebuilds it.
		store := &template.Store{Dir: s.launch.TemplateDir, MemDir: s.launch.MemDir}
		store.Remove(ctx, id)
	}
	if err != nil {
		return nil, "", built, fmt.Errorf("restoring template %s: %w", id, err)
	}
	return m, id, built, nil
}
