package cloudhypervisor

// End-to-end tests against a real cloud-hypervisor. They run only where the
// binary is on PATH and /dev/kvm can run a stock guest, and skip elsewhere
// saying why (Backend.Check's reasons).
//
// Guest: RUND_CH_KERNEL and RUND_CH_INITRD (default: the guest that `make
// guest` builds into bin/guest). With RUND_CH_AGENT=1 the guest is taken to
// run rund's agent on vsock port AgentPort, and the tests also open the
// channel.

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rund-dev/rund/vm"

	"github.com/rund-dev/rund/internal/config"
)

func e2eConfig(t *testing.T) vm.Config {
	t.Helper()
	kernel := os.Getenv("RUND_CH_KERNEL")
	initrd := os.Getenv("RUND_CH_INITRD")
	if kernel == "" {
		kernel, initrd, _ = config.Guest([]string{"../../bin/guest"}, "auto")
		kernel, _ = filepath.Abs(kernel)
		initrd, _ = filepath.Abs(initrd)
	}
	b := New("")
	if err := b.Check(context.Background(), kernel); err != nil {
		t.Skipf("no usable Cloud Hypervisor here: %v", err)
	}
	if _, err := os.Stat(initrd); err != nil {
		t.Skipf("no guest initramfs: %v (set RUND_CH_INITRD)", err)
	}
	return vm.Config{
		Name: "e2e", Dir: filepath.Join(shortDir(t), "vm"), Kernel: kernel, Initrd: initrd,
		Cmdline: "console=ttyS0 panic=1 quiet", VCPUs: 1, MemoryMiB: 256, Accel: "kvm",
	}
}

func e2eDial(t *testing.T, m vm.Machine) {
	t.Helper()
	if os.Getenv("RUND_CH_AGENT") != "1" {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := m.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
}

func TestE2EBootAndShutdown(t *testing.T) {
	cfg := e2eConfig(t)
	cfg.ConsoleLog = filepath.Join(cfg.Dir, "console.log")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	b := New("")
	m, err := b.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.(*Machine).Kill()
	info, err := m.(*Machine).API().Info(ctx)
	if err != nil || info.State != StateRunning {
		t.Fatalf("got %+v, %v, want Running", info.State, err)
	}
	e2eDial(t, m)
	if err := m.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if err := m.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	if err := m.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestE2ETemplateClone(t *testing.T) {
	cfg := e2eConfig(t)
	mem, err := os.CreateTemp("/dev/shm", "rund-ch-e2e")
	if err != nil {
		t.Skipf("no tmpfs for the template's memory: %v", err)
	}
	defer os.Remove(mem.Name())
	if err := mem.Truncate(int64(cfg.MemoryMiB) << 20); err != nil {
		t.Fatal(err)
	}
	mem.Close()
	cfg.MemPath, cfg.MemShared = mem.Name(), true
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	b := New("")
	tm, err := b.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer tm.(*Machine).Kill()
	e2eDial(t, tm)
	snap := filepath.Join(filepath.Dir(cfg.Dir), "snap")
	if err := os.Mkdir(snap, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := tm.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if err := tm.Snapshot(ctx, snap); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(snap, snapMemory)); err == nil {
		t.Error("snapshot wrote memory-ranges for a shared file-backed zone")
	}
	if err := tm.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		clone := cfg
		clone.Name = "clone"
		clone.Dir = filepath.Join(shortDir(t), "vm")
		clone.MemShared = false
		start := time.Now()
		m, err := b.Restore(ctx, clone, snap)
		if err != nil {
			t.Fatalf("clone %d: %v", i, err)
		}
		t.Logf("clone %d restored and resumed in %v", i, time.Since(start))
		info, err := m.(*Machine).API().Info(ctx)
		if err != nil || info.State != StateRunning || info.Config.Memory.Zones[0].Shared {
			t.Errorf("clone %d: got %+v, %v, want Running with a private zone", i, info, err)
		}
		e2eDial(t, m)
		if err := m.Shutdown(ctx); err != nil {
			t.Error(err)
		}
	}
}
