package cgpool

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/cgroups"
	"github.com/opencontainers/cgroups/fs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// Defaults for Options.
const (
	DefaultRoot     = "/sys/fs/cgroup"
	DefaultParent   = "/rund"
	DefaultStateDir = "/run/rund/cgpool"
	DefaultLowWater = 2
	DefaultRefill   = 4
	DefaultMaxSlots = 4096
)

// Options configures a pool.
type Options struct {
	// Root is the cgroup filesystem root (DefaultRoot). Tests and the
	// benchmark inject a temporary tree here.
	Root string
	// Parent is the cgroup, relative to each hierarchy's root, that the
	// pool's slots and leases live under (DefaultParent).
	Parent string
	// StateDir holds the pool records, one file per root and parent
	// (DefaultStateDir; tmpfs is expected).
	StateDir string
	// Mode forces a cgroup version; ModeAuto detects it.
	Mode Mode
	// LowWater starts a background refill when fewer slots than this are
	// idle after an Acquire (DefaultLowWater); negative disables refill.
	LowWater int
	// Refill is the number of slots a refill adds (DefaultRefill).
	Refill int
	// MaxSlots bounds the pool's size (DefaultMaxSlots).
	MaxSlots int
	// MemoryOverhead is added to the spec's memory limits: the VMM's
	// cgroup holds the guest's memory plus the sandbox's own overhead.
	MemoryOverhead int64
	// KillTimeout bounds how long Release waits for killed processes to
	// leave the cgroup (10s).
	KillTimeout time.Duration
	// Controllers are the cgroup v1 controllers whose hierarchies hold the
	// pool's slots (DefaultControllers; AllControllers for every mounted
	// hierarchy). A pool keeps the set it was created with: an Open that
	// leaves this nil adopts the record's set, one that names another set
	// fails with ErrControllers. Ignored on cgroup v2.
	Controllers []string
}

// Pool is an open cgroup pool. Its methods are safe for concurrent use by
// goroutines and by processes that open the same pool.
type Pool struct {
	opts    Options
	mode    Mode
	hs      []hierarchy
	parents []string // the parent cgroup's directory in each hierarchy
	// pfds are the parents, opened: renames and the emptiness check work
	// relative to them.
	pfds []int
	rec  *record
	self owner

	// mu serialises this process's goroutines on the record's flock (a
	// flock excludes open file descriptions, not goroutines sharing one).
	mu sync.Mutex

	// cursor is where the next liveness probe looks (guarded by mu).
	cursor int

	// slotMus are per-slot mutexes (id -> *sync.Mutex) that, with the
	// slot line's OFD lock, mark a slot being released: the OFD lock
	// excludes other processes, the mutex other goroutines.
	slotMus sync.Map
	// hints map lease names to slot ids (name -> int), so that a Release
	// finds its slot without reading the record under the flock.
	hints sync.Map

	refilling atomic.Bool
	refillWG  sync.WaitGroup
}

// Open opens the pool of opts.Parent, creating the parent cgroup and an
// empty record on first use. It does not create slots: Acquire grows the
// pool on demand and refills it in the background, and Init pre-creates.
func Open(opts Options) (*Pool, error) {
	if opts.Root == "" {
		opts.Root = DefaultRoot
	}
	if opts.Parent == "" {
		opts.Parent = DefaultParent
	}
	if opts.StateDir == "" {
		opts.StateDir = DefaultStateDir
	}
	if opts.LowWater == 0 {
		opts.LowWater = DefaultLowWater
	}
	if opts.Refill <= 0 {
		opts.Refill = DefaultRefill
	}
	if opts.MaxSlots <= 0 {
		opts.MaxSlots = DefaultMaxSlots
	}
	if opts.KillTimeout <= 0 {
		opts.KillTimeout = 10 * time.Second
	}
	parent := filepath.Clean("/" + opts.Parent)
	if parent == "/" {
		return nil, fmt.Errorf("opening cgroup pool: parent must not be the root cgroup")
	}
	opts.Parent = parent
	mode, all, err := detect(opts.Root, opts.Mode)
	if err != nil {
		return nil, fmt.Errorf("opening cgroup pool: %w", err)
	}
	self, err := ownerOf(os.Getpid())
	if err != nil {
		return nil, fmt.Errorf("opening cgroup pool: %w", err)
	}
	if err := os.MkdirAll(opts.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("opening cgroup pool: %w", err)
	}
	rec, err := openRecord(recordPath(opts), mode)
	if err != nil {
		return nil, err
	}
	hs := all
	if mode == ModeV1 {
		if hs, err = pickHierarchies(rec, all, opts.Controllers); err != nil {
			_ = rec.close()
			return nil, fmt.Errorf("opening cgroup pool %s: %w", parent, err)
		}
		hs = markNamed(hs)
	}
	rec.ctrls = controllerSet(mode, hs)
	p := &Pool{opts: opts, mode: mode, hs: hs, self: self, rec: rec}
	made := ""
	for _, h := range hs {
		d := filepath.Join(h.dir, parent)
		if made == "" {
			made = missingTop(h.dir, parent)
		}
		err := makeParent(h, d)
		if err == nil {
			var fd int
			fd, err = unix.Open(d, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				err = &os.PathError{Op: "open", Path: d, Err: err}
			}
			p.pfds = append(p.pfds, fd)
		}
		if err != nil {
			_ = p.closeFiles()
			return nil, fmt.Errorf("opening cgroup pool: %w", err)
		}
		p.parents = append(p.parents, d)
	}
	if made != "" {
		// Destroy removes what the pool made: remember it beside the
		// record (best effort: without it, the parent outlives the pool).
		_ = os.WriteFile(madePath(opts), []byte(made), 0o600)
	}
	return p, nil
}

// missingTop returns the topmost ancestor of parent (itself included) that
// does not exist under the hierarchy root, or "" if parent exists.
func missingTop(root, parent string) string {
	top := ""
	for d := parent; d != "/" && d != "."; d = filepath.Dir(d) {
		if exists(filepath.Join(root, d)) {
			break
		}
		top = d
	}
	return top
}

// madePath is the file that says which cgroup the pool's Open created for
// its parent, so that Destroy removes it again.
func madePath(opts Options) string { return recordPath(opts) + ".made" }

// removeMadeParents removes, in every hierarchy, the parent cgroup and the
// ancestors up to the one the pool created, where they are empty.
func (p *Pool) removeMadeParents() {
	b, err := os.ReadFile(madePath(p.opts))
	if err != nil {
		return
	}
	top := filepath.Clean("/" + string(b))
	if top != p.opts.Parent && !strings.HasPrefix(p.opts.Parent, top+"/") {
		return // not an ancestor of this pool's parent: ignore it
	}
	for _, h := range p.hs {
		for d := p.opts.Parent; ; d = filepath.Dir(d) {
			if err := unix.Rmdir(filepath.Join(h.dir, d)); err != nil && !errors.Is(err, unix.ENOENT) {
				break // not empty: another pool or a cgroup someone else made
			}
			if d == top {
				break
			}
		}
	}
	_ = os.Remove(madePath(p.opts))
}

// pickHierarchies chooses the v1 hierarchies of a pool: those the record
// was made with, else those serving want (DefaultControllers if nil).
func pickHierarchies(rec *record, all []hierarchy, want []string) ([]hierarchy, error) {
	have, err := rec.controllers()
	if err != nil {
		return nil, err
	}
	if want == nil {
		want = DefaultControllers
		if have != "" && have != "-" {
			want = strings.Split(have, ",")
		}
	}
	hs, err := selectHierarchies(all, want)
	if err != nil {
		return nil, err
	}
	if got := controllerSet(ModeV1, hs); have != "" && got != have {
		return nil, fmt.Errorf("%w: record has %s, asked for %s", ErrControllers, have, got)
	}
	return hs, nil
}

func (p *Pool) closeFiles() error {
	for _, fd := range p.pfds {
		_ = unix.Close(fd)
	}
	p.pfds = nil
	return p.rec.close()
}

func makeParent(h hierarchy, dir string) error {
	if h.cgroupfs && h.has("cpuset") {
		// Creates the missing ancestors with cpus and mems copied down.
		if err := (&fs.CpusetGroup{}).ApplyDir(dir, &cgroups.Resources{}, -1); err != nil {
			return fmt.Errorf("creating parent cgroup %s: %w", dir, err)
		}
		return nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("creating parent cgroup: %w", err)
	}
	return nil
}

// recordPath names a pool's record after its root and parent.
func recordPath(opts Options) string {
	key := strings.ReplaceAll(strings.Trim(opts.Root, "/"), "/", "_") + "@" +
		strings.ReplaceAll(strings.Trim(opts.Parent, "/"), "/", "_")
	return filepath.Join(opts.StateDir, key+".pool")
}

// Mode returns the cgroup version the pool works with.
func (p *Pool) Mode() Mode { return p.mode }

// Parent returns the pool's parent cgroup, e.g. "/rund".
func (p *Pool) Parent() string { return p.opts.Parent }

// Controllers returns the controllers whose hierarchies hold the pool's
// slots, sorted ("" alone on cgroup v2): a lease has a cgroup in these and
// in no other.
func (p *Pool) Controllers() []string {
	var out []string
	for _, h := range p.hs {
		out = append(out, h.controllers...)
	}
	sort.Strings(out)
	return out
}

// NamedControllers returns the controllers, sorted, whose hierarchies
// show a lease under its own name (none on cgroup v2); in the pool's other
// hierarchies a lease keeps its slot's name.
func (p *Pool) NamedControllers() []string {
	var out []string
	for _, h := range p.hs {
		if h.named && p.mode == ModeV1 {
			out = append(out, h.controllers...)
		}
	}
	sort.Strings(out)
	return out
}

// Close waits for a background refill and closes the record.
func (p *Pool) Close() error {
	p.refillWG.Wait()
	return p.closeFiles()
}

// withLock runs fn with the record's flock held exclusively and the slots
// as read; a corrupt record is rebuilt from the tree first.
func (p *Pool) withLock(fn func(slots []slot) error) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.rec.lock(unix.LOCK_EX); err != nil {
		return err
	}
	defer p.rec.unlock()
	slots, err := p.rec.readLocked()
	if errors.Is(err, ErrCorrupt) {
		slots, err = p.rebuildLocked()
	}
	if err != nil {
		return err
	}
	return fn(slots)
}

func validName(name string) error {
	switch {
	case name == "", name == "-", name == ".", name == "..", len(name) > maxNameLen,
		strings.ContainsAny(name, "/\x00 \t\n"):
		return fmt.Errorf("%w: %q", ErrInvalidName, name)
	case strings.HasPrefix(name, slotPrefix):
		return fmt.Errorf("%w: %q uses the slot prefix", ErrInvalidName, name)
	}
	return nil
}

// Acquire leases a slot to the cgroup name (one path component) under the
// pool's parent, with res applied. ownerPid is the process whose life keeps
// the lease (0: the caller); once it dies the slot may be reclaimed, so a
// caller that hands the sandbox to another process moves the lease with
// Lease.SetOwner. An empty pool grows instead of failing.
func (p *Pool) Acquire(ctx context.Context, name string, ownerPid int, res *specs.LinuxResources) (*Lease, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	r, mask, err := hostResources(res, p.opts.MemoryOverhead)
	if err != nil {
		return nil, err
	}
	if err := p.servesFields(mask); err != nil {
		return nil, fmt.Errorf("acquiring cgroup %q: %w", name, err)
	}
	own := p.self
	if ownerPid != 0 && ownerPid != p.self.pid {
		if own, err = ownerOf(ownerPid); err != nil {
			return nil, fmt.Errorf("acquiring cgroup %q: owner: %w", name, err)
		}
	}
	var (
		mine, prev slot
		grow       bool
		idleLeft   int
		stale      []slot
	)
	err = p.withLock(func(slots []slot) error {
		var err error
		mine, prev, grow, idleLeft, stale, err = p.takeLocked(slots, name, own, mask, valuesOf(r))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("acquiring cgroup %q: %w", name, err)
	}
	// Reclaim before renaming: a stale lease may hold this very name.
	for _, s := range stale {
		if err := p.cleanup(s, false); err == nil {
			_ = p.markIdle(slot{id: s.id})
		}
	}
	switch dir := p.dirName(mine); {
	case grow:
		err = p.makeDirs(mine)
	case dir != slotName(mine.id):
		err = p.renameAll(slotName(mine.id), dir)
		if errors.Is(err, os.ErrNotExist) {
			// The idle slot's directory was removed behind the record's
			// back (an empty cgroup looks unused to other tools): make it
			// again and apply every limit, since none is there any more.
			if err = p.remakeMissing(slot{id: mine.id}); err == nil {
				prev = slot{}
				err = p.renameAll(slotName(mine.id), dir)
			}
		}
	}

	if err == nil && p.mode == ModeV2 {
		// No rename on v2: the tree keeps the lease's name in an xattr.
		err = setNameXattr(filepath.Join(p.parents[0], slotName(mine.id)), name)
	}
	if err == nil {
		l := p.lease(mine)
		err = p.apply(l, prev, mask, r)
		if errors.Is(err, os.ErrNotExist) && p.mode == ModeV1 {
			// A directory in a hierarchy where slots are not renamed
			// was removed behind the record's back (no rename noticed):
			// make it again and apply every limit.
			if err = p.remakeMissing(mine); err == nil {
				err = p.apply(l, slot{}, mask, r)
			}
		}
		if err == nil {
			if p.opts.LowWater > 0 && idleLeft < p.opts.LowWater {
				p.startRefill()
			}
			p.hints.Store(name, mine.id)
			return l, nil
		}
	}
	// Roll back: return the slot to the pool, reset in full (what was
	// written is unknown).
	if cerr := p.cleanup(mine, false); cerr == nil {
		_ = p.markIdle(slot{id: mine.id})
	} else {
		err = errors.Join(err, cerr)
	}
	return nil, fmt.Errorf("acquiring cgroup %q: %w", name, err)
}

// apply writes the limits r (fields mask) to the lease: only what differs
// from the slot's recorded values prev, since the last lease's limits stay
// on a released slot (lazy reset) and are overwritten, or reset, here.
func (p *Pool) apply(l *Lease, prev slot, mask fieldMask, r *cgroups.Resources) error {
	reset, apply := plan(prev, mask, valuesOf(r))
	if reset != 0 {
		if err := resetResources(p.mode, l.paths, reset); err != nil {
			return err
		}
	}
	return applyResources(p.mode, l.paths, restrict(r, apply), apply)
}

// remakeMissing creates the slot's directory, named as dirIn says, in each
// hierarchy that lacks it.
func (p *Pool) remakeMissing(s slot) error {
	for i := range p.hs {
		name := p.dirIn(i, s)
		if exists(filepath.Join(p.parents[i], name)) {
			continue
		}
		if err := p.makeDir(i, name, s.id); err != nil {
			return fmt.Errorf("recreating slot %d: %w", s.id, err)
		}
	}
	return nil
}

// servesFields checks that the pool has a hierarchy for each resource
// field in m: a limit is never dropped silently.
func (p *Pool) servesFields(m fieldMask) error {
	if p.mode == ModeV2 {
		return nil
	}
	for _, fc := range fieldControllers {
		if m&fc.mask == 0 {
			continue
		}
		found := false
		for _, h := range p.hs {
			found = found || h.has(fc.ctrl)
		}
		if !found {
			return fmt.Errorf("%s limits need the %s controller, not in the pool's %s", fc.ctrl, fc.ctrl, strings.Join(p.Controllers(), ","))
		}
	}
	return nil
}

// shapeProbes is how many idle slots an Acquire compares with the limits
// it asks for, looking for one it need not write to.
const shapeProbes = 32

// slotRank says how well the idle slot s suits a lease of the fields mask
// at vals: 2 if it already holds them (taking it writes nothing), 1 if it
// holds no limits, 0 otherwise.
func slotRank(s *slot, mask fieldMask, vals values) int {
	if reset, apply := plan(*s, mask, vals); reset == 0 && apply == 0 {
		return 2
	}
	if s.mask == 0 {
		return 1
	}
	return 0
}

// livenessProbes is how many other holders each Acquire checks for death
// on its way; an Acquire that finds no idle slot checks them all.
const livenessProbes = 2

// takeLocked picks the slot for a new lease of name, with fields mask set to
// vals, and records it busy: an idle slot, or a new one when none is idle;
// prev is that slot as it was. On the way it claims, for the caller to
// clean up, the slots whose holders died: a stale lease of the same name, a
// few others in turn, and all of them before growing.
//
// The busy slot's mask covers the fields of both the old and the new
// values, so that a reclaim after a crash half-way through the writes
// resets all of them.
//
// Preconditions: the record's flock is held exclusively.
func (p *Pool) takeLocked(slots []slot, name string, own owner, mask fieldMask, vals values) (mine, prev slot, grow bool, idleLeft int, stale []slot, err error) {
	claim := func(s slot) error {
		s.state, s.owner = stateCleaning, p.self
		stale = append(stale, s)
		return p.rec.writeSlotLocked(s)
	}
	dead := func(s slot) bool { return s.state != stateIdle && s.owner != p.self && !s.owner.alive() }
	// A slot whose holder died may be being released right now by
	// another process (rund delete after the shim exited): it is claimed
	// only if no one holds its line.
	claimable := func(s slot) bool { return dead(s) && p.slotFree(s.id) }
	mine = slot{id: -1, state: stateBusy, owner: own, mask: mask, set: mask, vals: vals, name: name}
	if id, ok := p.rec.byName[name]; ok && slots[id].state != stateIdle {
		if s := slots[id]; !dead(s) || !p.slotFree(id) {
			return mine, prev, false, 0, nil, ErrExist
		} else if err := claim(s); err != nil {
			return mine, prev, false, 0, nil, err
		}
	}
	idle, rank := 0, 0
	for i := range slots {
		s := &slots[i]
		if s.state != stateIdle {
			continue
		}
		idle++
		// Prefer an idle slot that already holds these limits (the last
		// lease had the same shape): Acquire then writes nothing. Failing
		// that, a fresh one, so that shaped slots stay for their shape.
		// Only the first few idle slots are compared.
		if mine.id < 0 || idle <= shapeProbes && rank < 2 {
			if r := slotRank(s, mask, vals); mine.id < 0 || r > rank {
				mine.id, prev, rank = s.id, *s, r
			}
		}
	}
	idleLeft = max(idle-1, 0)
	for i := 0; i < livenessProbes && len(slots) > 0; i++ {
		p.cursor = (p.cursor + 1) % len(slots)
		if s := slots[p.cursor]; s.name != name && claimable(s) {
			if err := claim(s); err != nil {
				return mine, prev, false, 0, nil, err
			}
		}
	}
	if mine.id < 0 {
		for _, s := range slots {
			if s.name != name && s.state != stateCleaning && claimable(s) {
				if err := claim(s); err != nil {
					return mine, prev, false, 0, nil, err
				}
			}
		}
		if len(slots) >= p.opts.MaxSlots {
			return mine, prev, false, 0, nil, fmt.Errorf("pool full at %d slots", len(slots))
		}
		mine.id, grow = len(slots), true
	}
	if prev.mask == fieldAll {
		mine.mask = fieldAll
	} else {
		mine.mask |= prev.mask
	}
	return mine, prev, grow, idleLeft, stale, p.rec.writeSlotLocked(mine)
}

// Reclaim cleans up every slot whose holder died and returns how many it
// returned to the pool. Acquire does this on its own, a few slots at a
// time; Reclaim is for pool admin and tests.
func (p *Pool) Reclaim() (int, error) {
	var stale []slot
	err := p.withLock(func(slots []slot) error {
		for _, s := range slots {
			if s.state != stateIdle && s.owner != p.self && !s.owner.alive() && p.slotFree(s.id) {
				s.state, s.owner = stateCleaning, p.self
				if err := p.rec.writeSlotLocked(s); err != nil {
					return err
				}
				stale = append(stale, s)
			}
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("reclaiming slots: %w", err)
	}
	var errs []error
	n := 0
	for _, s := range stale {
		if err := p.cleanup(s, false); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := p.markIdle(slot{id: s.id}); err != nil {
			errs = append(errs, err)
			continue
		}
		n++
	}
	if err := errors.Join(errs...); err != nil {
		return n, fmt.Errorf("reclaiming slots: %w", err)
	}
	return n, nil
}

// markIdle records a cleaned slot as idle, with the resource fields and
// values it still holds.
func (p *Pool) markIdle(s slot) error {
	s.state, s.owner, s.name = stateIdle, owner{}, ""
	return p.withLock(func(slots []slot) error {
		if s.id >= len(slots) {
			return fmt.Errorf("slot %d: %w", s.id, ErrNotExist)
		}
		return p.rec.writeSlotLocked(s)
	})
}

// Release returns the lease of name to the pool: it kills what is left in
// the cgroup, renames it back and marks it idle. The resource values
// Acquire set stay on the idle slot, kept in the record, and the next
// Acquire of the slot overwrites or resets them (lazy reset): an idle slot
// holds no process, so its limits bind nobody. Releasing a name that holds
// no lease is not an error, so delete --force may call it with only the
// name. Do not call it from inside the cgroup.
//
// The lazy reset trusts the record: the lease's limits must be changed only
// through this package.
func (p *Pool) Release(name string) error { return p.release(name, true) }

// ReleaseReset is Release without the lazy reset: it also resets every
// limit the lease had and remakes any of the slot's directories that were
// removed behind the pool's back. It is for a lease whose sandbox failed
// to start, in case the cgroup itself was the cause.
func (p *Pool) ReleaseReset(name string) error { return p.release(name, false) }

func (p *Pool) release(name string, mayBeLazy bool) error {
	id, hinted := p.hint(name)
	for {
		if !hinted {
			// Look the name up in the record (nothing written).
			found := false
			err := p.withLock(func(slots []slot) error {
				id, found = p.rec.byName[name]
				found = found && slots[id].state != stateIdle
				return nil
			})
			if err != nil || !found {
				return err
			}
		}
		done, err := p.releaseSlot(name, id, mayBeLazy)
		if done || err != nil || !hinted {
			return err
		}
		hinted = false // a stale hint: look the name up
	}
}

// Hint tells the pool which slot the lease of name was in (Lease.Slot), so
// that a Release in this process need not look it up; a wrong hint costs a
// lookup.
func (p *Pool) Hint(name string, id int) { p.hints.Store(name, id) }

func (p *Pool) hint(name string) (int, bool) {
	v, ok := p.hints.Load(name)
	if !ok {
		return 0, false
	}
	return v.(int), true
}

// releaseSlot releases the lease of name if slot id holds it; done is false
// if it does not. The slot's line lock, held throughout, keeps others from
// reclaiming it (its holder, the shim, has usually exited by now) or
// releasing it twice: the only write to the record is the final one.
func (p *Pool) releaseSlot(name string, id int, mayBeLazy bool) (done bool, err error) {
	if err := p.lockSlot(id); err != nil {
		return true, fmt.Errorf("releasing cgroup %q: %w", name, err)
	}
	defer p.unlockSlot(id)
	s, err := p.rec.readLine(id)
	if err != nil {
		err = p.withLock(func(slots []slot) error {
			if id >= len(slots) {
				s = slot{id: id}
				return nil
			}
			s = slots[id]
			return nil
		})
		if err != nil {
			return true, err
		}
	}
	if s.name != name || s.state == stateIdle {
		return false, nil
	}
	p.hints.Delete(name)
	if s.state != stateBusy && s.owner.alive() && s.owner != p.self {
		return true, nil // another process is already cleaning it up
	}
	// Only a busy slot is as its Acquire left it; one that a dead
	// process was cleaning up may be half reset.
	lazy := mayBeLazy && s.state == stateBusy && s.mask != fieldAll
	if err := p.cleanup(s, lazy); err != nil {
		// The slot stays leased to its dead holder: the next Acquire
		// that comes by reclaims it, once this process lets go of it.
		return true, fmt.Errorf("releasing cgroup %q: %w", name, err)
	}
	idle := slot{id: s.id}
	if lazy {
		idle.mask, idle.set, idle.vals = s.set, s.set, s.vals
	}
	return true, p.markIdle(idle)
}

// slotMutex returns slot id's in-process mutex.
func (p *Pool) slotMutex(id int) *sync.Mutex {
	if m, ok := p.slotMus.Load(id); ok {
		return m.(*sync.Mutex)
	}
	m, _ := p.slotMus.LoadOrStore(id, new(sync.Mutex))
	return m.(*sync.Mutex)
}

// lockSlot marks slot id as being released by this goroutine, waiting
// for another releaser to finish. Never called with mu held.
func (p *Pool) lockSlot(id int) error {
	m := p.slotMutex(id)
	m.Lock()
	if _, err := p.rec.lockLine(id, true); err != nil {
		m.Unlock()
		return err
	}
	return nil
}

func (p *Pool) unlockSlot(id int) {
	p.rec.unlockLine(id)
	p.slotMutex(id).Unlock()
}

// slotFree reports whether no goroutine or process is releasing slot id.
// It does not wait, so it may be called with mu and the flock held.
func (p *Pool) slotFree(id int) bool {
	m := p.slotMutex(id)
	if !m.TryLock() {
		return false
	}
	defer m.Unlock()
	ok, err := p.rec.lockLine(id, false)
	if err != nil {
		return true // no OFD locks here: only the record's states protect it
	}
	if ok {
		p.rec.unlockLine(id)
	}
	return ok
}

// Lease returns the live lease of name, as another process sees it.
func (p *Pool) Lease(name string) (*Lease, error) {
	var l *Lease
	err := p.withLock(func(slots []slot) error {
		for _, s := range slots {
			if s.name == name && s.state == stateBusy {
				l = p.lease(s)
				return nil
			}
		}
		return fmt.Errorf("cgroup %q: %w", name, ErrNotExist)
	})
	return l, err
}

// Init grows the pool to at least size slots, creating them now.
func (p *Pool) Init(size int) error {
	var n int
	err := p.withLock(func(slots []slot) error {
		n = size - len(slots)
		return nil
	})
	if err != nil || n <= 0 {
		return err
	}
	return p.grow(n)
}

// grow adds n idle slots: ids are reserved under the lock, directories
// made outside it.
func (p *Pool) grow(n int) error {
	var ids []int
	err := p.withLock(func(slots []slot) error {
		for i := 0; i < n && len(slots)+i < p.opts.MaxSlots; i++ {
			s := slot{id: len(slots) + i, state: stateNew, owner: p.self}
			if err := p.rec.writeSlotLocked(s); err != nil {
				return err
			}
			ids = append(ids, s.id)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("growing cgroup pool: %w", err)
	}
	var errs []error
	for _, id := range ids {
		if err := p.makeDirs(slot{id: id}); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := p.markIdle(slot{id: id}); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("growing cgroup pool: %w", err)
	}
	return nil
}

// startRefill grows the pool in the background unless a refill runs.
func (p *Pool) startRefill() {
	if !p.refilling.CompareAndSwap(false, true) {
		return
	}
	p.refillWG.Add(1)
	go func() {
		defer p.refillWG.Done()
		defer p.refilling.Store(false)
		// Best effort: a failed refill leaves Acquire to grow on demand.
		_ = p.grow(p.opts.Refill)
	}()
}

// Destroy kills everything in the pool's slots and removes them and the
// record. Busy slots whose holder lives make it fail with ErrBusy unless
// force is set.
func (p *Pool) Destroy(force bool) error {
	var all []slot
	err := p.withLock(func(slots []slot) error {
		for _, s := range slots {
			if !force && s.state != stateIdle && (s.owner.alive() && s.owner != p.self || !p.slotFree(s.id)) {
				return fmt.Errorf("destroying pool %s: slot %d (%s): %w", p.opts.Parent, s.id, s.name, ErrBusy)
			}
		}
		for _, s := range slots {
			if s.state != stateIdle {
				s.state, s.owner = stateCleaning, p.self
				if err := p.rec.writeSlotLocked(s); err != nil {
					return err
				}
			}
			all = append(all, s)
		}
		return nil
	})
	if err != nil {
		return err
	}
	var errs []error
	for _, s := range all {
		if err := p.cleanup(s, true); err != nil {
			errs = append(errs, err)
			continue
		}
		for i, h := range p.hs {
			d := filepath.Join(p.parents[i], slotName(s.id))
			if h.cgroupfs {
				err = cgroups.RemovePath(d)
			} else {
				err = os.RemoveAll(d)
			}
			if err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("destroying pool %s: %w", p.opts.Parent, err)
	}
	err = p.withLock(func([]slot) error { return p.rec.f.Truncate(0) })
	if err != nil {
		return fmt.Errorf("destroying pool %s: %w", p.opts.Parent, err)
	}
	if err := os.Remove(p.rec.f.Name()); err != nil {
		return fmt.Errorf("destroying pool %s: %w", p.opts.Parent, err)
	}
	p.removeMadeParents()
	return nil
}

// ParentPaths returns the parent cgroup's directory per controller, keyed
// like Lease.Paths.
func (p *Pool) ParentPaths() map[string]string {
	out := map[string]string{}
	for i, h := range p.hs {
		for _, c := range h.controllers {
			out[c] = p.parents[i]
		}
	}
	return out
}
