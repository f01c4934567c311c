package cgpool

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"

	"golang.org/x/sys/unix"
)

// SlotStatus describes one slot of a pool.
type SlotStatus struct {
	ID int `json:"id"`
	// State is "idle", "busy", "cleaning" or "new"; "leaked" when the
	// holder of a non-idle slot is dead (the next Acquire reclaims it), or
	// for a slot directory found in the tree but not in the record.
	State string `json:"state"`
	Name  string `json:"name,omitempty"`
	Owner int    `json:"owner,omitempty"`
	// Dir is the slot's directory name under the parent.
	Dir string `json:"dir"`
}

// Status is a snapshot of a pool.
type Status struct {
	Root        string       `json:"root"`
	Parent      string       `json:"parent"`
	Mode        Mode         `json:"mode"`
	Hierarchies []string     `json:"hierarchies"`
	Idle        int          `json:"idle"`
	Busy        int          `json:"busy"`
	Leaked      int          `json:"leaked"`
	Slots       []SlotStatus `json:"slots"`
}

// Status reads the record (under a shared lock) and checks it against the
// tree: dead holders and slot directories the record does not know are
// reported as leaked.
func (p *Pool) Status() (Status, error) {
	st := Status{Root: p.opts.Root, Parent: p.opts.Parent, Mode: p.mode}
	for _, h := range p.hs {
		st.Hierarchies = append(st.Hierarchies, h.dir)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.rec.lock(unix.LOCK_SH); err != nil {
		return st, err
	}
	defer p.rec.unlock()
	slots, err := p.rec.readLocked()
	if err != nil {
		return st, fmt.Errorf("reading pool status: %w", err)
	}
	known := map[string]bool{}
	for _, s := range slots {
		ss := SlotStatus{ID: s.id, State: s.state.String(), Name: s.name, Owner: s.owner.pid, Dir: p.dirName(s)}
		known[ss.Dir] = true
		switch {
		case s.state == stateIdle:
			st.Idle++
		case !s.owner.alive():
			ss.State = "leaked"
			st.Leaked++
		default:
			st.Busy++
		}
		st.Slots = append(st.Slots, ss)
	}
	for _, s := range slots {
		if s.name != "" {
			known[s.name] = true
		}
		known[slotName(s.id)] = true
	}
	for i := range p.hs {
		for _, e := range p.scanSlots(i) {
			if !known[e.dir] {
				known[e.dir] = true
				st.Leaked++
				st.Slots = append(st.Slots, SlotStatus{ID: e.id, State: "leaked", Dir: e.dir})
			}
		}
	}
	return st, nil
}

// foundSlot is a slot directory found in the tree.
type foundSlot struct {
	id  int
	dir string
}

// scanSlots lists the slot directories under the parent in hierarchy i:
// those marked with the slot xattr, or named like a slot.
func (p *Pool) scanSlots(i int) []foundSlot {
	entries, err := os.ReadDir(p.parents[i])
	if err != nil {
		return nil
	}
	var out []foundSlot
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		id, ok := slotXattrID(filepath.Join(p.parents[i], e.Name()))
		if !ok {
			id, ok = parseSlotName(e.Name())
		}
		if ok {
			out = append(out, foundSlot{id: id, dir: e.Name()})
		}
	}
	sort.Slice(out, func(a, b int) bool { return out[a].id < out[b].id })
	return out
}

// rebuildLocked replaces a corrupt record with one read from the tree.
// Slot directories under their slot name become idle once emptied and
// reset (nothing written to them is known); one under another name is a
// lease held by the first process found in it, or by nobody — then the
// next Acquire reclaims it; a slot found half renamed, or missing from a
// hierarchy, is left for the next Acquire to reclaim.
//
// Preconditions: the record's flock is held exclusively.
func (p *Pool) rebuildLocked() ([]slot, error) {
	names := map[int][]string{} // id -> directory name per hierarchy
	maxID := -1
	for i := range p.hs {
		for _, f := range p.scanSlots(i) {
			if names[f.id] == nil {
				names[f.id] = make([]string, len(p.hs))
			}
			names[f.id][i] = f.dir
			maxID = max(maxID, f.id)
		}
	}
	slots := make([]slot, maxID+1)
	for id := range slots {
		s := slot{id: id, state: stateCleaning, mask: fieldAll}
		if !p.slotFree(id) {
			// Being released right now: its releaser marks it idle. Were
			// it to die first, the next Acquire reclaims it in full.
			slots[id] = s
			continue
		}
		dirs := names[id]
		if dirs == nil {
			s.state = stateNew // missing everywhere: recreated on reclaim
			slots[id] = s
			continue
		}
		// The renamed hierarchies must agree on the name; the others must
		// hold the slot under its own name, or (renamed by an older rund)
		// under that same name.
		for i, d := range dirs {
			if p.hs[i].named && d != "" && d != slotName(id) {
				s.name = d
			}
		}
		same := true
		for i, d := range dirs {
			want := p.dirIn(i, slot{id: id, name: s.name})
			same = same && (d == want || !p.hs[i].named && d == s.name && d != "")
		}
		if p.mode == ModeV2 && same {
			if n := nameXattrOf(filepath.Join(p.parents[0], dirs[0])); n != "" {
				s.name = n
			}
		}
		switch {
		case same && s.name == "":
			if err := p.cleanup(s, false); err == nil {
				s = slot{id: id, state: stateIdle}
			}
		case same:
			s.state = stateBusy
			for i := range p.hs {
				if pids := readProcs(filepath.Join(p.parents[i], dirs[i])); len(pids) > 0 {
					if o, err := ownerOf(pids[0]); err == nil {
						s.owner = o
						break
					}
				}
			}
		}
		slots[id] = s
	}
	if err := p.rec.replaceLocked(slots); err != nil {
		return nil, err
	}
	return slots, nil
}
