package config

import (
	"os"
	"path/filepath"
	"testing"
)

func touch(t *testing.T, p string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestResolveGuest(t *testing.T) {
	installed, beside := t.TempDir(), t.TempDir()
	dirs := []string{installed, beside}
	touch(t, filepath.Join(beside, "cloud", "vmlinuz"))
	touch(t, filepath.Join(beside, "cloud", "initrd.img"))

	resolve := func(c Config) Config {
		c.resolveGuest(dirs)
		return c
	}
	// Only the cloud kernel is there: auto settles on it.
	c := resolve(Default())
	if c.GuestKernel != "cloud" || c.Kernel != filepath.Join(beside, "cloud", "vmlinuz") || c.Initrd != filepath.Join(beside, "cloud", "initrd.img") {
		t.Errorf("auto without rund's kernel: %q %q %q", c.GuestKernel, c.Kernel, c.Initrd)
	}
	// A rund kernel without its initramfs is not a usable flavour.
	touch(t, filepath.Join(installed, "rund", "vmlinuz"))
	if c := resolve(Default()); c.GuestKernel != "cloud" {
		t.Errorf("auto with half a rund guest: %q", c.GuestKernel)
	}
	touch(t, filepath.Join(installed, "rund", "initrd.img"))
	c = resolve(Default())
	if c.GuestKernel != "rund" || c.Kernel != filepath.Join(installed, "rund", "vmlinuz") {
		t.Errorf("auto with rund's kernel: %q %q", c.GuestKernel, c.Kernel)
	}
	// cloud chosen by config wins over a built rund kernel.
	d := Default()
	d.GuestKernel = "cloud"
	if c := resolve(d); c.Kernel != filepath.Join(beside, "cloud", "vmlinuz") {
		t.Errorf("guest_kernel=cloud: %q", c.Kernel)
	}
	// Explicit paths are kept; the other file comes from the flavour.
	d = Default()
	d.Kernel = "/k"
	if c := resolve(d); c.Kernel != "/k" || c.Initrd != filepath.Join(installed, "rund", "initrd.img") {
		t.Errorf("explicit kernel: %q %q", c.Kernel, c.Initrd)
	}
	// An explicit kernel with an initramfs beside it gets that one.
	d = Default()
	d.Kernel = filepath.Join(beside, "cloud", "vmlinuz")
	if c := resolve(d); c.Initrd != filepath.Join(beside, "cloud", "initrd.img") {
		t.Errorf("explicit kernel with its initramfs: %q", c.Initrd)
	}
	// A flavour that is nowhere names a path in the first directory.
	os.RemoveAll(filepath.Join(beside, "cloud"))
	d = Default()
	d.GuestKernel = "cloud"
	if c := resolve(d); c.Kernel != filepath.Join(installed, "cloud", "vmlinuz") {
		t.Errorf("missing flavour: %q", c.Kernel)
	}
}

func TestLoadRejectsUnknownFlavour(t *testing.T) {
	p := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(p, []byte(`guest_kernel = "generic"`), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(p); err == nil {
		t.Fatal("guest_kernel = generic accepted")
	}
}
