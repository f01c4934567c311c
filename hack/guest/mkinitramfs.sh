#!/bin/sh
# mkinitramfs.sh RUND KERNELDIR OUT: build the guest initramfs (uncompressed
# newc cpio, unpacked fastest under TCG): the rund binary as /init plus the
# kernel modules listed in KERNELDIR/modules/order (none for rund's own kernel).
set -eu
rund=${1:?usage: mkinitramfs.sh RUND KERNELDIR OUT}
kdir=${2:?}
out=${3:?}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/dev" "$tmp/proc" "$tmp/sys" "$tmp/run" "$tmp/tmp" "$tmp/lib/modules"
cp "$rund" "$tmp/init"
chmod 0755 "$tmp/init"
cp "$kdir/modules/order" "$tmp/lib/modules/"
for m in $(cat "$kdir/modules/order"); do cp "$kdir/modules/$m" "$tmp/lib/modules/"; done
(cd "$tmp" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$out.tmp"
mv "$out.tmp" "$out"
