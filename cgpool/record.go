package cgpool

import (
	"bytes"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// The record is a header followed by one fixed-size line per slot, so a
// state change rewrites one line in place with a single pwrite under the
// flock: no temp files, no fsync (the record lives on tmpfs and a damaged
// one is rebuilt from the tree). Each line carries its own CRC-32C.
//
//	header: "rund-cgpool <version> <mode> <generation> <controllers>" padded to headerSize
//	slot:   "<id> <state> <pid> <start> <mask> <set> <values> <name> <crc>" padded to lineSize
//
// mask is every resource field that may differ from a fresh cgroup's; set
// the fields the last lease applied, with their values (see values.encode).
const (
	recordMagic   = "rund-cgpool"
	recordVersion = 2
	headerSize    = 256
	lineSize      = 640
	// maxNameLen bounds a cgroup name so a slot line stays fixed-size; it
	// is NAME_MAX, the kernel's own bound for a directory name.
	maxNameLen = 255
)

// slotState is the life-cycle state of a slot in the record.
type slotState byte

const (
	// stateIdle: the slot sits under its slot name, empty and reset.
	stateIdle slotState = 'i'
	// stateBusy: leased under slot.name by slot.owner.
	stateBusy slotState = 'b'
	// stateCleaning: slot.owner is reclaiming it (killing, resetting and
	// renaming it back) after its holder died; if that owner dies too the
	// next Acquire reclaims the slot. A Release does not write this state:
	// it holds the slot line's lock instead.
	stateCleaning slotState = 'c'
	// stateNew: slot.owner is creating the slot's directories.
	stateNew slotState = 'n'
)

func (s slotState) String() string {
	switch s {
	case stateIdle:
		return "idle"
	case stateBusy:
		return "busy"
	case stateCleaning:
		return "cleaning"
	case stateNew:
		return "new"
	}
	return "unknown"
}

// slot is one line of the record.
type slot struct {
	id    int
	state slotState
	owner owner
	// mask is the set of resource fields written to the slot since it was
	// last reset (fieldMask bits); fieldAll means unknown.
	mask fieldMask
	// set is the fields the last lease applied, vals their values: a
	// released slot keeps them (lazy reset) and the next Acquire writes
	// only what differs. set is a subset of mask.
	set  fieldMask
	vals values
	// name is the lease's cgroup name, "" when idle.
	name string
}

var crcTable = crc32.MakeTable(crc32.Castagnoli)

func encodeSlot(s slot) []byte {
	name := s.name
	if name == "" {
		name = "-"
	}
	body := appendSlotBody(make([]byte, 0, lineSize), s, name, true)
	if len(body)+10 > lineSize {
		// Cannot happen with names bounded by maxNameLen; stay correct
		// anyway by forgetting the values: the next Acquire rewrites all.
		s.mask |= s.set
		body = appendSlotBody(body[:0], s, name, false)
	}
	sum := crc32.Checksum(body, crcTable)
	body = append(body, ' ')
	for shift := 28; shift >= 0; shift -= 4 {
		body = append(body, "0123456789abcdef"[sum>>shift&0xf])
	}
	return padLine(body, lineSize)
}

// appendSlotBody appends the checksummed part of a slot line; without
// values, the set is 0 and the values "-".
func appendSlotBody(b []byte, s slot, name string, withValues bool) []byte {
	b = strconv.AppendInt(b, int64(s.id), 10)
	b = append(b, ' ', byte(s.state), ' ')
	b = strconv.AppendInt(b, int64(s.owner.pid), 10)
	b = append(b, ' ')
	b = strconv.AppendUint(b, s.owner.start, 10)
	b = append(b, ' ')
	b = strconv.AppendUint(b, uint64(uint32(s.mask)), 16)
	b = append(b, ' ')
	if withValues {
		b = strconv.AppendUint(b, uint64(uint32(s.set)), 16)
		b = append(b, ' ')
		b = s.vals.appendEncoded(b, s.set)
	} else {
		b = append(b, "0 -"...)
	}
	b = append(b, ' ')
	return append(b, name...)
}

// padLine pads b with spaces to size bytes (at most lineSize), the last
// one a newline.
func padLine(b []byte, size int) []byte {
	b = append(b, spaces[:max(size-len(b), 0)]...)[:size]
	b[size-1] = '\n'
	return b
}

var spaces = [lineSize]byte(bytes.Repeat([]byte{' '}, lineSize))

func decodeSlot(line []byte, want int) (slot, error) {
	bad := func(what string) (slot, error) {
		return slot{}, fmt.Errorf("slot line %d: %s: %w", want, what, ErrCorrupt)
	}
	// Every process reads every line of the record it has not cached, so
	// this parses in place, without allocating but for the name.
	line = bytes.TrimRight(line, " \n")
	i := bytes.LastIndexByte(line, ' ')
	if i < 0 || len(line)-i-1 != 8 {
		return bad("checksum")
	}
	body := line[:i]
	if sum, ok := parseUint(line[i+1:], 16); !ok || sum != uint64(crc32.Checksum(body, crcTable)) {
		return bad("checksum")
	}
	// id state pid start mask set values name
	var f [8][]byte
	for n := range f {
		j := bytes.IndexByte(body, ' ')
		if n == len(f)-1 {
			j = len(body)
		}
		if j <= 0 || n == len(f)-1 && bytes.IndexByte(body, ' ') >= 0 {
			return bad("fields")
		}
		f[n], body = body[:j], body[min(j+1, len(body)):]
	}
	id, ok1 := parseUint(f[0], 10)
	pid, ok2 := parseUint(f[2], 10)
	start, ok3 := parseUint(f[3], 10)
	mask, ok4 := parseUint(f[4], 16)
	set, ok5 := parseUint(f[5], 16)
	if !ok1 || !ok2 || !ok3 || !ok4 || !ok5 || mask > 1<<32-1 || set > 1<<32-1 || pid > 1<<31-1 || int(id) != want || len(f[1]) != 1 {
		return bad("fields")
	}
	s := slot{id: want, state: slotState(f[1][0]), owner: owner{pid: int(pid), start: start}, mask: fieldMask(mask), set: fieldMask(set)}
	switch s.state {
	case stateIdle, stateBusy, stateCleaning, stateNew:
	default:
		return bad(fmt.Sprintf("state %q", f[1]))
	}
	var err error
	if s.vals, err = decodeValuesBytes(f[6], s.set); err != nil {
		return bad(err.Error())
	}
	if string(f[7]) != "-" {
		s.name = string(f[7])
	}
	return s, nil
}

// parseUint parses an unsigned number in base 10 or 16 (lower case), as
// the record writes them.
func parseUint(b []byte, base uint64) (uint64, bool) {
	if len(b) == 0 || len(b) > 20 {
		return 0, false
	}
	var n uint64
	for _, c := range b {
		var d uint64
		switch {
		case c >= '0' && c <= '9':
			d = uint64(c - '0')
		case base == 16 && c >= 'a' && c <= 'f':
			d = uint64(c-'a') + 10
		default:
			return 0, false
		}
		if n > (1<<64-1-d)/base {
			return 0, false
		}
		n = n*base + d
	}
	return n, true
}

// record is the open pool record file; its fd also carries the flock. The
// header carries a generation bumped by every write, so a process that
// wrote last reuses its parsed copy instead of re-reading every line.
type record struct {
	f    *os.File
	mode Mode
	// ctrls is the pool's controllerSet, kept in the header.
	ctrls string
	// gen and slots cache the record as this process last read or wrote
	// it; valid is false until the first read.
	gen   uint64
	slots []slot
	valid bool
	// byName indexes the cached slots that hold a lease by its name.
	byName map[string]int
	// raw is the slot lines as last read or written, line i decoded in
	// slots[i] while rawOK: a re-read after another process's writes
	// decodes only the lines that changed. spare is the other buffer.
	raw, spare []byte
	rawOK      bool
	// hdr is the header as last read or written: the same bytes under
	// the lock mean the cache is current, without parsing them.
	hdr [headerSize]byte
}

func openRecord(path string, mode Mode) (*record, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening pool record: %w", err)
	}
	return &record{f: f, mode: mode}, nil
}

func (r *record) lock(how int) error {
	for {
		err := unix.Flock(int(r.f.Fd()), how)
		if !errors.Is(err, unix.EINTR) {
			if err != nil {
				return &os.PathError{Op: "flock", Path: r.f.Name(), Err: err}
			}
			return nil
		}
	}
}

func (r *record) unlock() { _ = unix.Flock(int(r.f.Fd()), unix.LOCK_UN) }

func (r *record) encodeHeader() []byte {
	b := make([]byte, 0, headerSize)
	b = append(b, recordMagic+" "...)
	b = strconv.AppendInt(b, recordVersion, 10)
	b = append(b, ' ')
	b = append(b, r.mode...)
	b = append(b, ' ')
	b = strconv.AppendUint(b, r.gen, 10)
	b = append(b, ' ')
	b = append(b, r.ctrls...)
	return padLine(b, headerSize)
}

func (r *record) parseHeader(b []byte) (gen uint64, ctrls string, err error) {
	hdr := strings.Fields(string(b))
	if len(hdr) != 5 || hdr[0] != recordMagic || hdr[1] != strconv.Itoa(recordVersion) || Mode(hdr[2]) != r.mode {
		return 0, "", fmt.Errorf("record header %q: %w", bytes.TrimSpace(b), ErrCorrupt)
	}
	gen, err = strconv.ParseUint(hdr[3], 10, 64)
	if err != nil {
		return 0, "", fmt.Errorf("record header %q: %w", bytes.TrimSpace(b), ErrCorrupt)
	}
	return gen, hdr[4], nil
}

// controllers returns the controller set in the record's header: "" for
// a new or unreadable record (which a rebuild then rewrites).
func (r *record) controllers() (string, error) {
	if err := r.lock(unix.LOCK_SH); err != nil {
		return "", err
	}
	defer r.unlock()
	var hdr [headerSize]byte
	if n, _ := r.f.ReadAt(hdr[:], 0); n < headerSize {
		return "", nil
	}
	_, ctrls, err := r.parseHeader(hdr[:])
	if err != nil {
		return "", nil
	}
	return ctrls, nil
}

// readLocked returns the slots of the record; an empty file is a new pool
// with no slots. The slice is the record's cache: callers change slots
// only through writeSlotLocked.
//
// Preconditions: the record's flock is held.
func (r *record) readLocked() ([]slot, error) {
	var hdr [headerSize]byte
	n, err := r.f.ReadAt(hdr[:], 0)
	if n == 0 && errors.Is(err, io.EOF) {
		r.gen, r.slots, r.valid, r.byName = 0, nil, true, map[string]int{}
		return nil, nil
	}
	if n < headerSize {
		r.valid = false
		return nil, fmt.Errorf("record header: short: %w", ErrCorrupt)
	}
	if r.valid && hdr == r.hdr {
		return r.slots, nil
	}
	gen, ctrls, err := r.parseHeader(hdr[:])
	if err != nil {
		r.valid = false
		return nil, err
	}
	if ctrls != r.ctrls {
		// Another process recreated the pool with other controllers.
		r.valid = false
		return nil, fmt.Errorf("%w: record has %s, pool opened with %s", ErrControllers, ctrls, r.ctrls)
	}
	r.valid = false
	fi, err := r.f.Stat()
	if err != nil {
		return nil, fmt.Errorf("reading pool record: %w", err)
	}
	size := fi.Size()
	if (size-headerSize)%lineSize != 0 || size > headerSize+lineSize*1<<20 {
		return nil, fmt.Errorf("record size %d: %w", size, ErrCorrupt)
	}
	buf := slices.Grow(r.spare[:0], int(size)-headerSize)[:size-headerSize]
	if _, err := r.f.ReadAt(buf, headerSize); err != nil {
		r.rawOK = false
		return nil, fmt.Errorf("reading pool record: %w", err)
	}
	count := len(buf) / lineSize
	old, slots := r.raw, r.slots
	if !r.rawOK {
		old = nil
	}
	r.rawOK = false // slots is rewritten in place below
	slots = slices.Grow(slots[:min(len(slots), count)], count)[:count]
	names := r.byName
	if names == nil {
		names = make(map[string]int, count)
	}
	clear(names)
	for i := range slots {
		line := buf[i*lineSize : (i+1)*lineSize]
		if (i+1)*lineSize > len(old) || !bytes.Equal(line, old[i*lineSize:(i+1)*lineSize]) {
			s, err := decodeSlot(line, i)
			if err != nil {
				r.slots = slots
				return nil, err
			}
			slots[i] = s
		}
		if name := slots[i].name; name != "" {
			if _, dup := names[name]; dup {
				r.slots = slots
				return nil, fmt.Errorf("name %q leased twice: %w", name, ErrCorrupt)
			}
			names[name] = i
		}
	}
	r.spare, r.raw, r.rawOK = r.raw, buf, true
	r.gen, r.slots, r.valid, r.hdr, r.byName = gen, slots, true, hdr, names
	return slots, nil
}

// writeSlotLocked rewrites (or appends) one slot line in place. The
// header's generation goes first: a writer dying in between leaves a new
// generation over old lines, which readers simply re-read.
//
// Preconditions: the record's flock is held exclusively, and readLocked
// was called under it.
func (r *record) writeSlotLocked(s slot) error {
	r.gen++
	hdr := r.encodeHeader()
	if _, err := r.f.WriteAt(hdr, 0); err != nil {
		r.valid = false
		return fmt.Errorf("writing pool record: %w", err)
	}
	copy(r.hdr[:], hdr)
	line := encodeSlot(s)
	if _, err := r.f.WriteAt(line, int64(headerSize+s.id*lineSize)); err != nil {
		r.valid, r.rawOK = false, false
		return fmt.Errorf("writing pool record: %w", err)
	}
	if r.rawOK {
		if off := s.id * lineSize; off < len(r.raw) {
			copy(r.raw[off:], line)
		} else if off == len(r.raw) {
			r.raw = append(r.raw, line...)
		} else {
			r.rawOK = false
		}
	}
	if s.id < len(r.slots) {
		if old := r.slots[s.id].name; old != "" && r.byName[old] == s.id {
			delete(r.byName, old)
		}
		r.slots[s.id] = s
	} else {
		r.slots = append(r.slots, s)
	}
	if s.name != "" {
		r.byName[s.name] = s.id
	}
	return nil
}

// replaceLocked rewrites the whole record, as after a rebuild.
//
// Preconditions: the record's flock is held exclusively.
func (r *record) replaceLocked(slots []slot) error {
	r.gen++
	buf := make([]byte, 0, headerSize+len(slots)*lineSize)
	hdr := r.encodeHeader()
	buf = append(buf, hdr...)
	for _, s := range slots {
		buf = append(buf, encodeSlot(s)...)
	}
	r.valid = false
	if err := r.f.Truncate(0); err != nil {
		return fmt.Errorf("rewriting pool record: %w", err)
	}
	if _, err := r.f.WriteAt(buf, 0); err != nil {
		return fmt.Errorf("rewriting pool record: %w", err)
	}
	r.slots, r.valid, r.byName = slots, true, map[string]int{}
	r.raw, r.rawOK = append(r.raw[:0], buf[headerSize:]...), true
	for _, s := range slots {
		if s.name != "" {
			r.byName[s.name] = s.id
		}
	}
	copy(r.hdr[:], hdr)
	return nil
}

// lockLine takes the OFD write lock on slot id's line: a lease is being
// released by whoever holds it. OFD locks are independent of the record's
// flock, belong to the open file (so to the process, not the goroutine),
// and go away when the process dies. Without wait it reports false when
// another process holds it.
func (r *record) lockLine(id int, wait bool) (bool, error) {
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: int64(headerSize + id*lineSize), Len: lineSize}
	cmd := unix.F_OFD_SETLK
	if wait {
		cmd = unix.F_OFD_SETLKW
	}
	for {
		err := unix.FcntlFlock(r.f.Fd(), cmd, &lk)
		switch {
		case err == nil:
			return true, nil
		case errors.Is(err, unix.EINTR):
			continue
		case !wait && (errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES)):
			return false, nil
		}
		return false, &os.PathError{Op: "lock slot line", Path: r.f.Name(), Err: err}
	}
}

func (r *record) unlockLine(id int) {
	lk := unix.Flock_t{Type: unix.F_UNLCK, Whence: 0, Start: int64(headerSize + id*lineSize), Len: lineSize}
	_ = unix.FcntlFlock(r.f.Fd(), unix.F_OFD_SETLK, &lk)
}

// readLine reads slot id's line without the record's flock. Only the
// holder of the line's lock writes it, but a rebuild rewrites the whole
// file: a short or torn read is an error, for the caller to read again
// under the flock.
func (r *record) readLine(id int) (slot, error) {
	var b [lineSize]byte
	if _, err := r.f.ReadAt(b[:], int64(headerSize+id*lineSize)); err != nil {
		return slot{}, fmt.Errorf("reading slot %d: %w", id, err)
	}
	return decodeSlot(b[:], id)
}

func (r *record) close() error { return r.f.Close() }
