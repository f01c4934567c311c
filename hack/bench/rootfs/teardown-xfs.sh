#!/bin/sh
# teardown-xfs.sh DIR: undo setup-xfs.sh DIR: unmount DIR, detach the loop
# devices over its file (DIR.img, or $IMG) and remove the file.
set -eu
if [ $# -lt 1 ]; then
	echo "usage: $0 DIR" >&2
	exit 2
fi
dir=${1%/}
img=${IMG:-$dir.img}
if mountpoint -q "$dir" 2>/dev/null; then
	umount "$dir"
fi
if [ -e "$img" ]; then
	for dev in $(losetup -j "$img" -O NAME -n); do
		losetup -d "$dev"
	done
	rm -f "$img"
fi
rmdir "$dir" 2>/dev/null || true
echo "$dir: torn down"
