package shim

import (
	"fmt"

	"github.com/rund-dev/rund/internal/shimapi"
	"github.com/rund-dev/rund/vm"
	"github.com/rund-dev/rund/vm/agent/proto"
)

// roCapacity is the capacity of the read-only image disk a template carries
// when the image is on virtio-blk: every clone's image must fit in it. The
// placeholder is sparse.
const roCapacity = 64 << 30

// layout is a sandbox's devices and how the guest finds them. A template
// and its clones share one layout (it is part of the template's key); only
// the backing files differ.
type layout struct {
	// pmemSize > 0 puts the read-only image on virtio-pmem, mounted with
	// DAX, in a region of this size (the image file is padded to it);
	// otherwise the image is a virtio-blk disk.
	pmemSize int64
	// writableSize > 0 adds the writable layer's virtio-blk disk.
	writableSize int64
	// shares is the number of 9p devices (tags shimapi.ShareTag(i)).
	shares int
}

// layoutOf chooses the layout for a launch: pmem when the image fits the
// configured region size.
func layoutOf(l *shimapi.Launch) layout {
	lay := layout{writableSize: l.WritableSize, shares: l.ShareSlots}
	if l.PmemSize > 0 && l.RootImageSize <= l.PmemSize {
		lay.pmemSize = l.PmemSize
	}
	return lay
}

// attachShares adds the share devices: slot i shows shares[i], or the empty
// directory when the sandbox shares fewer. Shares beyond the slots (a
// backend whose templates carry none) are added after them.
func (lay layout) attachShares(cfg *vm.Config, shares []vm.Share, empty string) {
	for i := 0; i < lay.shares; i++ {
		if i < len(shares) {
			cfg.Shares = append(cfg.Shares, shares[i])
			continue
		}
		cfg.Shares = append(cfg.Shares, vm.Share{Tag: shimapi.ShareTag(i), Path: empty, ReadOnly: true})
	}
	if len(shares) > lay.shares {
		cfg.Shares = append(cfg.Shares, shares[lay.shares:]...)
	}
}

// attach adds the devices to cfg with the given backings (ro: the image,
// rw: the writable layer; rw is ignored without a writable layer).
func (lay layout) attach(cfg *vm.Config, ro, rw string) {
	if lay.writableSize > 0 && lay.pmemSize > 0 {
		cfg.Disks = append(cfg.Disks, vm.Disk{ID: "rootrw", Path: rw})
	}
	if lay.pmemSize > 0 {
		cfg.Pmems = append(cfg.Pmems, vm.Pmem{ID: "rootro", Path: ro, Size: lay.pmemSize, ReadOnly: true})
		return
	}
	cfg.Disks = append(cfg.Disks, vm.Disk{ID: "rootro", Path: ro, ReadOnly: true})
	if lay.writableSize > 0 {
		cfg.Disks = append(cfg.Disks, vm.Disk{ID: "rootrw", Path: rw})
	}
}

// root tells the agent where the layers are in the guest.
func (lay layout) root(readonly bool) proto.Root {
	r := proto.Root{LowerType: "erofs", Readonly: readonly}
	switch {
	case lay.pmemSize > 0:
		r.Lower, r.DAX = "/dev/pmem0", true
		if lay.writableSize > 0 {
			r.Upper = "/dev/vda"
		}
	default:
		r.Lower = "/dev/vda"
		if lay.writableSize > 0 {
			r.Upper = "/dev/vdb"
		}
	}
	return r
}

// roSize is the size the read-only placeholder of a template must have.
func (lay layout) roSize() int64 {
	if lay.pmemSize > 0 {
		return lay.pmemSize
	}
	return roCapacity
}

// key describes the layout for the template key.
func (lay layout) key() []string {
	var k []string
	if lay.pmemSize > 0 {
		k = append(k, fmt.Sprintf("pmem:rootro:ro:%d", lay.pmemSize))
	} else {
		k = append(k, fmt.Sprintf("disk:rootro:ro:%d", int64(roCapacity)))
	}
	if lay.writableSize > 0 {
		k = append(k, fmt.Sprintf("disk:rootrw:rw:%d", lay.writableSize))
	}
	for i := 0; i < lay.shares; i++ {
		k = append(k, "share:"+shimapi.ShareTag(i))
	}
	return k
}
