#!/usr/bin/env bash
# hack/test-oci.sh — run the OCI runtime-tools (v0.9.0) validation suite
# against one or more OCI runtimes and report per-file PASS/FAIL.
#
#   hack/test-oci.sh                     # runc (from PATH) and rund ($RUND), plus a diff
#   hack/test-oci.sh /path/to/runtime…   # just these runtimes
#   hack/test-oci.sh --build-only        # only build/refresh the cached suite
#
# runtime-tools is never vendored or copied into this repo: its source comes
# from the Go module cache (`go mod download`), is copied to
# $OCI_CACHE_DIR/<version> and built there once (runtimetest static with
# CGO_ENABLED=0, validation/<t>/<t>.t with `go build`, as its Makefile does).
# The busybox rootfs the tests untar (rootfs-amd64.tar.gz) ships inside the
# runtime-tools module itself; if it is missing (or OCI_ROOTFS=debian), an
# equivalent is built from Debian's busybox-static.
#
# Every run uses a fresh work dir (cwd of the tests: runtimetest + rootfs
# tarball) with its own TMPDIR, so the tests' /tmp/ocitest* bundles land
# there.  After each test file the harness force-deletes containers the test
# left behind, kills stray processes of the test, unmounts anything mounted
# under the work dir (rootfsPropagation=shared leaks container mounts to the
# host) and removes empty cgroups the tests created (cgrouptest, testdir).
#
# Environment:
#   RUND            rund binary            (default: <repo>/bin/rund)
#   RUNC            runc binary            (default: runc from PATH)
#   OCI_TIMEOUT     seconds per test file  (default: 120)
#   OCI_TESTS       space-separated test names to run (default: all 58)
#   OCI_OUT_DIR     where results go       (default: <repo>/bin)
#                   -> test-oci-<name>.json, test-oci-<name>.tsv, test-oci-<name>.logs/
#   OCI_RESULT      JSON result file path (only with a single runtime)
#   OCI_CACHE_DIR   build cache (default: ${XDG_CACHE_HOME:-/var/cache}/rund/runtime-tools)
#   OCI_ROOTFS      "upstream" (default) or "debian" (busybox-static based rootfs)
#   OCI_KEEP_WORK=1 keep the temp work dir (debugging)
#
# Exit status: 0 whenever the suite ran (failures are the report), 2 when the
# harness itself broke (build failure, unusable runtime path, cleanup failure).
set -Eeuo pipefail

RT_MODULE=github.com/opencontainers/runtime-tools
RT_VERSION=v0.9.0
# Bump when the build recipe below changes, to invalidate the cache.
BUILD_REV=1

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
RUND=${RUND:-$REPO/bin/rund}
RUNC=${RUNC:-runc}
OCI_TIMEOUT=${OCI_TIMEOUT:-120}
OCI_OUT_DIR=${OCI_OUT_DIR:-$REPO/bin}
OCI_CACHE_DIR=${OCI_CACHE_DIR:-${XDG_CACHE_HOME:-/var/cache}/rund/runtime-tools}
OCI_ROOTFS=${OCI_ROOTFS:-upstream}
SUITE=$OCI_CACHE_DIR/$RT_VERSION

log() { printf '%s\n' "$*" >&2; }
die() { log "test-oci: error: $*"; exit 2; }
trap 'rc=$?; log "test-oci: harness failure at line $LINENO (exit $rc)"; exit 2' ERR

# ---------------------------------------------------------------- build ----

# go.mod for runtime-tools v0.9.0 (which predates modules; it used Godeps).
# selinux and runtime-spec are pinned as DESIGN.md says; the rest are the
# versions `go mod tidy` resolves, pinned so the build is reproducible.
gomod_content() {
	cat <<'EOF'
module github.com/opencontainers/runtime-tools

go 1.22

require (
	github.com/blang/semver v3.5.1+incompatible
	github.com/hashicorp/go-multierror v1.1.1
	github.com/mndrix/tap-go v0.0.0-20171203230836-629fa407e90b
	github.com/mrunalp/fileutils v0.5.1
	github.com/opencontainers/runtime-spec v1.0.2-0.20190207185410-29686dbc5559
	github.com/opencontainers/selinux v1.10.2
	github.com/satori/go.uuid v1.2.0
	github.com/sirupsen/logrus v1.10.2
	github.com/stretchr/testify v1.12.1
	github.com/syndtr/gocapability v0.0.0-20200815063812-42c35b437635
	github.com/urfave/cli v1.22.17
	github.com/xeipuuv/gojsonschema v1.2.0
	golang.org/x/sys v0.13.0
)
EOF
}
write_gomod() { gomod_content >"$1/go.mod"; }

build_stamp() {
	{
		echo "$RT_MODULE@$RT_VERSION rev=$BUILD_REV rootfs=$OCI_ROOTFS"
		go version
		gomod_content
	} | sha256sum | cut -d' ' -f1
}

# Build an equivalent of upstream's rootfs-amd64.tar.gz (a busybox tree with
# /bin/<applet> symlinks, /etc/passwd, /etc/group, and empty /proc /sys /dev)
# from Debian's busybox-static.
make_debian_rootfs() {
	local out=$1 tmp bb
	tmp=$(mktemp -d)
	mkdir -p "$tmp/root/bin" "$tmp/root/etc" "$tmp/root/proc" "$tmp/root/sys" "$tmp/root/dev"
	if dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed'; then
		bb=/bin/busybox
	else
		(cd "$tmp" && apt-get download busybox-static >/dev/null) || die "apt-get download busybox-static failed"
		dpkg-deb -x "$tmp"/busybox-static_*.deb "$tmp/deb"
		bb=$tmp/deb/bin/busybox
	fi
	file -L "$bb" 2>/dev/null | grep -q 'statically linked' || die "$bb is not a static busybox"
	install -m 0755 "$bb" "$tmp/root/bin/busybox"
	local a
	for a in $("$tmp/root/bin/busybox" --list); do
		[ "$a" = busybox ] || ln -sf busybox "$tmp/root/bin/$a"
	done
	for a in sh sleep true cat echo ls ps; do [ -e "$tmp/root/bin/$a" ] || die "busybox lacks $a"; done
	cat >"$tmp/root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
daemon:x:2:2:daemon:/sbin:/bin/false
nobody:x:65534:65534:nobody:/var/empty:/bin/false
EOF
	cat >"$tmp/root/etc/group" <<'EOF'
root:x:0:root
daemon:x:2:root,daemon
users:x:100:
nobody:x:65534:
EOF
	tar --numeric-owner --owner=0 --group=0 -C "$tmp/root" -czf "$out" .
	rm -rf "$tmp"
}

build_suite() {
	command -v go >/dev/null || die "go not found in PATH"
	export GOTOOLCHAIN=local GOWORK=off GOFLAGS=-mod=mod GO111MODULE=on
	local stamp
	stamp=$(build_stamp)
	if [ -f "$SUITE/.rund-build-stamp" ] && [ "$(cat "$SUITE/.rund-build-stamp")" = "$stamp" ]; then
		log "test-oci: using cached runtime-tools $RT_VERSION in $SUITE"
		return 0
	fi
	log "test-oci: building runtime-tools $RT_VERSION in $SUITE (one-time, ~1 min)"
	local dir tmp
	dir=$(cd /tmp && go mod download -json "$RT_MODULE@$RT_VERSION" |
		sed -n 's/^[[:space:]]*"Dir": *"\(.*\)",\{0,1\}$/\1/p')
	[ -n "$dir" ] && [ -d "$dir" ] || die "go mod download $RT_MODULE@$RT_VERSION gave no source dir"
	mkdir -p "$OCI_CACHE_DIR"
	tmp=$(mktemp -d "$OCI_CACHE_DIR/.build.XXXXXX")
	cp -a "$dir/." "$tmp/"
	chmod -R u+w "$tmp"
	rm -rf "$tmp/Godeps" "$tmp/vendor"
	write_gomod "$tmp"
	if ! (
		set +e
		cd "$tmp" || exit 1
		go mod tidy >/dev/null || exit 1
		for pin in github.com/opencontainers/selinux@v1.10.2 \
			github.com/opencontainers/runtime-spec@v1.0.2-0.20190207185410-29686dbc5559; do
			[ "$(go list -m "${pin%@*}" | cut -d' ' -f2)" = "${pin#*@}" ] || { log "pin $pin not honoured"; exit 1; }
		done
		ver=$(cat VERSION)
		CGO_ENABLED=0 nice -n 10 go build -installsuffix cgo -ldflags "-X main.version=$ver" \
			-o runtimetest ./cmd/runtimetest || exit 1
		file runtimetest | grep -q 'statically linked' || { log "runtimetest is not static"; exit 1; }
		for src in $(find ./validation/ -name '*.go' | grep -v util | sort); do
			nice -n 10 go build -o "${src%.go}.t" "$src" || exit 1
		done
	); then
		rm -rf "$tmp"
		die "building runtime-tools failed"
	fi
	if [ "$OCI_ROOTFS" = debian ] || [ ! -s "$tmp/rootfs-amd64.tar.gz" ]; then
		log "test-oci: building rootfs-amd64.tar.gz from Debian busybox-static"
		make_debian_rootfs "$tmp/rootfs-amd64.tar.gz"
	fi
	echo "$stamp" >"$tmp/.rund-build-stamp"
	rm -rf "$SUITE.old"
	[ ! -e "$SUITE" ] || mv "$SUITE" "$SUITE.old"
	mv "$tmp" "$SUITE"
	rm -rf "$SUITE.old"
}

# ------------------------------------------------------------ cleanup ----

CG_PREEXISTING=""
cgroup_candidates() {
	# Cgroups the tests create: /cgrouptest (absolute) and testdir/cgrouptest/
	# container relative to the runtime's cgroup parent (the caller's cgroup
	# for runc, e.g. /rund/ for a runtime with its own parent), in every
	# hierarchy.  Only those absent when the run began are ever removed, and
	# only with rmdir (which refuses non-empty cgroups).
	local mnt own top
	for mnt in /sys/fs/cgroup/*/; do
		mnt=${mnt%/}
		own=$(awk -F: -v h="$(basename "$mnt")" '{ n = split($2, a, ","); for (i = 1; i <= n; i++)
			if (a[i] == h || a[i] == "name=" h) { print $3; exit } }' /proc/self/cgroup)
		for top in "$mnt" "$mnt${own%/}"; do
			find "$top" -mindepth 1 -maxdepth 3 -type d \( -name cgrouptest -o -name testdir \) -prune \
				-exec find {} -depth -type d \; 2>/dev/null || true
		done
	done | sort -u
	return 0
}

cleanup_cgroups() {
	local d
	while IFS= read -r d; do
		[ -n "$d" ] || continue
		grep -qxF -- "$d" <<<"$CG_PREEXISTING" && continue
		rmdir "$d" 2>/dev/null || true
	done < <(cgroup_candidates | sort -r)
}

unmount_under() {
	local root=$1 m
	# mountinfo field 5 = mount point; deepest first.
	while IFS= read -r m; do
		umount -l "$m" 2>/dev/null || true
	done < <(awk -v r="$root/" 'index($5, r) == 1 || $5 == substr(r, 1, length(r)-1) { print $5 }' /proc/self/mountinfo |
		awk '{ print length($0) "\t" $0 }' | sort -rn | cut -f2-)
}

# IDs of the runtime's containers whose bundle lies under $2 (our work dir):
# other people's containers on this host are never touched.
# Kill, by pid, every process still carrying this run's RUND_OCI_RUN marker in
# its environment: whatever the test spawned (unshare/sleep helpers put in
# their own process group, runtime daemons, VMMs) and that outlived it.
kill_marked() {
	local p pids=()
	for p in /proc/[0-9]*; do
		[ "${p#/proc/}" != "$$" ] || continue
		if grep -qzxF "RUND_OCI_RUN=$1" "$p/environ" 2>/dev/null; then pids+=("${p#/proc/}"); fi
	done
	[ ${#pids[@]} = 0 ] || { log "test-oci: killing leftover processes: ${pids[*]}"; kill -KILL "${pids[@]}" 2>/dev/null || true; }
	return 0
}

list_ids() {
	local out rc=0
	out=$(timeout 15 "$1" list --format json 2>/dev/null) || rc=$?
	[ "$rc" != 124 ] || { log "test-oci: '$1 list' hangs"; return 0; }
	if [ -n "$out" ] && command -v jq >/dev/null && jq -e 'type == "array" or . == null' >/dev/null 2>&1 <<<"$out"; then
		jq -r --arg w "$2/" '.[]? | select((.bundle // "") | startswith($w)) | .id' <<<"$out" || true
	else
		timeout 15 "$1" list 2>/dev/null | awk -v w="$2/" 'NR > 1 && index($4, w) == 1 { print $1 }' || true
	fi
}

# ------------------------------------------------------------- tap parse ----

# Parse a TAP file; prints: planned<TAB>ran<TAB>notok<TAB>first-failure
tap_summary() {
	awk '
		/^1\.\.[0-9]+/ && plan == "" { p=$0; sub(/^1\.\./, "", p); sub(/[^0-9].*/, "", p); plan=p }
		/^Bail out!/ { bail=$0 }
		/^(not )?ok([ \t]|$)/ {
			ran++
			if ($0 ~ /^not ok/ && toupper($0) !~ /# *TODO/) { bad++; if (first == "") first=$0 }
		}
		END {
			if (bail != "" && first == "") first=bail
			printf "%s\t%d\t%d\t%s\n", (plan == "" ? "-" : plan), ran, bad + (bail != "" ? 1 : 0), first
		}' "$1"
}

json_str() {
	# JSON-escape $1 (no surrounding quotes)
	local s=$1
	s=${s//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\t'/\\t}; s=${s//$'\r'/}; s=${s//$'\n'/\\n}
	printf '%s' "$s" | tr -d '\000-\010\013\014\016-\037'
}

# ---------------------------------------------------------------- run ----

ALL_TESTS=()
declare -A RESULT   # "<name>/<test>" -> PASS|FAIL

run_suite() { # run_suite <runtime> <json-out> <name>
	local rt_in=$1 json=$2 name=$3 rt
	rt=$(command -v -- "$rt_in" 2>/dev/null) || die "runtime '$rt_in' not found"
	rt=$(readlink -f -- "$rt")
	[ -x "$rt" ] || die "runtime '$rt' is not executable"
	local base=${json%.json}
	local tsv=$base.tsv logs=$base.logs
	mkdir -p "$(dirname "$json")"
	rm -rf "$logs"
	mkdir -p "$logs"

	local work
	work=$(mktemp -d /tmp/rund-oci.XXXXXX)
	# 0755 like /tmp: with a user namespace (linux_uid_mappings, linux_ns_nopath)
	# the mapped container root must be able to traverse to its bundle.
	chmod 0755 "$work"
	mkdir -m 0755 "$work/tmp"
	cp "$SUITE/runtimetest" "$work/runtimetest"
	ln -s "$SUITE/rootfs-amd64.tar.gz" "$work/rootfs-amd64.tar.gz"

	local version
	version=$(timeout 10 "$rt" --version 2>/dev/null | head -1 || true)
	log ""
	log "=== $name ($rt${version:+, $version}): ${#ALL_TESTS[@]} test files, timeout ${OCI_TIMEOUT}s each, work dir $work"

	local t0 passed=0 total=0 t
	t0=$(date +%s)
	printf 'test\tresult\texit\tplanned\tran\tnot_ok\tseconds\treason\n' >"$tsv"
	for t in "${ALL_TESTS[@]}"; do
		local bin=$SUITE/validation/$t/$t.t
		[ -x "$bin" ] || die "missing test executable $bin"
		local s e rc=0 pid
		s=$(date +%s)
		(
			cd "$work"
			exec env TMPDIR="$work/tmp" RUNTIME="$rt" RUND_OCI_RUN="$work" \
				timeout -k 10 "$OCI_TIMEOUT" "$bin" >"$logs/$t.tap" 2>"$logs/$t.err" </dev/null
		) &
		pid=$!
		wait "$pid" || rc=$?
		e=$(date +%s)

		# --- cleanup: containers, stray processes, mounts, bundles, cgroups
		local ids id
		ids=$( { list_ids "$rt" "$work";
			find "$work/tmp" -maxdepth 2 -name 'stdout-*' -printf '%f\n' 2>/dev/null | sed 's/^stdout-//'; } |
			grep -v '^$' | sort -u || true)
		for id in $ids; do
			timeout 30 "$rt" delete -f "$id" >/dev/null 2>&1 || true
		done
		kill -KILL -- "-$pid" 2>/dev/null || true   # stragglers in the test's process group (timeout is its leader)
		kill_marked "$work"
		unmount_under "$work/tmp"
		rm -rf --one-file-system "$work/tmp" 2>/dev/null || true
		[ ! -e "$work/tmp" ] || die "could not remove $work/tmp after $t (mounts left: $(grep -c "$work" /proc/self/mountinfo))"
		mkdir -m 0755 "$work/tmp"
		cleanup_cgroups

		# --- verdict
		local planned ran bad first result reason=""
		IFS=$'\t' read -r planned ran bad first < <(tap_summary "$logs/$t.tap")
		local errline
		errline=$(grep -v -e '^[[:space:]]*$' -e '^failed to \(create\|start\|delete\) the container$' "$logs/$t.err" | head -1 | cut -c1-300 || true)
		if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
			reason="timeout after ${OCI_TIMEOUT}s"
		elif [ "$bad" -gt 0 ]; then
			reason="$bad of $ran not ok; first: ${first:0:200}"
		elif [ "$planned" = "-" ]; then
			reason="no TAP plan (exit $rc)${errline:+: $errline}"
		elif [ "$rc" -ne 0 ]; then
			reason="exit status $rc${errline:+: $errline}"
		elif [ "$planned" -ne "$ran" ]; then
			reason="planned $planned tests, ran $ran"
		fi
		if [ -z "$reason" ]; then
			result=PASS; passed=$((passed + 1))
			[ "$planned" != 0 ] || reason="plan 1..0: no assertions (skipped)"
		else
			result=FAIL
		fi
		total=$((total + 1))
		RESULT[$name/$t]=$result
		printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$result" "$rc" "$planned" "$ran" "$bad" "$((e - s))" \
			"$(printf '%s' "$reason" | tr '\t\n' '  ')" >>"$tsv"
		printf '%s  %-34s %3ss  %s\n' "$result" "$t" "$((e - s))" "$reason"
	done

	# Leftovers check (harness failure if anything escaped).
	unmount_under "$work"
	if [ -z "${OCI_KEEP_WORK:-}" ]; then
		rm -rf --one-file-system "$work" || true
		[ ! -e "$work" ] || die "could not remove work dir $work"
	else
		log "test-oci: keeping work dir $work"
	fi

	local dur=$(( $(date +%s) - t0 ))
	{
		printf '{\n  "runtime": "%s",\n  "runtime_path": "%s",\n  "runtime_version": "%s",\n' \
			"$(json_str "$name")" "$(json_str "$rt")" "$(json_str "$version")"
		printf '  "suite": "%s@%s",\n  "timeout_seconds": %s,\n  "started": "%s",\n  "duration_seconds": %s,\n' \
			"$RT_MODULE" "$RT_VERSION" "$OCI_TIMEOUT" "$(date -u -d "@$t0" +%Y-%m-%dT%H:%M:%SZ)" "$dur"
		printf '  "passed": %s,\n  "total": %s,\n  "logs": "%s",\n  "results": [\n' "$passed" "$total" "$(json_str "$logs")"
		local first=1 tt res rc2 pl rn nb sec rsn
		while IFS=$'\t' read -r tt res rc2 pl rn nb sec rsn; do
			[ "$tt" = test ] && continue
			[ $first = 1 ] || printf ',\n'
			first=0
			[ "$pl" = "-" ] && pl=null
			printf '    {"test": "%s", "result": "%s", "exit": %s, "planned": %s, "ran": %s, "not_ok": %s, "seconds": %s, "reason": "%s"}' \
				"$tt" "$res" "$rc2" "$pl" "$rn" "$nb" "$sec" "$(json_str "$rsn")"
		done <"$tsv"
		printf '\n  ]\n}\n'
	} >"$json"

	SUMMARY+=("$name: passed $passed of $total test files (${dur}s; $json)")
	printf '%s: passed %s of %s test files\n' "$name" "$passed" "$total"
	LAST_NAME=$name
}

# --------------------------------------------------------------- main ----

main() {
	local build_only=0 runtimes=() default_mode=0
	for a in "$@"; do
		case $a in
		--build-only) build_only=1 ;;
		-h | --help) sed -n '2,/^set -E/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
		-*) die "unknown option $a" ;;
		*) runtimes+=("$a") ;;
		esac
	done
	[ "$(id -u)" = 0 ] || [ $build_only = 1 ] || die "the validation suite must run as root"
	[[ $OCI_TIMEOUT =~ ^[0-9]+$ ]] || die "OCI_TIMEOUT must be a number of seconds"

	mkdir -p "$OCI_CACHE_DIR"
	exec 9>"$OCI_CACHE_DIR/.lock"
	if ! flock -n 9; then
		log "test-oci: waiting for another test-oci run (lock $OCI_CACHE_DIR/.lock)"
		flock -w 7200 9 || die "timed out waiting for the lock"
	fi

	build_suite
	[ $build_only = 0 ] || { log "test-oci: suite ready in $SUITE"; exit 0; }

	if [ -n "${OCI_TESTS:-}" ]; then
		read -r -a ALL_TESTS <<<"$OCI_TESTS"
	else
		local f
		for f in "$SUITE"/validation/*/*.t; do ALL_TESTS+=("$(basename "$f" .t)"); done
	fi
	[ ${#ALL_TESTS[@]} -gt 0 ] || die "no test files found"

	if [ ${#runtimes[@]} = 0 ]; then
		default_mode=1
		runtimes=("$RUNC")
		if [ -x "$RUND" ]; then
			runtimes+=("$RUND")
		else
			log "test-oci: NOTE: rund not found at $RUND (set RUND=...); running runc only"
		fi
	fi
	[ -z "${OCI_RESULT:-}" ] || [ ${#runtimes[@]} = 1 ] || die "OCI_RESULT needs exactly one runtime"

	CG_PREEXISTING=$(cgroup_candidates)
	SUMMARY=()
	local names=() rt
	for rt in "${runtimes[@]}"; do
		local n
		n=$(basename "$(readlink -f -- "$(command -v -- "$rt" || echo "$rt")")")
		while [[ " ${names[*]} " == *" $n "* ]]; do n=$n-2; done
		run_suite "$rt" "${OCI_RESULT:-$OCI_OUT_DIR/test-oci-$n.json}" "$n"
		names+=("$LAST_NAME")
	done

	echo
	echo "=== summary (runtime-tools $RT_VERSION)"
	printf '%s\n' "${SUMMARY[@]}"
	if [ $default_mode = 1 ] && [ ${#names[@]} -ge 2 ]; then
		local a=${names[0]} b=${names[1]} t list=()
		for t in "${ALL_TESTS[@]}"; do
			if [ "${RESULT[$a/$t]:-}" = PASS ] && [ "${RESULT[$b/$t]:-}" != PASS ]; then list+=("$t"); fi
		done
		echo "$a passes but $b fails (${#list[@]}): ${list[*]:-none}"
		list=()
		for t in "${ALL_TESTS[@]}"; do
			if [ "${RESULT[$b/$t]:-}" = PASS ] && [ "${RESULT[$a/$t]:-}" != PASS ]; then list+=("$t"); fi
		done
		echo "$b passes but $a fails (${#list[@]}): ${list[*]:-none}"
	elif [ $default_mode = 1 ]; then
		echo "rund: not run (no executable at $RUND)"
	fi
	exit 0
}

main "$@"
