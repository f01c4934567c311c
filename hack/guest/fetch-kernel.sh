#!/bin/sh
# fetch-kernel.sh OUTDIR: download Debian's cloud kernel (the version the
# linux-image-cloud-amd64 metapackage points at) with apt-get download and
# extract vmlinuz and the modules the guest agent loads into OUTDIR.
# Writes OUTDIR/vmlinuz, OUTDIR/modules/*.ko, OUTDIR/modules/order, OUTDIR/kernel.version.
set -eu
out=${1:?usage: fetch-kernel.sh OUTDIR}
meta=linux-image-cloud-amd64
img=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
if [ -z "$img" ]; then
	echo "fetch-kernel: apt-cache knows no $meta (run apt-get update)" >&2
	exit 1
fi
# The -unsigned package holds the same kernel without the signed-image shim.
pkg="${img}-unsigned"
apt-cache show "$pkg" >/dev/null 2>&1 || pkg="$img"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1) || {
	echo "fetch-kernel: apt-get download $pkg failed" >&2
	exit 1
}
dpkg-deb -x "$tmp"/*.deb "$tmp/x"
ver=$(ls "$tmp/x/lib/modules")
mkdir -p "$out/modules"
rm -f "$out"/modules/*.ko
cp "$tmp/x/boot/vmlinuz-$ver" "$out/vmlinuz.tmp"
# Load order matters: dependencies first.
# The channel's modules come first so the agent can answer before the disk
# and pmem drivers finish probing: virtio_console for QEMU's virtio-serial
# port, the vsock ones for Cloud Hypervisor's vsock (the agent skips those
# when the VM has no vsock device; see vm/agent/guest/channel.go).
order="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
virtio_console vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
virtio_blk libnvdimm nd_btt nd_pmem nd_virtio virtio_pmem
libcrc32c erofs overlay"
: >"$out/modules/order"
for m in $order; do
	f=$(find "$tmp/x/lib/modules/$ver" -name "$m.ko" | head -n 1)
	if [ -z "$f" ]; then
		echo "fetch-kernel: module $m not found in $pkg" >&2
		exit 1
	fi
	cp "$f" "$out/modules/$m.ko"
	echo "$m.ko" >>"$out/modules/order"
done
# Check the order: every module's dependencies must come before it.
seen=" "
for m in $order; do
	for d in $(modinfo -F depends "$out/modules/$m.ko" | tr ',' ' '); do
		case "$seen" in *" $d "*) ;; *) echo "fetch-kernel: $m needs $d loaded first" >&2; exit 1 ;; esac
	done
	seen="$seen$m "
done
echo "$ver" >"$out/kernel.version"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "fetch-kernel: $pkg ($ver) -> $out"
