#!/bin/sh
# setup-xfs.sh DIR [SIZE]: mount a fresh XFS with reflink at DIR, on a loop
# device over a sparse file (DIR.img, or $IMG). Undo with teardown-xfs.sh DIR.
# rund's data directory can live on such a filesystem where the host has no
# XFS or btrfs partition to spare.
set -eu
if [ $# -lt 1 ]; then
	echo "usage: $0 DIR [SIZE]" >&2
	exit 2
fi
dir=${1%/}
size=${2:-20G}
img=${IMG:-$dir.img}
if [ "$(id -u)" != 0 ]; then
	echo "$0: needs root (losetup, mount)" >&2
	exit 1
fi
if mountpoint -q "$dir" 2>/dev/null; then
	echo "$0: $dir is already a mount point" >&2
	exit 1
fi
mkdir -p "$dir"
truncate -s "$size" "$img"
mkfs.xfs -q -f -m reflink=1 "$img"
dev=$(losetup --find --show "$img")
if ! mount -t xfs "$dev" "$dir"; then
	losetup -d "$dev"
	exit 1
fi
echo "$dir: XFS (reflink=1, $size) on $dev over $img"
