#!/bin/sh
# build.sh OUTDIR: build rund's streamlined guest kernel from Debian's
# linux-source-6.1 package: tinyconfig + hack/kernel/rund.config, no modules.
# The result is cached under $RUND_KERNEL_CACHE (default
# /var/cache/rund/kernel) by the fragment's and the source's versions, so it
# is built once per machine. Writes OUTDIR/vmlinuz, OUTDIR/System.map,
# OUTDIR/config, OUTDIR/modules/order (empty) and OUTDIR/kernel.version.
set -eu
out=${1:?usage: build.sh OUTDIR}
here=$(cd "$(dirname "$0")" && pwd)
frag="$here/rund.config"
tarball=/usr/src/linux-source-6.1.tar.xz
if [ ! -f "$tarball" ]; then
	echo "kernel: $tarball missing (apt-get install linux-source-6.1, or run hack/install-deps.sh)" >&2
	exit 1
fi
srcver=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$(cat "$frag" "$0" | { cat; echo "$srcver"; } | sha256sum | cut -c1-16)
cache=${RUND_KERNEL_CACHE:-/var/cache/rund/kernel}/$key
mkdir -p "$(dirname "$cache")"
# One build per key at a time: a second caller waits and reuses the result.
exec 9>"$cache.lock"
flock 9
if [ ! -f "$cache/bzImage" ]; then
	work=$(mktemp -d "$cache.build.XXXXXX")
	trap 'rm -rf "$work"' EXIT
	trap 'exit 1' INT TERM HUP
	start=$(date +%s)
	echo "kernel: building linux-source-6.1 $srcver with hack/kernel/rund.config (about 6-8 minutes on 2 cores; once per machine)" >&2
	tar -C "$work" -xf "$tarball"
	src=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n 1)
	mk() { make -C "$src" ARCH=x86_64 -j"$(nproc)" "$@"; }
	mk -s tinyconfig >/dev/null
	(cd "$work" && "$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$frag" >/dev/null)
	mk -s olddefconfig >/dev/null
	# Missing dependencies drop options silently: every option of the
	# fragment must have survived.
	bad=""
	while IFS= read -r line; do
		case "$line" in
		CONFIG_*=*)
			grep -qx "$line" "$src/.config" || bad="$bad ${line%%=*}"
			;;
		"# CONFIG_"*" is not set")
			opt=${line#\# }
			opt=${opt%% *}
			! grep -q "^$opt=" "$src/.config" || bad="$bad $opt"
			;;
		esac
	done <"$frag"
	if [ -n "$bad" ]; then
		echo "kernel: olddefconfig dropped or changed:$bad (add their dependencies to hack/kernel/rund.config)" >&2
		exit 1
	fi
	mk -s KBUILD_BUILD_USER=rund KBUILD_BUILD_HOST=rund bzImage
	mkdir -p "$work/out"
	cp "$src/arch/x86/boot/bzImage" "$src/System.map" "$src/.config" "$work/out/"
	mv "$work/out/.config" "$work/out/config"
	make -s -C "$src" kernelrelease >"$work/out/kernel.release"
	echo "$(($(date +%s) - start))" >"$work/out/build.seconds"
	# Under the lock nobody else writes $cache; a leftover without
	# bzImage (an older, interrupted layout) is replaced.
	rm -rf "$cache"
	mv "$work/out" "$cache"
	echo "kernel: built in $(cat "$cache/build.seconds") s -> $cache" >&2
fi
exec 9>&-
mkdir -p "$out/modules"
rm -f "$out"/modules/*.ko
: >"$out/modules/order"
cp "$cache/System.map" "$cache/config" "$out/"
echo "$(cat "$cache/kernel.release")-rund-$key" >"$out/kernel.version"
cp "$cache/bzImage" "$out/vmlinuz.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "kernel: rund $(cat "$out/kernel.version") -> $out"
