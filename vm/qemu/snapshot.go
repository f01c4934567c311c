package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/rund-dev/rund/vm"
)

// Files of a snapshot directory.
const (
	stateName = "state"         // QEMU's migration stream: device state
	metaName  = "snapshot.json" // snapshotMeta
)

const (
	metaMagic   = "rund-qemu-snapshot"
	metaVersion = 1
	// maxStateSize bounds the state file: with x-ignore-shared it holds
	// device state only (under 1 MiB); RAM that was not shared is in it too.
	maxStateSize = 64 << 30
)

// migrationFD is the name under which Snapshot hands QEMU its state file.
const migrationFD = "rund-snapshot"

// snapshotMeta describes a snapshot: what a Config must match to restore it,
// and the state file's size and checksum.
type snapshotMeta struct {
	Magic     string `json:"magic"`
	Version   int    `json:"version"`
	QEMU      string `json:"qemu"`     // version, as QMP's greeting reports it
	Firmware  string `json:"firmware"` // -bios image, "" for QEMU's default
	Accel     string `json:"accel"`
	VCPUs     int    `json:"vcpus"`
	MemoryMiB int    `json:"memoryMiB"`
	// MemPath is the template's RAM file, which x-ignore-shared left out
	// of the state; "" when RAM is in the state.
	MemPath string `json:"memPath"`
	// Devices is the PCI layout, one entry per device in slot order.
	Devices     []string `json:"devices"`
	StateSize   int64    `json:"stateSize"`
	StateCRC32C uint32   `json:"stateCRC32C"`
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// deviceLayout names cfg's devices as a snapshot records them: everything
// that must be equal in a template and its clones, backing paths excluded.
func deviceLayout(cfg *vm.Config) []string {
	ro := func(b bool) string {
		if b {
			return ":ro"
		}
		return ":rw"
	}
	var d []string
	for _, x := range cfg.Disks {
		d = append(d, "disk:"+x.ID+ro(x.ReadOnly))
	}
	for _, x := range cfg.Pmems {
		d = append(d, "pmem:"+x.ID+":"+strconv.FormatInt(x.Size, 10)+ro(x.ReadOnly))
	}
	// A share's read-only flag is the host side's (fsdev) alone: a clone
	// may export its directory read-only where the template's was not.
	for _, x := range cfg.Shares {
		d = append(d, "share:"+x.Tag)
	}
	return d
}

func newMeta(cfg *vm.Config, firmware, qemuVersion string) snapshotMeta {
	m := snapshotMeta{
		Magic: metaMagic, Version: metaVersion, QEMU: qemuVersion,
		Firmware: firmware, Accel: cfg.Accel, VCPUs: max(cfg.VCPUs, 1),
		MemoryMiB: cfg.MemoryMiB, Devices: deviceLayout(cfg),
	}
	if cfg.MemShared {
		m.MemPath = cfg.MemPath
	}
	return m
}

// mismatch says how cfg differs from what the snapshot was taken with, or
// returns nil.
func (s *snapshotMeta) mismatch(cfg *vm.Config, firmware string) error {
	var errs []error
	diff := func(what string, snap, got any) {
		errs = append(errs, fmt.Errorf("%s: snapshot has %v, config %v", what, snap, got))
	}
	if s.Firmware != firmware {
		diff("firmware", s.Firmware, firmware)
	}
	if s.Accel != cfg.Accel {
		diff("accelerator", s.Accel, cfg.Accel)
	}
	if s.VCPUs != max(cfg.VCPUs, 1) {
		diff("vcpus", s.VCPUs, cfg.VCPUs)
	}
	if s.MemoryMiB != cfg.MemoryMiB {
		diff("memory MiB", s.MemoryMiB, cfg.MemoryMiB)
	}
	if s.MemPath != "" && cfg.MemPath == "" {
		errs = append(errs, errors.New("the snapshot's RAM is a file and the config names none"))
	}
	if s.MemPath == "" && cfg.MemPath != "" {
		errs = append(errs, errors.New("the snapshot holds its RAM and the config names a RAM file"))
	}
	if d := deviceLayout(cfg); !slices.Equal(s.Devices, d) {
		diff("devices", s.Devices, d)
	}
	return errors.Join(errs...)
}

// Snapshot saves the paused VM's device state into dir (which must exist) as
// dir/state and dir/snapshot.json. RAM in a shared file (a template's
// MemPath) is left where it is; the VM cannot be resumed afterwards.
func (m *Machine) Snapshot(ctx context.Context, dir string) error {
	if err := m.snapshot(ctx, dir); err != nil {
		return fmt.Errorf("snapshotting vm to %s: %w", dir, err)
	}
	return nil
}

func (m *Machine) snapshot(ctx context.Context, dir string) (err error) {
	st, err := m.qmp.queryStatus(ctx)
	if err != nil {
		return m.exitedErr(err)
	}
	if st.Running {
		return fmt.Errorf("vm is %s: pause it first", st.Status)
	}
	tmp := filepath.Join(dir, stateName+".tmp")
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer func() {
		f.Close()
		if err != nil {
			os.Remove(tmp)
		}
	}()
	if err := m.qmp.setMigrationCapabilities(ctx, "x-ignore-shared", "events"); err != nil {
		return m.exitedErr(err)
	}
	if err := m.qmp.executeWithFile(ctx, "getfd", map[string]string{"fdname": migrationFD}, nil, f); err != nil {
		return m.exitedErr(err)
	}
	sub := m.qmp.subscribe()
	defer sub.cancel()
	if err := m.qmp.execute(ctx, "migrate", map[string]string{"uri": "fd:" + migrationFD}, nil); err != nil {
		return m.exitedErr(err)
	}
	if m.memShared {
		m.mu.Lock()
		m.sharedSnapshot = true
		m.mu.Unlock()
	}
	e, err := sub.wait(ctx, migrationEnded)
	if err != nil {
		if ctx.Err() != nil {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
			m.qmp.execute(cctx, "migrate_cancel", nil, nil)
			cancel()
		}
		return m.exitedErr(fmt.Errorf("waiting for the migration: %w", err))
	}
	if s := migrationStatus(e); s != "completed" {
		return fmt.Errorf("migration %s: %s", s, m.migrationError(ctx))
	}

	if err := f.Sync(); err != nil {
		return err
	}
	size, sum, err := checksum(f)
	if err != nil {
		return err
	}
	meta := newMeta(&m.cfg, m.firmware, m.qemuVersion())
	meta.StateSize, meta.StateCRC32C = size, sum
	if err := writeMeta(dir, &meta); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, stateName))
}

// cleanupTimeout bounds QMP calls made to undo work after ctx is done.
const cleanupTimeout = 2 * time.Second

// migrationError returns QEMU's description of why the migration failed.
func (m *Machine) migrationError(ctx context.Context) string {
	mi, err := m.qmp.queryMigrate(ctx)
	switch {
	case err != nil:
		// QEMU 7.2 exits when an incoming migration fails; its log
		// says why.
		return m.exitedErr(err).Error()
	case mi.ErrorDesc == "":
		return "no reason given"
	}
	return mi.ErrorDesc
}

// checksum returns f's size and CRC-32C, reading it from the start.
func checksum(f *os.File) (int64, uint32, error) {
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return 0, 0, err
	}
	h := crc32.New(castagnoli)
	n, err := io.Copy(h, io.LimitReader(f, maxStateSize+1))
	if err != nil {
		return 0, 0, err
	}
	return n, h.Sum32(), nil
}

func writeMeta(dir string, meta *snapshotMeta) error {
	b, err := json.MarshalIndent(meta, "", "\t")
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, metaName+".tmp")
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(append(b, '\n'))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, filepath.Join(dir, metaName))
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writing %s: %w", metaName, err)
	}
	return nil
}

func readMeta(dir string) (*snapshotMeta, error) {
	b, err := os.ReadFile(filepath.Join(dir, metaName))
	if err != nil {
		return nil, err
	}
	var meta snapshotMeta
	if err := json.Unmarshal(b, &meta); err != nil {
		return nil, fmt.Errorf("parsing %s: %w", metaName, err)
	}
	if meta.Magic != metaMagic || meta.Version != metaVersion {
		return nil, fmt.Errorf("%s: magic %q version %d, want %q version %d",
			metaName, meta.Magic, meta.Version, metaMagic, metaVersion)
	}
	return &meta, nil
}

// openState opens dir's state file and checks it against meta.
func openState(dir string, meta *snapshotMeta) (*os.File, error) {
	f, err := os.Open(filepath.Join(dir, stateName))
	if err != nil {
		return nil, err
	}
	size, sum, err := checksum(f)
	if err == nil && (size != meta.StateSize || sum != meta.StateCRC32C) {
		err = fmt.Errorf("%s: %d bytes with crc32c %#08x, want %d bytes with %#08x",
			stateName, size, sum, meta.StateSize, meta.StateCRC32C)
	}
	if err == nil {
		_, err = f.Seek(0, io.SeekStart)
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// Restore starts a clone of the snapshot in dir and resumes it. cfg must
// have the template's devices (IDs, sizes, read-only flags), vCPUs, memory
// and accelerator, and name the template's RAM file as MemPath when the
// template's RAM was one; backing paths are the clone's own. Guest RAM is
// always mapped privately (copy-on-write), whatever cfg.MemShared says. A
// snapshot that does not match, or whose state QEMU cannot load, gives an
// error wrapping vm.ErrBadSnapshot; on any error no QEMU is left running.
func (b *Backend) Restore(ctx context.Context, cfg vm.Config, dir string) (vm.Machine, error) {
	m, err := b.restore(ctx, cfg, dir)
	if err != nil {
		return nil, fmt.Errorf("restoring snapshot %s: %w", dir, err)
	}
	return m, nil
}

func (b *Backend) restore(ctx context.Context, cfg vm.Config, dir string) (*Machine, error) {
	if cfg.Accel == "" {
		cfg.Accel, _ = DetectAccel()
	}
	cfg.MemShared = false
	meta, err := readMeta(dir)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", vm.ErrBadSnapshot, err)
	}
	if err := meta.mismatch(&cfg, b.firmware); err != nil {
		return nil, fmt.Errorf("%w: %w", vm.ErrBadSnapshot, err)
	}
	if meta.MemPath != "" {
		// QEMU would create a missing RAM file, and the clone would run
		// on zeroed memory.
		fi, err := os.Stat(cfg.MemPath)
		if err != nil {
			return nil, fmt.Errorf("%w: template memory: %w", vm.ErrBadSnapshot, err)
		}
		if fi.Size() != int64(cfg.MemoryMiB)<<20 {
			return nil, fmt.Errorf("%w: template memory %s: %d bytes, want %d",
				vm.ErrBadSnapshot, cfg.MemPath, fi.Size(), int64(cfg.MemoryMiB)<<20)
		}
	}
	state, err := openState(dir, meta)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", vm.ErrBadSnapshot, err)
	}
	defer state.Close()

	m, err := b.start(ctx, cfg, true, state)
	if err != nil {
		return nil, err
	}
	state.Close()
	if err := m.incoming(ctx, meta, extraFD(&cfg)); err != nil {
		m.kill()
		return nil, err
	}
	return m, nil
}

// incoming loads the clone's device state from descriptor fd and resumes it.
func (m *Machine) incoming(ctx context.Context, meta *snapshotMeta, fd int) error {
	if v := m.qemuVersion(); v != meta.QEMU {
		return fmt.Errorf("%w: snapshot taken with qemu %s, running %s", vm.ErrBadSnapshot, meta.QEMU, v)
	}
	if err := m.qmp.setMigrationCapabilities(ctx, "x-ignore-shared", "events"); err != nil {
		return m.exitedErr(err)
	}
	sub := m.qmp.subscribe()
	defer sub.cancel()
	if err := m.qmp.execute(ctx, "migrate-incoming", map[string]string{"uri": "fd:" + strconv.Itoa(fd)}, nil); err != nil {
		return m.exitedErr(err)
	}
	e, err := sub.wait(ctx, migrationEnded)
	if err != nil {
		if errors.Is(err, errQMPClosed) {
			// QEMU 7.2 exits when an incoming migration fails.
			return fmt.Errorf("%w: loading device state: %w", vm.ErrBadSnapshot, m.exitedErr(err))
		}
		return fmt.Errorf("waiting for the device state to load: %w", err)
	}
	if s := migrationStatus(e); s != "completed" {
		return fmt.Errorf("%w: loading device state: migration %s: %s", vm.ErrBadSnapshot, s, m.migrationError(ctx))
	}
	return m.runstate(ctx, "cont", "RESUME", true)
}
