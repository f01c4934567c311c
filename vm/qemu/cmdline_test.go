package qemu

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/rund-dev/rund/vm"
)

func baseConfig() vm.Config {
	return vm.Config{
		Name: "c1", Dir: "/run/rund/c1", Kernel: "/k/vmlinuz", Initrd: "/k/initrd",
		Cmdline: "console=ttyS0 quiet", VCPUs: 2, MemoryMiB: 256, Accel: "tcg",
	}
}

// pairs returns the value following each occurrence of flag.
func pairs(args []string, flag string) []string {
	var v []string
	for i := 0; i+1 < len(args); i++ {
		if args[i] == flag {
			v = append(v, args[i+1])
		}
	}
	return v
}

func TestArgs(t *testing.T) {
	tests := []struct {
		name   string
		launch func() launch
		// want maps a flag to the values it must have, in order; a nil
		// slice means the flag must be absent.
		want map[string][]string
		// has lists flags that must appear; hasNot, flags that must not.
		has, hasNot []string
	}{
		{
			name: "cold boot",
			launch: func() launch {
				return launch{cfg: baseConfig(), firmware: DefaultFirmware, qmpFD: 3,
					agentPath: "/run/rund/c1/agent.sock", kernel: true}
			},
			want: map[string][]string{
				"-machine": {"q35,i8042=off,sata=off,smbus=off,vmport=off,dump-guest-core=off"},
				"-accel":   {"tcg,tb-size=32"},
				"-bios":    {DefaultFirmware},
				"-smp":     {"2"},
				"-m":       {"size=256M"},
				"-kernel":  {"/k/vmlinuz"},
				"-initrd":  {"/k/initrd"},
				"-append":  {"console=ttyS0 quiet"},
				"-chardev": {"null,id=console", "socket,id=qmp,fd=3", "socket,id=agent,path=/run/rund/c1/agent.sock"},
				"-serial":  {"chardev:console"},
				"-mon":     {"chardev=qmp,mode=control"},
				"-device": {"virtio-serial-pci,id=vser0,max_ports=2,bus=pcie.0,addr=0x2",
					"virtserialport,bus=vser0.0,nr=1,chardev=agent,name=rund.agent"},
				"-object":   nil,
				"-incoming": nil,
				"-name":     {"guest=c1"},
			},
			has:    []string{"-nodefaults", "-no-user-config", "-nographic", "-no-reboot"},
			hasNot: []string{"-S"},
		},
		{
			name: "template with console, kvm and seabios",
			launch: func() launch {
				cfg := baseConfig()
				cfg.Accel = "kvm"
				cfg.MemPath, cfg.MemShared = "/dev/shm/t/mem", true
				cfg.ConsoleLog = "/run/rund/c1/console.log"
				return launch{cfg: cfg, qmpFD: 4, agentPath: "/a.sock", kernel: true}
			},
			want: map[string][]string{
				"-machine": {"q35,i8042=off,sata=off,smbus=off,vmport=off,dump-guest-core=off,memory-backend=ram"},
				"-accel":   {"kvm"},
				"-bios":    nil,
				"-object":  {"memory-backend-file,id=ram,size=256M,mem-path=/dev/shm/t/mem,share=on"},
				"-chardev": {"file,id=console,path=/run/rund/c1/console.log", "socket,id=qmp,fd=4", "socket,id=agent,path=/a.sock"},
			},
		},
		{
			name: "clone",
			launch: func() launch {
				cfg := baseConfig()
				cfg.MemPath, cfg.MemShared = "/dev/shm/t/mem", true
				cfg.TBSizeMiB = 8
				return launch{cfg: cfg, qmpFD: 3, agentPath: "/a.sock", incoming: true}
			},
			want: map[string][]string{
				"-accel":    {"tcg,tb-size=8"},
				"-object":   {"memory-backend-file,id=ram,size=256M,mem-path=/dev/shm/t/mem,share=off"},
				"-incoming": {"defer"},
				"-kernel":   nil,
				"-initrd":   nil,
				"-append":   nil,
			},
			has: []string{"-S"},
		},
		{
			name: "devices in config order",
			launch: func() launch {
				cfg := baseConfig()
				cfg.Disks = []vm.Disk{
					{ID: "rootro", Path: "/proc/self/fd/3", ReadOnly: true},
					{ID: "rootrw", Path: "/img/a,b"},
				}
				cfg.Pmems = []vm.Pmem{
					{ID: "img", Path: "/img/ro.erofs", Size: 64 << 20, ReadOnly: true},
					{ID: "scratch", Path: "/img/rw", Size: 2 << 20},
				}
				cfg.Shares = []vm.Share{{Tag: "vol", Path: "/srv/vol", ReadOnly: true}}
				return launch{cfg: cfg, qmpFD: 5, agentPath: "/a.sock", kernel: true}
			},
			want: map[string][]string{
				"-m": {"size=256M,slots=2,maxmem=322M"},
				"-blockdev": {
					"driver=raw,node-name=disk0,read-only=on,file.driver=file,file.filename=/proc/self/fd/3",
					"driver=raw,node-name=disk1,file.driver=file,file.filename=/img/a,,b",
				},
				"-object": {
					"memory-backend-file,id=pmemmem0,size=67108864,mem-path=/img/ro.erofs,share=on,readonly=on",
					"memory-backend-file,id=pmemmem1,size=2097152,mem-path=/img/rw,share=on",
				},
				"-fsdev": {"local,id=fs0,path=/srv/vol,security_model=none,readonly=on"},
				"-device": {
					"virtio-serial-pci,id=vser0,max_ports=2,bus=pcie.0,addr=0x2",
					"virtserialport,bus=vser0.0,nr=1,chardev=agent,name=rund.agent",
					"virtio-blk-pci,id=blk0,drive=disk0,serial=rootro,bus=pcie.0,addr=0x3",
					"virtio-blk-pci,id=blk1,drive=disk1,serial=rootrw,bus=pcie.0,addr=0x4",
					"virtio-pmem-pci,id=pmem0,memdev=pmemmem0,bus=pcie.0,addr=0x5",
					"virtio-pmem-pci,id=pmem1,memdev=pmemmem1,bus=pcie.0,addr=0x6",
					"virtio-9p-pci,id=share0,fsdev=fs0,mount_tag=vol,bus=pcie.0,addr=0x7",
				},
			},
		},
		{
			name: "no name, one vcpu by default",
			launch: func() launch {
				cfg := baseConfig()
				cfg.Name, cfg.VCPUs = "", 0
				return launch{cfg: cfg, qmpFD: 3, agentPath: "/a.sock", kernel: true}
			},
			want: map[string][]string{"-name": nil, "-smp": {"1"}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l := tc.launch()
			if err := validate(&l.cfg); err != nil {
				t.Fatalf("validate: %v", err)
			}
			args := l.args()
			for flag, want := range tc.want {
				if got := pairs(args, flag); !slices.Equal(got, want) {
					t.Errorf("%s: got %q, want %q", flag, got, want)
				}
			}
			for _, f := range tc.has {
				if !slices.Contains(args, f) {
					t.Errorf("missing %s in %q", f, args)
				}
			}
			for _, f := range tc.hasNot {
				if slices.Contains(args, f) {
					t.Errorf("unexpected %s in %q", f, args)
				}
			}
		})
	}
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name    string
		mutate  func(*vm.Config)
		wantErr string // "" means valid
	}{
		{"valid", func(*vm.Config) {}, ""},
		{"no memory", func(c *vm.Config) { c.MemoryMiB = 0 }, "memory 0 MiB"},
		{"bad accel", func(c *vm.Config) { c.Accel = "hvf" }, `accelerator "hvf"`},
		{"no dir", func(c *vm.Config) { c.Dir = "" }, "no runtime directory"},
		{"negative vcpus", func(c *vm.Config) { c.VCPUs = -1 }, "vcpus -1"},
		{"disk without path", func(c *vm.Config) { c.Disks = []vm.Disk{{ID: "d"}} }, `disk "d": no path`},
		{"pmem not 2 MiB aligned", func(c *vm.Config) {
			c.Pmems = []vm.Pmem{{ID: "p", Path: "/p", Size: 3 << 20}}
		}, "not a positive multiple of 2 MiB"},
		{"share without tag", func(c *vm.Config) { c.Shares = []vm.Share{{Path: "/s"}} }, "needs a tag"},
		{"too many devices", func(c *vm.Config) {
			for range 29 {
				c.Disks = append(c.Disks, vm.Disk{ID: "d", Path: "/d"})
			}
		}, "30 pci devices"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := baseConfig()
			tc.mutate(&cfg)
			err := validate(&cfg)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Errorf("got %v, want no error", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Errorf("got %v, want an error containing %q", err, tc.wantErr)
			}
		})
	}
}

func TestEscape(t *testing.T) {
	tests := []struct{ in, want string }{
		{"/plain/path", "/plain/path"},
		{"/a,b", "/a,,b"},
		{",,", ",,,,"},
	}
	for _, tc := range tests {
		if got := escape(tc.in); got != tc.want {
			t.Errorf("escape(%q): got %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestDetectAccel(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name, pvm, kvm, want string
	}{
		{"pvm module loaded", dir, "/dev/null", "tcg"},
		{"no kvm device", dir + "/none", dir + "/no-kvm", "tcg"},
		{"not a kvm device", dir + "/none", "/dev/null", "tcg"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, why := detectAccel(tc.pvm, tc.kvm)
			if got != tc.want || why == "" {
				t.Errorf("got %q (%q), want %q with a reason", got, why, tc.want)
			}
		})
	}
}

func TestNewDefaults(t *testing.T) {
	b := New(Options{})
	if b.binary != DefaultBinary {
		t.Errorf("binary: got %q, want %q", b.binary, DefaultBinary)
	}
	if got := New(Options{Firmware: FirmwareSeaBIOS}).Firmware(); got != "" {
		t.Errorf("seabios firmware: got %q, want QEMU's default", got)
	}
	if got := New(Options{Firmware: "/fw.rom"}).Firmware(); got != "/fw.rom" {
		t.Errorf("explicit firmware: got %q, want %q", got, "/fw.rom")
	}
	if err := New(Options{Binary: "/nonexistent/qemu"}).Check(); !errors.Is(err, vm.ErrUnavailable) {
		t.Errorf("check with a missing binary: got %v, want vm.ErrUnavailable", err)
	}
}
