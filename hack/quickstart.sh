#!/bin/sh
# quickstart.sh: on a fresh Debian 12 machine, as root, with Go installed:
# install rund's dependencies, build and install rund and its guest, make a
# busybox bundle and run it in a microVM.
set -eu
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH
hack/install-deps.sh
make install
bundle=${BUNDLE:-/tmp/rund-demo}
if [ ! -f "$bundle/config.json" ]; then
	rm -rf "$bundle"
	mkdir -p "$bundle/rootfs/bin" "$bundle/rootfs/etc" "$bundle/rootfs/tmp" "$bundle/rootfs/proc" "$bundle/rootfs/sys" "$bundle/rootfs/dev"
	cp /bin/busybox "$bundle/rootfs/bin/"
	for a in $(/bin/busybox --list); do
		[ "$a" = busybox ] || ln -sf busybox "$bundle/rootfs/bin/$a"
	done
	(cd "$bundle" && rund spec)
	# A non-interactive command; `rund spec` writes an interactive shell.
	sed -i -e 's/"terminal": true/"terminal": false/' \
		-e 's/"sh"$/"sh", "-c", "echo hello from a microVM; uname -r"/' \
		"$bundle/config.json"
fi
rund template build
cd "$bundle" && rund run "demo-$$"
