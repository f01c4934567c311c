#!/bin/sh
# install-deps.sh: the Debian packages rund needs to build its guest and run
# its tests (QEMU, EROFS and XFS tools, busybox for test rootfs, podman,
# conmon and runc for the comparison tests, and Debian's kernel source with
# its build tools for rund's streamlined guest kernel).
set -eu
pkgs="qemu-system-x86 qemu-utils erofs-utils xfsprogs e2fsprogs busybox-static kmod cpio
podman conmon runc uidmap fuse-overlayfs slirp4netns iproute2 util-linux ca-certificates
linux-source-6.1 make gcc flex bison bc perl libelf-dev libssl-dev xz-utils"
missing=""
for p in $pkgs; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	# shellcheck disable=SC2086
	apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
# The guest kernel is fetched by `make` (hack/guest/fetch-kernel.sh), which
# needs apt's package lists.
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
	apt-get update -qq
fi
