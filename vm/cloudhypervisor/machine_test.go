package cloudhypervisor

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rund-dev/rund/vm"
)

// testConfig is a vm.Config whose files exist, in a short directory.
func testConfig(t *testing.T) vm.Config {
	t.Helper()
	dir := shortDir(t)
	kernel := filepath.Join(dir, "vmlinux")
	initrd := filepath.Join(dir, "initrd")
	for _, f := range []string{kernel, initrd} {
		if err := os.WriteFile(f, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return vm.Config{
		Name: "c1", Dir: filepath.Join(dir, "vm"), Kernel: kernel, Initrd: initrd,
		Cmdline: "console=ttyS0 quiet", VCPUs: 1, MemoryMiB: 128, Accel: "kvm",
	}
}

func startMachine(t *testing.T, b *Backend, cfg vm.Config) *Machine {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err := b.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.(*Machine).Kill() })
	return m.(*Machine)
}

// collapse drops repeated pings (readiness polling may ping more than once).
func collapse(seq []string) []string {
	var out []string
	for _, s := range seq {
		if s == "GET vmm.ping" && len(out) > 0 && out[len(out)-1] == s {
			continue
		}
		out = append(out, s)
	}
	return out
}

// TestContainerLifecycle is a whole create → start → kill → delete as the
// shim drives the VMM: start and boot it, open the agent channel, exchange
// bytes (start/kill travel on the channel), then shut the VMM down.
func TestContainerLifecycle(t *testing.T) {
	cfg := testConfig(t)
	cfg.ConsoleLog = filepath.Join(cfg.Dir, "console.log")
	rw := emptyFile(t, filepath.Join(filepath.Dir(cfg.Dir), "rw.img"), 4<<20)
	f, err := os.OpenFile(rw, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cfg.Disks = []vm.Disk{{ID: "rw", Path: cfg.AddFile(f)}}
	ro := emptyFile(t, filepath.Join(filepath.Dir(cfg.Dir), "ro.erofs"), 2<<20)
	cfg.Pmems = []vm.Pmem{{ID: "ro", Path: ro, Size: 2 << 20, ReadOnly: true}}
	m := startMachine(t, fakeBackend(t), cfg)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := m.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Write([]byte("hello agent")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 11)
	if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != "hello agent" {
		t.Fatalf("got %q, %v, want the echo", buf, err)
	}
	conn.Close()
	if err := m.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if err := m.Wait(); err != nil {
		t.Errorf("wait: %v", err)
	}

	reqs := processRequests(t, cfg.Dir)
	want := []string{"GET vmm.ping", "PUT vm.create", "PUT vm.boot", "PUT vmm.shutdown"}
	if got := collapse(sequence(reqs)); !reflect.DeepEqual(got, want) {
		t.Errorf("got requests %q, want %q", got, want)
	}
	wantCreate := `{"payload":{"kernel":"` + cfg.Kernel + `","initramfs":"` + cfg.Initrd + `","cmdline":"console=ttyS0 quiet"},` +
		`"cpus":{"boot_vcpus":1,"max_vcpus":1},"memory":{"size":134217728},` +
		`"disks":[{"path":"/proc/self/fd/3","id":"rw","serial":"rw","image_type":"Raw"}],` +
		`"pmem":[{"file":"` + ro + `","size":2097152,"discard_writes":true,"id":"ro"}],` +
		`"vsock":{"cid":3,"socket":"` + cfg.Dir + `/vsock.sock","id":"vsock0"},` +
		`"serial":{"mode":"File","file":"` + cfg.ConsoleLog + `"},"console":{"mode":"Off"}}`
	for _, r := range reqs {
		if r.Endpoint == "vm.create" && r.Body != wantCreate {
			t.Errorf("vm.create body:\n got %s\nwant %s", r.Body, wantCreate)
		}
	}
	if _, err := os.Stat(filepath.Join(cfg.Dir, apiSocketName)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("api socket left behind: %v", err)
	}
	if b, err := os.ReadFile(cfg.ConsoleLog); err != nil || !strings.Contains(string(b), "console=ttyS0") {
		t.Errorf("console log %q, %v", b, err)
	}
}

func TestStartMemoryFile(t *testing.T) {
	cfg := testConfig(t)
	cfg.MemPath = emptyFile(t, filepath.Join(filepath.Dir(cfg.Dir), "mem"), 128<<20)
	cfg.MemShared = true
	m := startMachine(t, fakeBackend(t), cfg)
	info, err := m.API().Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := &MemoryConfig{Size: 0, Shared: true, Zones: []MemoryZoneConfig{{ID: "mem0", Size: 128 << 20, File: cfg.MemPath, Shared: true}}}
	if !reflect.DeepEqual(info.Config.Memory, want) {
		t.Errorf("got memory %+v, want %+v", info.Config.Memory, want)
	}
	if info.Config.Serial.Mode != ConsoleNull {
		t.Errorf("got serial %+v, want Null without a console log", info.Config.Serial)
	}
}

func TestStartErrors(t *testing.T) {
	tests := []struct {
		name    string
		env     []string
		timeout time.Duration
		wantIs  error
		want    string // in the message
	}{
		{"vmm exits at start", []string{"FAKE_CH_EXIT_AT_START=Error: KVM_CREATE_VM: Permission denied"}, 5 * time.Second,
			vm.ErrExited, "KVM_CREATE_VM: Permission denied"},
		{"api socket never appears", []string{"FAKE_CH_NO_SOCKET=1"}, 300 * time.Millisecond,
			context.DeadlineExceeded, "never appeared"},
		{"vmm dies during boot", []string{"FAKE_CH_DIE_ON=vm.boot"}, 5 * time.Second,
			vm.ErrExited, "exit status 1"},
		{"boot answers 500", []string{"FAKE_CH_FAIL_ON=vm.boot"}, 5 * time.Second,
			nil, "cloud-hypervisor PUT vm.boot: 500 Internal Server Error: Error from API: injected failure of vm.boot"},
		{"create answers 400", []string{"FAKE_CH_FAIL_ON=vm.create", "FAKE_CH_FAIL_STATUS=400"}, 5 * time.Second,
			nil, "400 Bad Request"},
		{"boot times out", []string{"FAKE_CH_HANG_ON=vm.boot"}, 500 * time.Millisecond,
			context.DeadlineExceeded, "vm.boot"},
		{"stale api socket is removed first", nil, 5 * time.Second, nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig(t)
			if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
				t.Fatal(err)
			}
			// A stale socket file from an earlier VMM must not stop
			// this one from binding.
			emptyFile(t, filepath.Join(cfg.Dir, apiSocketName), 0)
			ctx, cancel := context.WithTimeout(context.Background(), tt.timeout)
			defer cancel()
			start := time.Now()
			m, err := fakeBackend(t, tt.env...).Start(ctx, cfg)
			if tt.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				_ = m.Shutdown(context.Background())
				return
			}
			if err == nil {
				_ = m.(*Machine).Kill()
				t.Fatal("start succeeded")
			}
			t.Logf("error: %v", err)
			if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
				t.Errorf("got %v, want it to match %v", err, tt.wantIs)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("got %q, want it to contain %q", err, tt.want)
			}
			if d := time.Since(start); d > tt.timeout+2*time.Second {
				t.Errorf("took %v", d)
			}
			// The VMM was killed: nothing answers on its socket.
			if _, err := NewClient(filepath.Join(cfg.Dir, apiSocketName)).Ping(context.Background()); err == nil {
				t.Error("the failed VMM still answers")
			}
		})
	}
}

func TestConfigErrorsStartNothing(t *testing.T) {
	cfg := testConfig(t)
	cfg.Accel = "tcg"
	_, err := fakeBackend(t).Start(context.Background(), cfg)
	if !errors.Is(err, vm.ErrUnavailable) {
		t.Fatalf("got %v, want vm.ErrUnavailable", err)
	}
	if _, err := os.Stat(cfg.Dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("runtime directory was created for a rejected config")
	}
}

func TestMachineCallsAfterCrash(t *testing.T) {
	m := startMachine(t, fakeBackend(t), testConfig(t))
	if err := syscall.Kill(m.Pid(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-m.Done()
	err := m.Pause(context.Background())
	if !errors.Is(err, vm.ErrExited) || !strings.Contains(err.Error(), "signal: killed") {
		t.Errorf("pause: got %v, want vm.ErrExited with the exit status", err)
	}
	if _, err := m.Dial(context.Background()); !errors.Is(err, vm.ErrExited) {
		t.Errorf("dial: got %v, want vm.ErrExited", err)
	}
	if err := m.Shutdown(context.Background()); err != nil {
		t.Errorf("shutdown of a dead vmm: %v", err)
	}
	if err := m.Wait(); err == nil {
		t.Error("wait: got nil, want the kill status")
	}
}

func TestMachineDiesMidCall(t *testing.T) {
	m := startMachine(t, fakeBackend(t, "FAKE_CH_DIE_ON=vm.pause"), testConfig(t))
	err := m.Pause(context.Background())
	if !errors.Is(err, vm.ErrExited) || !strings.Contains(err.Error(), "exit status 1") {
		t.Fatalf("got %v, want vm.ErrExited with the exit status", err)
	}
}

func TestPauseResumeAndEvents(t *testing.T) {
	m := startMachine(t, fakeBackend(t), testConfig(t))
	ctx := context.Background()
	if err := m.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if err := m.Pause(ctx); err == nil {
		t.Error("pausing a paused VM succeeded")
	}
	if err := m.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	if err := m.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	events, err := m.Events()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range events {
		got = append(got, e.Source+" "+e.Event)
		if e.Timestamp.Secs == 0 {
			t.Errorf("event %+v has no timestamp", e)
		}
	}
	want := []string{"vmm starting", "vm booted", "vm paused", "vm resumed", "vmm shutdown"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got events %q, want %q", got, want)
	}
}

func TestGuestPowerOff(t *testing.T) {
	m := startMachine(t, fakeBackend(t), testConfig(t))
	if err := syscall.Kill(m.Pid(), syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	if err := m.Wait(); err != nil {
		b, _ := os.ReadFile(m.paths.stderr)
		t.Errorf("got %v, want a clean exit after guest power-off; vmm output:\n%s", err, b)
	}
}

func TestShutdownKillsAHungVMM(t *testing.T) {
	m := startMachine(t, fakeBackend(t, "FAKE_CH_HANG_ON=vmm.shutdown"), testConfig(t))
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	err := m.Shutdown(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("got %v, want the deadline that forced a kill", err)
	}
	select {
	case <-m.Done():
	default:
		t.Fatal("vmm still running after Shutdown returned")
	}
}

func TestDial(t *testing.T) {
	t.Run("retries until the agent listens", func(t *testing.T) {
		m := startMachine(t, fakeBackend(t, "FAKE_CH_GUEST_DELAY=300ms"), testConfig(t))
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		conn, err := m.Dial(ctx)
		if err != nil {
			t.Fatal(err)
		}
		conn.Close()
	})
	t.Run("gives up at the deadline", func(t *testing.T) {
		m := startMachine(t, fakeBackend(t, "FAKE_CH_GUEST_PORTS=9"), testConfig(t))
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		_, err := m.Dial(ctx)
		if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "EOF") {
			t.Fatalf("got %v, want the deadline and the last EOF", err)
		}
	})
	t.Run("stops when the vmm exits", func(t *testing.T) {
		m := startMachine(t, fakeBackend(t, "FAKE_CH_GUEST_PORTS=9"), testConfig(t))
		go func() {
			time.Sleep(100 * time.Millisecond)
			_ = syscall.Kill(m.Pid(), syscall.SIGKILL)
		}()
		_, err := m.Dial(context.Background())
		if !errors.Is(err, vm.ErrExited) {
			t.Fatalf("got %v, want vm.ErrExited", err)
		}
	})
}

func TestVersion(t *testing.T) {
	v, err := fakeBackend(t, "FAKE_CH_VERSION=42.0.0").Version(context.Background())
	if err != nil || v != "cloud-hypervisor v42.0.0" {
		t.Fatalf("got %q, %v", v, err)
	}
	if _, err := New(filepath.Join(shortDir(t), "none")).Version(context.Background()); err == nil {
		t.Error("version of a missing binary succeeded")
	}
}

// TestHotplugThroughMachine uses the typed calls on a booted machine.
func TestHotplugThroughMachine(t *testing.T) {
	cfg := testConfig(t)
	m := startMachine(t, fakeBackend(t), cfg)
	ctx := context.Background()
	disk := emptyFile(t, filepath.Join(filepath.Dir(cfg.Dir), "extra.img"), 1<<20)
	info, err := m.API().AddDisk(ctx, DiskConfig{Path: disk, ID: "extra", Serial: "extra"})
	if err != nil || info.ID != "extra" {
		t.Fatalf("got %+v, %v", info, err)
	}
	if err := m.API().RemoveDevice(ctx, "extra"); err != nil {
		t.Fatal(err)
	}
	vi, err := m.API().Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(vi.Config.Disks) != 0 {
		t.Errorf("disk still present after the guest acked the eject: %+v", vi.Config.Disks)
	}
	var last recorded
	for _, r := range processRequests(t, cfg.Dir) {
		if r.Endpoint == "vm.add-disk" {
			last = r
		}
	}
	var body map[string]any
	if err := json.Unmarshal([]byte(last.Body), &body); err != nil || body["path"] != disk {
		t.Errorf("add-disk body %s", last.Body)
	}
}
