// Package rootfs prepares the two layers of a sandbox's root filesystem on
// the host.
//
// The read-only layer is the bundle's rootfs turned into an EROFS image by
// mkfs.erofs and kept in an [ImageCache] under a content key, so that every
// sandbox of one image attaches the same file. The VMM maps it through
// virtio-pmem and the guest mounts it with DAX: guest reads land in the host's
// page cache, one copy in memory however many sandboxes use the image. Files
// are written without inline tails (-E noinline_data) because EROFS gives DAX
// only to plain, uncompressed files. Images are padded to a multiple of 2 MiB,
// as virtio-pmem requires, built into a temporary file and renamed into place,
// so a half-written image is never used.
//
// The writable layer comes from a [WritableStore]: an ext4 image formatted
// once per size and cloned with FICLONE for each sandbox, then unlinked while
// open, so it lives exactly as long as the VMM holds its descriptor. The
// guest mounts overlayfs with the EROFS image as lower and the clone as
// upper/work. On a filesystem without reflink (only XFS with reflink=1 and
// btrfs have it) the store falls back to a sparse copy and warns once.
//
// A reflink XFS for the data directory can live in a loop file:
//
//	truncate -s 20G /var/lib/rund/data.img
//	mkfs.xfs -m reflink=1 /var/lib/rund/data.img
//	mount -o loop /var/lib/rund/data.img /var/lib/rund/data
//
// hack/bench/rootfs/setup-xfs.sh does the same for the benchmark.
//
// The package is a leaf: the standard library and golang.org/x/sys only.
package rootfs
